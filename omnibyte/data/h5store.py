"""An h5py store of pre-serialized streams: fast re-runs and random access.

One file per split. The streams are concatenated into flat datasets and addressed by offsets::

    /tokens     uint16[N]    all streams' tokens, back to back
    /loss_mask  float32[N]   (fractional weights kept exactly)
    /modality   uint8[N]
    /offsets    int64[n+1]   stream i is [offsets[i], offsets[i+1])
    /ids        str[n]       sample ids
    /meta       str[n]       each sample's non-bytes fields as JSON (id, question, answer, qtype, family, ...)
    attrs: format, contract_version, task (JSON), serializer (JSON), serializer_sha256, serializer_name,
           answers (JSON: sorted distinct answers, or null), split, num_streams, plus any ``extra`` given
           (e.g. task_skipped, bad_samples); see :mod:`.provenance`

A store written under another token contract is refused on open (:func:`omnibyte.vocab.check_contract`);
:meth:`H5Streams.check` refuses one made for another task or with another serializer config.
``H5Streams`` opens the file lazily and again after a fork, so it is safe in DataLoader workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from omnibyte.errors import DataError
from omnibyte.logging import show_bar
from omnibyte.stream import ByteStream
from omnibyte.vocab import check_contract

from .provenance import AnswerSet, check_store, store_record

FORMAT = 2
_CHUNK = 1 << 16


def write_streams(records: Iterable[ByteStream | tuple[ByteStream, dict[str, Any]]], path: str | os.PathLike, *,
                  serializer_config: Any = None, task_config: Any = None, serializer_name: str = "",
                  split: str = "", total: int | None = None, progress: bool = True, compression: str | None = None,
                  extra: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> Path:
    """Write streams to ``path`` (via a temporary file renamed at the end); returns the path.

    ``records`` are streams or ``(stream, meta)`` pairs, ``meta`` being the sample's non-bytes fields
    (:func:`.sources.sample_meta`; default ``{"id": stream.id}``). ``extra``: more attributes, or a function
    called once the records are exhausted (e.g. for skip counts).
    """
    import h5py
    from tqdm.auto import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    kw = {"chunks": (_CHUNK,), "maxshape": (None,)}
    if compression:
        kw["compression"] = compression
    offsets = [0]
    ids: list[str] = []
    metas: list[str] = []
    answers = AnswerSet()
    try:
        with h5py.File(tmp, "w") as f:
            tok = f.create_dataset("tokens", shape=(0,), dtype=np.uint16, **kw)
            mask = f.create_dataset("loss_mask", shape=(0,), dtype=np.float32, **kw)
            mod = f.create_dataset("modality", shape=(0,), dtype=np.uint8, **kw)
            buf: list[ByteStream] = []

            def flush() -> None:
                if not buf:
                    return
                n0 = tok.shape[0]
                n1 = n0 + sum(len(s) for s in buf)
                for ds, key in ((tok, "tokens"), (mask, "loss_mask"), (mod, "modality")):
                    ds.resize((n1,))
                    ds[n0:n1] = np.concatenate([getattr(s, key) for s in buf])
                buf.clear()

            pending = 0
            for rec in tqdm(records, total=total, desc=f"h5 {split or path.stem}", unit="stream",
                            disable=not show_bar(progress)):
                s, meta = rec if isinstance(rec, tuple) else (rec, {"id": rec.id})
                s.validate()
                answers.add(meta)
                try:
                    metas.append(json.dumps(meta, ensure_ascii=False, sort_keys=True))
                except TypeError as e:
                    raise DataError(f"sample {s.id!r}: its metadata cannot be stored as JSON: {e}") from None
                if "\x00" in str(s.id):  # h5py's strings cannot hold NUL: it failed after the whole pass, unnamed
                    raise DataError(f"sample {s.id!r}: its id contains a NUL character, which an h5 store cannot "
                                    f"hold; use shards (omnibyte prepare without --h5) or other ids")
                buf.append(s)
                ids.append(s.id)
                offsets.append(offsets[-1] + len(s))
                pending += len(s)
                if pending >= 1 << 22:
                    flush()
                    pending = 0
            flush()
            f.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64))
            f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("meta", data=np.asarray(metas, dtype=object), dtype=h5py.string_dtype())
            record = store_record(task_config, serializer_config)
            f.attrs["format"] = FORMAT
            f.attrs["contract_version"] = record["contract_version"]
            for k in ("task", "serializer"):
                f.attrs[k] = json.dumps(record[k], sort_keys=True)
            f.attrs["serializer_sha256"] = record["serializer_sha256"] or ""
            f.attrs["serializer_name"] = serializer_name or (record["serializer"] or {}).get("name", "")
            f.attrs["answers"] = json.dumps(answers.result())
            f.attrs["split"] = split
            f.attrs["num_streams"] = len(ids)
            for k, v in (extra() if callable(extra) else (extra or {})).items():
                f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class H5Streams:
    """Random access to a store written by :func:`write_streams`: ``len(s)``, ``s[i] -> ByteStream``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such h5 store (write one with `omnibyte prepare <config> --h5`)")
        self._file = None
        self._pid = None
        f = self._h5()
        for key in ("tokens", "loss_mask", "modality", "offsets", "ids"):
            if key not in f:
                raise DataError(f"{self.path}: not an omnibyte stream store (no /{key})")
        try:
            check_contract(int(f.attrs.get("contract_version", -1)), where=str(self.path))
        except ValueError as e:
            raise DataError(str(e)) from None
        if int(f.attrs.get("format", 1)) != FORMAT or "meta" not in f:
            raise DataError(f"{self.path}: h5 store format {int(f.attrs.get('format', 1))}, this omnibyte reads "
                            f"format {FORMAT} (re-run `omnibyte prepare <config> --h5`)")
        self.offsets = f["offsets"][:]
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

    def _h5(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None  # h5py handles do not pickle; reopen in the worker
        return state

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def _json(self, key: str) -> Any:
        return json.loads(self.attrs.get(key, "null"))

    @property
    def serializer_config(self) -> dict[str, Any] | None:
        return self._json("serializer")

    @property
    def record(self) -> dict[str, Any]:
        """The provenance fields (:mod:`.provenance`) as plain data."""
        return {"contract_version": int(self.attrs["contract_version"]), "task": self._json("task"),
                "serializer": self.serializer_config, "serializer_sha256": self.attrs.get("serializer_sha256") or None,
                "answers": self._json("answers")}

    def check(self, task_name: str, serializer_config: Any, where: str = "", task=None) -> H5Streams:
        """Refuse a store made for another task, under other task settings (``task``: this run's task object) or
        with another serializer config."""
        check_store(self.record, where or str(self.path), task_name=task_name, serializer_config=serializer_config,
                    streams=True, run_task=task)
        return self

    @property
    def answers(self) -> tuple[str, ...] | None:
        a = self._json("answers")
        return tuple(a) if a is not None else None

    def lengths(self, n: int | None = None) -> np.ndarray:
        """The lengths of the first ``n`` streams (all by default), without reading them."""
        return np.diff(self.offsets[: (len(self) if n is None else min(n, len(self))) + 1])

    def meta(self, i: int) -> dict[str, Any]:
        """Stream ``i``'s sample metadata (its non-bytes fields)."""
        v = self._h5()["meta"][i]
        return json.loads(v.decode() if isinstance(v, bytes) else v)

    @property
    def split(self) -> str:
        return str(self.attrs.get("split", ""))

    def id(self, i: int) -> str:
        v = self._h5()["ids"][i]
        return v.decode() if isinstance(v, bytes) else str(v)

    def __getitem__(self, i: int) -> ByteStream:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"stream {i} out of range for {self.path} ({n} streams)")
        i %= n
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        f = self._h5()
        return ByteStream(f["tokens"][a:b], f["loss_mask"][a:b], f["modality"][a:b], id=self.id(i))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
