"""One data shard's epoch as explicit stages, and its exact position after any batch.

Stages: the data shard's items ``(j, sample)`` in their fixed order (:class:`.sources.DataShard`) ->
:class:`~.packing.Shuffle` (sample buffer; not for h5, which is permuted instead) -> serialize (bad samples
skipped and counted, per ``on_bad_sample``) -> ``pad``: the over-long policy | ``concat``:
:class:`~.packing.Concat`, then a row :class:`~.packing.Shuffle` -> batches. One numpy generator, seeded
with ``(seed, epoch, shard)``, draws the shard files' order and both shuffles.

The position after a batch is a small JSON dict:

* ``n_in``, ``done``: items pulled from the data shard so far, and whether it is exhausted;
* ``rng``: the generator's state;
* ``held``: the indexes ``j`` of the samples in the sample buffer;
* ``parts``: the concat leftover as pieces ``j a b`` (tokens ``a:b`` of document ``j``);
* ``rows``: the pieces of each row in the row buffer (``;`` between rows).

Resuming rebuilds it: the data shard is entered at the smallest ``j`` the position refers to (shards skip
whole tar files by their index counts, then samples of one file; h5 seeks; the task source re-reads from
its start, serializing nothing), the samples referred to are kept (those in ``parts``/``rows`` serialized
again), and reading goes on at ``n_in``. Counters are restored from the position, and nothing read while
rebuilding is counted again. The stream after a resume is exactly the one an uninterrupted run sees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import DataError
from ..stream import Batch, ByteStream
from .packing import Concat, Shuffle, pad_rows, with_separator
from .sources import DataShard, policy_of, serialize

log = logging.getLogger("omnibyte.data")


def _ints(xs) -> str:
    return " ".join(map(str, xs))


def _unints(s: str) -> list[int]:
    return [int(x) for x in s.split()]


def _triples(s: str) -> list[tuple[int, int, int]]:
    v = _unints(s)
    return [(v[i], v[i + 1], v[i + 2]) for i in range(0, len(v), 3)]


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= ``length`` (buckets are sorted and the last covers ``data.seq_len``)."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"a row of {length} tokens is longer than the largest bucket {buckets[-1]}")


def make_batches(rows, batch_size: int, length: int | None, pad_multiple: int, keep_tail: bool,
                 buckets: tuple[int, ...] = ()) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows, padded to ``length`` (None: the longest row), or, with ``buckets``, to
    the smallest bucket that holds the longest row; always a multiple of ``pad_multiple``."""
    chunk: list[ByteStream] = []

    def collate() -> Batch:
        L = bucket_for(max(len(r) for r in chunk), buckets) if buckets else length
        return Batch.collate(chunk, length=L, pad_to_multiple=pad_multiple)

    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield collate()
            chunk = []
    if keep_tail and chunk:
        yield collate()


class EpochRun:
    """The batches of one epoch of one data shard, each with the position after it (module docstring)."""

    def __init__(self, shard: DataShard, serializer, cfg, *, packing: str, rng: np.random.Generator,
                 stats: dict, state: dict | None = None):
        self.shard, self.serializer, self.cfg = shard, serializer, cfg
        self.packing, self.rng, self.stats = packing, rng, stats
        self.state = state
        self.n_in, self.done = 0, False
        buffer = cfg.shuffle_buffer if cfg.shuffle else 0
        self.s1 = Shuffle(buffer if shard.raw else 0, rng)
        self.concat = Concat(cfg.seq_len, cfg.separator)
        self.s2 = Shuffle(buffer, rng)

    def _doc(self, item: Any) -> ByteStream:
        return with_separator(self.serializer(item) if self.shard.raw else item, self.cfg.separator)

    def _source(self) -> Iterator[tuple[int, Any]]:
        """The data shard's items from where the position stands, rebuilding the buffers first."""
        st = self.state
        if st is None:
            return self.shard.items(0, 0, self.stats)
        self.n_in, self.done = int(st["n_in"]), bool(st["done"])
        self.rng.bit_generator.state = st["rng"]
        held, parts = _unints(st["held"]), _triples(st["parts"])
        rows = [_triples(r) for r in st["rows"].split(";")] if st["rows"] else []
        want_raw = set(held)
        want_doc = {j for j, _, _ in parts} | {j for r in rows for j, _, _ in r}
        lo = min(want_raw | want_doc | {self.n_in})
        items = self.shard.items(lo, self.n_in + self.done, self.stats)
        raw: dict[int, Any] = {}
        docs: dict[int, ByteStream] = {}
        reached = lo
        if lo < self.n_in:
            for j, item in items:
                if j in want_raw:
                    raw[j] = item
                if j in want_doc:
                    docs[j] = self._doc(item)
                reached = j + 1
                if reached == self.n_in:
                    break
        if reached != self.n_in:
            raise DataError(f"split {self.shard.split!r}: the checkpoint's data position stands at item {self.n_in} "
                            f"of data shard {self.shard.shard}, which now has only {reached} (the data changed)")
        self.s1.held[:] = [(j, raw[j]) for j in held]
        self.concat = Concat(self.cfg.seq_len, self.cfg.separator, [[j, a, b, docs[j], 0] for j, a, b in parts])
        self.s2.held[:] = [(_ints(x for p in r for x in p), Concat.row([docs[j][a:b] for j, a, b in r]))
                           for r in rows]
        return items

    def position(self) -> dict:
        return {"n_in": self.n_in, "done": self.done, "rng": self.rng.bit_generator.state,
                "held": _ints([j for j, _ in self.s1.held]),
                "parts": _ints(x for p in self.concat.parts for x in p[:3]),
                "rows": ";".join(refs for refs, _ in self.s2.held)}

    def batches(self, pad_multiple: int, buckets: tuple[int, ...] = ()) -> Iterator[tuple[Batch, dict]]:
        cfg = self.cfg
        source = self._source()

        def pulled():
            for j, item in source:
                self.n_in = j + 1
                yield j, item
            self.done = True

        items = self.s1.run(pulled())
        if self.shard.raw:
            items = serialize(items, self.serializer, policy_of(self.shard.task), self.stats, log)
        if self.packing == "concat":
            # row buffer entries: (pieces as text, row); the text only where the buffer holds rows (a buffer
            # of 0 or 1 passes them through, and the position records the held ones)
            text = self.s2.buffer > 1
            pieces = ((_ints(x for p in refs for x in p) if text else "", row) for refs, row in self.concat.run(items))
            rows = (row for _, row in self.s2.run(pieces))
            length, buckets = cfg.seq_len, ()
        else:
            rows = pad_rows((s for _, s in items), cfg.seq_len, cfg.overlong, self.stats)
            length = cfg.seq_len if cfg.pad_to == "seq_len" else None
        for batch in make_batches(rows, cfg.batch_size, length, pad_multiple, keep_tail=False, buckets=buckets):
            yield batch, self.position()
