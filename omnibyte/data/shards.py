"""Webdataset shards of raw samples: write, list, read.

A prepared split is a folder of POSIX tar files in the webdataset convention (the files of one sample
share a key and sit next to each other), plus an index written last (a split is complete iff it has one)::

    <dir>/<split>-000000.tar, <split>-000001.tar, ...
    <dir>/<split>.shards.json   {"format": 1, "split", "num_samples", "shards": [{"name", "samples", "bytes"}],
                                 "task": {...}}

Inside a shard, sample ``k`` (a running index over the split, ``%09d``) is stored as

* ``k.json``       every field that is not ``bytes`` and not a long string (id, question, answer, family, ...);
* ``k.<f>.<ext>``  each ``bytes`` field ``f``, byte for byte (images stay undecoded file bytes;
                   ``ext`` is ``png``/``jpg``/``bin`` from the file's signature, for tools that look);
* ``k.<f>.txt``    each string field longer than 4 KiB (book texts), UTF-8.

so ``webdataset.WebDataset(urls)`` reads them too (keys ``json``, ``image.png``, ``text.txt``). Writing is
deterministic (sorted members, mtime 0, no owner names): the same samples give byte-identical shards.
Each tar is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omnibyte.errors import DataError

FORMAT = 1
LONG_TEXT = 4096


def index_path(directory: str | os.PathLike, split: str) -> Path:
    return Path(directory) / f"{split}.shards.json"


def _ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    return "bin"


def encode_sample(sample: dict[str, Any], key: str) -> list[tuple[str, bytes]]:
    """The (member name, payload) pairs of one sample, in a fixed order."""
    meta: dict[str, Any] = {}
    files: list[tuple[str, bytes]] = []
    for field, value in sample.items():
        if "." in field or "/" in field:
            raise DataError(f"sample {sample.get('id', key)!r}: field name {field!r} cannot contain '.' or '/'")
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value)
            files.append((f"{key}.{field}.{_ext(value)}", value))
        elif isinstance(value, str) and len(value) > LONG_TEXT:
            files.append((f"{key}.{field}.txt", value.encode("utf-8")))
        else:
            meta[field] = value
    try:
        payload = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    except TypeError as e:
        raise DataError(f"sample {sample.get('id', key)!r}: a field cannot be stored as JSON: {e}") from None
    return [(f"{key}.json", payload)] + sorted(files)


def decode_sample(members: dict[str, bytes]) -> dict[str, Any]:
    """Inverse of :func:`encode_sample` for one key's members (names without the key)."""
    sample: dict[str, Any] = {}
    if "json" in members:
        sample.update(json.loads(members["json"].decode("utf-8")))
    for name, payload in members.items():
        if name == "json":
            continue
        field, _, ext = name.partition(".")
        sample[field] = payload.decode("utf-8") if ext == "txt" else payload
    return sample


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def write_shards(samples: Iterable[dict[str, Any]], directory: str | os.PathLike, split: str, *,
                 max_count: int = 10_000, max_bytes: int = 256 << 20, total: int | None = None,
                 progress: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Write ``samples`` as shards of ``split`` into ``directory``; returns the index file's path.

    A shard is closed after ``max_count`` samples or ``max_bytes`` of payload. ``extra`` (e.g. the task
    config) is recorded in the index. Old shards of the split are replaced.
    """
    from tqdm.auto import tqdm

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    idx = index_path(out, split)
    if idx.exists():
        idx.unlink()  # the split is incomplete until the new index lands
    for old in out.glob(f"{split}-*.tar"):
        old.unlink()
    shards: list[dict[str, Any]] = []
    tar: tarfile.TarFile | None = None
    tmp: Path | None = None
    count = size = n = 0

    def close() -> None:
        nonlocal tar, tmp
        if tar is None:
            return
        tar.close()
        final = out / f"{split}-{len(shards):06d}.tar"
        os.replace(tmp, final)
        shards.append({"name": final.name, "samples": count, "bytes": final.stat().st_size})
        tar = tmp = None

    bar = tqdm(total=total, desc=f"shards {split}", unit="sample", disable=not progress)
    try:
        for sample in samples:
            members = encode_sample(sample, f"{n:09d}")
            payload = sum(len(p) for _, p in members)
            if tar is not None and (count >= max_count or (count and size + payload > max_bytes)):
                close()
            if tar is None:
                tmp = out / f".{split}-{len(shards):06d}.tar.tmp"
                tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
                count = size = 0
            for name, data in members:
                _add(tar, name, data)
            count += 1
            size += payload
            n += 1
            bar.update(1)
        close()
    finally:
        bar.close()
        if tar is not None:
            tar.close()
            if tmp is not None and tmp.exists():
                tmp.unlink()
    index = {"format": FORMAT, "split": split, "num_samples": n, "shards": shards, **(extra or {})}
    tmp_idx = idx.with_suffix(".json.tmp")
    tmp_idx.write_text(json.dumps(index, indent=1, sort_keys=False) + "\n")
    os.replace(tmp_idx, idx)
    return idx


def read_index(directory: str | os.PathLike, split: str) -> dict[str, Any]:
    idx = index_path(directory, split)
    if not idx.is_file():
        have = sorted(p.name[: -len(".shards.json")] for p in Path(directory).glob("*.shards.json"))
        hint = f" (prepared splits: {', '.join(have)})" if have else " (run `omnibyte prepare <config>` first)"
        raise DataError(f"{directory}: no prepared split {split!r}: {idx.name} is missing{hint}")
    try:
        index = json.loads(idx.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{idx}: malformed JSON: {e}") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{idx}: shard format {index.get('format')!r}, this omnibyte reads format {FORMAT}")
    return index


def list_shards(directory: str | os.PathLike, split: str) -> list[Path]:
    """The shard files of ``split`` in order (from the index, which marks the split complete)."""
    index = read_index(directory, split)
    paths = [Path(directory) / s["name"] for s in index["shards"]]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: shard listed in {index_path(directory, split).name} is missing")
    return paths


def num_samples(directory: str | os.PathLike, split: str) -> int:
    return int(read_index(directory, split)["num_samples"])


def iter_shard(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in order (streamed; members of one key are adjacent)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                k, _, rest = base.partition(".")
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if k != key and key is not None:
                    yield decode_sample(members)
                    members = {}
                key = k
                members[rest] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable shard: {e}") from None
    if key is not None:
        yield decode_sample(members)


def shard_samples(directory: str | os.PathLike, split: str,
                  shards: Sequence[str | os.PathLike] | None = None) -> Iterator[dict[str, Any]]:
    """Every sample of a prepared split in order; ``shards`` restricts it to some shard files
    (e.g. a rank's or worker's share of :func:`list_shards`)."""
    for path in (list_shards(directory, split) if shards is None else shards):
        yield from iter_shard(path)
