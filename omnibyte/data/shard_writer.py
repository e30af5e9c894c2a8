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
import re
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..logging import show_bar
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
        if field.startswith("__"):  # webdataset's own keys (__key__, __url__): dropped on reading
            raise DataError(f"sample {sample.get('id', key)!r}: field name {field!r} starts with '__', which "
                            f"webdataset keeps for its own keys (it would be dropped on reading); rename it")
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


class ShardWriter:
    """Writes the shards of ``split`` into ``directory`` one sample at a time (:meth:`add`), then the index
    (:meth:`finish`); :func:`write_shards` over an iterable. Old shards of the split are removed when it is
    made. As a context manager, a writer left without :meth:`finish` removes its partly written shard.

    A shard is closed after ``max_count`` samples or ``max_bytes`` of payload. ``task`` / ``serializer``:
    the configs recorded in the index (the task's is required to train from the shards).
    """

    def __init__(self, directory: str | os.PathLike, split: str, *, max_count: int = 10_000,
                 max_bytes: int = 256 << 20, total: int | None = None, progress: bool = True, task: Any = None,
                 serializer: Any = None):
        from tqdm.auto import tqdm

        if max_count < 1 or max_bytes < 1:
            raise ValueError("write_shards: max_count and max_bytes must be >= 1")
        self.out, self.split = Path(directory), split
        self.max_count, self.max_bytes = max_count, max_bytes
        self.task, self.serializer = task, serializer
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / index_name(split)
        if self.path.exists():
            self.path.unlink()  # the split is incomplete until the new index lands
        for old in self.out.glob(f"{split}-*.tar"):  # this split's shards only: not those of a split "val-hard"
            if re.fullmatch(re.escape(split) + r"-\d{6,}\.tar", old.name):
                old.unlink()
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = self._size = self.n = 0
        self._answers = AnswerSet()
        self._bar = tqdm(total=total, desc=f"shards {split}", unit="sample", disable=not show_bar(progress))

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.out / f"{self.split}-{len(self.shards):06d}.tar"
        os.replace(self._tmp, final)
        self.shards.append({"name": final.name, "samples": self._count, "bytes": final.stat().st_size})
        self._tar = self._tmp = None

    def add(self, sample: dict[str, Any]) -> None:
        members = encode_sample(sample, f"{self.n:09d}")
        self._answers.add(sample)
        payload = sum(len(p) for _, p in members)
        if self._tar is not None and (self._count >= self.max_count
                                      or (self._count and self._size + payload > self.max_bytes)):
            self._close()
        if self._tar is None:
            self._tmp = self.out / f".{self.split}-{len(self.shards):06d}.tar.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
            self._count = self._size = 0
        for name, data in members:
            _add(self._tar, name, data)
        self._count += 1
        self._size += payload
        self.n += 1
        self._bar.update(1)

    def abort(self) -> None:
        """Close without an index, removing the shard being written."""
        self._bar.close()
        if self._tar is not None:
            self._tar.close()
            if self._tmp is not None and self._tmp.exists():
                self._tmp.unlink()
            self._tar = self._tmp = None

    def finish(self, extra: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Close the last shard and write the index; returns it. ``extra``: more index fields, or a function
        called now, after the last sample (e.g. for a skip count)."""
        try:
            self._close()
        finally:
            self.abort()
        more = extra() if callable(extra) else (extra or {})
        index = {"format": FORMAT, "split": self.split, "num_samples": self.n, "shards": self.shards,
                 **store_record(self.task, self.serializer), "answers": self._answers.result(), **more}
        tmp_idx = self.path.with_suffix(".json.tmp")
        tmp_idx.write_text(json.dumps(index, indent=1, sort_keys=False) + "\n")
        os.replace(tmp_idx, self.path)
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def write_shards(samples: Iterable[dict[str, Any]], directory: str | os.PathLike, split: str, *,
                 max_count: int = 10_000, max_bytes: int = 256 << 20, total: int | None = None,
                 progress: bool = True, task: Any = None, serializer: Any = None,
                 extra: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> Path:
    """Write ``samples`` as shards of ``split`` into ``directory`` (:class:`ShardWriter`); returns the index
    file's path. ``extra``: more index fields, or a function called once the samples are exhausted."""
    with ShardWriter(directory, split, max_count=max_count, max_bytes=max_bytes, total=total, progress=progress,
                     task=task, serializer=serializer) as w:
        for sample in samples:
            w.add(sample)
        w.finish(extra)
    return w.path
