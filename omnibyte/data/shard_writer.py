"""Webdataset shards of raw samples: the format and the deterministic writer (reading: :mod:`.shards`).

A prepared split is a set of POSIX tar files in the webdataset convention (the files of one sample share a
key and sit next to each other), plus an index written last (a split is complete iff it has one)::

    <dir>/<split>-000000.tar, <split>-000001.tar, ...
    <dir>/<split>.shards.json   {"format": 2, "split", "num_samples", "shards": [{"name", "samples", "bytes"}],
                                 "contract_version", "task", "serializer", "serializer_sha256", "answers",
                                 "task_skipped", ...}

(the provenance fields are described in :mod:`.provenance`). Inside a shard, sample ``k`` (a running index
over the split, ``%09d``) is stored as

* ``k.json``       every field that is not ``bytes`` and not a long string (id, question, answer, family, ...);
* ``k.<f>.<ext>``  each ``bytes`` field ``f``, byte for byte (images stay undecoded file bytes;
                   ``ext`` is ``png``/``jpg``/``bin`` from the file's signature, for tools that look);
* ``k.<f>.txt``    each string field longer than 4 KiB (book texts), UTF-8.

so ``webdataset.WebDataset(urls)`` reads them too (keys ``json``, ``image.png``, ``text.txt``). Field names
that become member names are lower case (webdataset lower-cases suffixes). Writing is deterministic (sorted
members, mtime 0, no owner names): the same samples give byte-identical shards. Each tar is written to a
temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError
from .provenance import AnswerSet, store_record

FORMAT = 2
LONG_TEXT = 4096


def index_name(split: str) -> str:
    return f"{split}.shards.json"


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
        member = isinstance(value, (bytes, bytearray, memoryview)) or (isinstance(value, str) and len(value) > LONG_TEXT)
        if member and field != field.lower():
            raise DataError(f"sample {sample.get('id', key)!r}: field {field!r} would be a tar member; "
                            f"webdataset lower-cases member names, so use a lower-case name")
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
                 progress: bool = True, task: Any = None, serializer: Any = None,
                 extra: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> Path:
    """Write ``samples`` as shards of ``split`` into ``directory``; returns the index file's path.

    A shard is closed after ``max_count`` samples or ``max_bytes`` of payload. ``task`` / ``serializer``:
    the configs recorded in the index (the task's is required to train from the shards). ``extra``: more
    index fields, or a function called once the samples are exhausted (e.g. for a skip count). Old shards
    of the split are replaced.
    """
    from tqdm.auto import tqdm

    if max_count < 1 or max_bytes < 1:
        raise ValueError("write_shards: max_count and max_bytes must be >= 1")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    idx = out / index_name(split)
    if idx.exists():
        idx.unlink()  # the split is incomplete until the new index lands
    for old in out.glob(f"{split}-*.tar"):
        old.unlink()
    shards: list[dict[str, Any]] = []
    tar: tarfile.TarFile | None = None
    tmp: Path | None = None
    count = size = n = 0
    answers = AnswerSet()

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
            answers.add(sample)
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
    more = extra() if callable(extra) else (extra or {})
    index = {"format": FORMAT, "split": split, "num_samples": n, "shards": shards,
             **store_record(task, serializer), "answers": answers.result(), **more}
    tmp_idx = idx.with_suffix(".json.tmp")
    tmp_idx.write_text(json.dumps(index, indent=1, sort_keys=False) + "\n")
    os.replace(tmp_idx, idx)
    return idx
