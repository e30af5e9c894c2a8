"""The training stream: endless, shuffled, split by rank and worker, resumable; and fixed eval lists.

Splitting. With ``world`` ranks and ``W`` DataLoader workers per rank there are ``S = world * W``
shards; shard ``s = rank * W + worker`` owns the samples whose index ``i`` in the source's fixed order
has ``i % S == s``. Every shard loops over its own samples epoch after epoch, on its own: there is no
global epoch boundary to agree on, so no rank ever waits for, drops or repeats another's samples
(the classic webdataset-under-DDP bugs come from mixing a global epoch with per-worker iteration).
Epoch ``e`` of shard ``s`` is shuffled by a generator seeded with ``(seed, e, s)`` only.

Order and position. A rank's DataLoader takes batches from its workers round-robin, so the rank's
``n``-th batch is the next one of logical worker ``n % W``. The position is, per worker, the epoch and
the number of batches it has handed out in that epoch. Resuming re-creates each worker's epoch and
skips that many batches (serialization re-runs for the skipped part of one epoch; nothing is stored),
and rotates worker ids so the first batch comes from the right worker. The stream after a resume is
therefore exactly the stream an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError, SerializationError
from ..stream import Batch, ByteStream
from .packing import concat_rows, pad_rows, shuffled

log = logging.getLogger("omnibyte.data")


def packing_of(cfg, task) -> str:
    return getattr(task, "packing", "pad") if cfg.packing == "auto" else cfg.packing


def source_samples(cfg, task, split: str) -> Iterator[dict[str, Any]]:
    """Raw samples of ``split`` in their fixed order, from the task or from webdataset shards."""
    if cfg.source == "task":
        return task.samples(split)
    if cfg.source == "shards":
        from .shards import shard_samples

        return shard_samples(cfg.path, split)
    raise ValueError(f"data.source {cfg.source!r} holds streams, not raw samples")


def serialize(samples, serializer, on_bad_sample: str, stats: dict) -> Iterator[ByteStream]:
    """Serialize samples; a bad one raises (naming it) or is skipped and counted, per the task's policy."""
    for sample in samples:
        try:
            yield serializer(sample)
        except SerializationError as e:
            if on_bad_sample != "skip":
                raise
            stats["bad_samples"] = stats.get("bad_samples", 0) + 1
            log.warning("skipping bad sample: %s", e)


def _shard_files(path: str, split: str) -> list:
    from .shards import list_shards

    return list(list_shards(path, split))


def _h5(path: str, split: str, training: bool):
    """The h5 store of ``split``: ``<path>/<split>.h5`` for a folder; for a file (``data.path=out/train.h5``)
    the file itself when training, and ``<split>.h5`` beside it for evaluation."""
    from pathlib import Path

    from .h5store import H5Streams

    p = Path(path)
    if p.is_dir():
        p = p / f"{split}.h5"
    elif not training and p.stem != split:
        p = p.with_name(f"{split}.h5")
    if not p.is_file():
        raise DataError(f"data.source=h5: no store for split {split!r} at {p} (omnibyte prepare <config> --h5)")
    return H5Streams(p)


def make_batches(rows, batch_size: int, length: int | None, pad_multiple: int, keep_tail: bool) -> Iterator[Batch]:
    chunk: list[ByteStream] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield Batch.collate(chunk, length=length, pad_to_multiple=pad_multiple)
            chunk = []
    if keep_tail and chunk:
        yield Batch.collate(chunk, length=length, pad_to_multiple=pad_multiple)


@dataclass
class LoaderItem:
    batch: Batch
    worker: int  # logical worker id
    epoch: int
    index: int  # batches this worker handed out in this epoch before this one
    stats: dict  # this worker's cumulative counters (bad samples, over-long skips)

    def pin_memory(self) -> LoaderItem:  # called by DataLoader(pin_memory=True)
        self.batch = self.batch.pin_memory()
        return self


class TrainStream(IterableDataset):
    """One rank's endless stream of LoaderItems (see the module docstring)."""

    def __init__(self, cfg, task, serializer, *, seed: int, rank: int, world: int, pad_multiple: int = 1,
                 split: str | None = None):
        self.cfg, self.task, self.serializer = cfg, task, serializer
        self.seed, self.rank, self.world = seed, rank, world
        self.pad_multiple = pad_multiple
        self.split = split or cfg.train_split
        self.packing = packing_of(cfg, task)
        self.num_workers = max(cfg.workers, 1)
        self.offset = 0  # logical worker of the first batch
        self.start: dict[int, tuple[int, int, dict]] = {}  # worker -> (epoch, batches to skip, stats)

    def _rows(self, epoch: int, shard: int, shards: int, stats: dict) -> Iterator[ByteStream]:
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, epoch, shard])
        buffer = cfg.shuffle_buffer if cfg.shuffle else 0
        if cfg.source == "h5":  # pre-serialized: a global permutation per epoch, strided by shard
            store = _h5(cfg.path, self.split, training=True)
            order = np.random.default_rng([self.seed, epoch]).permutation(len(store)) if cfg.shuffle \
                else np.arange(len(store))
            streams = (store[int(i)] for i in order[shard::shards])
        else:
            if cfg.source == "shards" and len(files := _shard_files(cfg.path, self.split)) >= shards:
                # enough shard files: whole files per data shard (read only what is ours), shuffled order
                from .shards import shard_samples

                files = files[shard::shards]
                if cfg.shuffle:
                    files = [files[i] for i in rng.permutation(len(files))]
                mine = shard_samples(cfg.path, self.split, files)
            else:
                mine = (s for i, s in enumerate(source_samples(cfg, self.task, self.split)) if i % shards == shard)
            policy = getattr(self.task.config, "on_bad_sample", "fail")
            streams = serialize(shuffled(mine, buffer, rng), self.serializer, policy, stats)
        if self.packing == "concat":
            return shuffled(concat_rows(streams, cfg.seq_len, cfg.separator), buffer, rng)
        return pad_rows(streams, cfg.seq_len, cfg.overlong, stats)

    def __iter__(self) -> Iterator[LoaderItem]:
        info = get_worker_info()
        W = info.num_workers if info is not None else 1
        if W != self.num_workers:
            raise RuntimeError(f"TrainStream made for {self.num_workers} workers runs under {W}")
        worker = ((info.id if info is not None else 0) + self.offset) % W
        shard, shards = self.rank * W + worker, self.world * W
        epoch, skip, saved = self.start.get(worker, (0, 0, {}))
        stats = dict(saved) if skip == 0 else {}  # the skipped batches re-count what `saved` holds
        length = self.cfg.seq_len if (self.cfg.pad_to == "seq_len" or self.packing == "concat") else None
        while True:
            index = 0
            for batch in make_batches(self._rows(epoch, shard, shards, stats), self.cfg.batch_size, length,
                                      self.pad_multiple, keep_tail=False):
                if index >= skip:
                    yield LoaderItem(batch, worker, epoch, index, dict(stats))
                elif index == skip - 1:
                    stats.clear()
                    stats.update(saved)
                index += 1
            if index == 0:
                raise DataError(
                    f"split {self.split!r}: data shard {shard} of {shards} (rank {self.rank}, worker {worker}) "
                    f"got no full batch of {self.cfg.batch_size} rows in an epoch; use more data, fewer "
                    f"workers/ranks or a smaller data.batch_size")
            epoch, skip = epoch + 1, 0


class TrainLoader:
    """Iterate Batches for one rank; ``state_dict()`` is the exact position (see the module docstring)."""

    def __init__(self, cfg, task, serializer, *, seed: int, rank: int = 0, world: int = 1, pad_multiple: int = 1):
        self.cfg = cfg
        self.dataset = TrainStream(cfg, task, serializer, seed=seed, rank=rank, world=world,
                                   pad_multiple=pad_multiple)
        self.consumed = 0
        self.workers: dict[int, tuple[int, int, dict]] = {}

    @property
    def stats(self) -> dict:
        out: dict[str, int] = {}
        for _, _, s in self.workers.values():
            for k, v in s.items():
                out[k] = out.get(k, 0) + v
        return out

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "num_workers": self.dataset.num_workers,
                "workers": {str(w): [e, i, dict(s)] for w, (e, i, s) in self.workers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_workers"]) != self.dataset.num_workers:
            raise DataError(f"checkpoint data position was taken with {state['num_workers']} data workers per "
                            f"rank; this run has {self.dataset.num_workers} (set data.workers to match)")
        self.consumed = int(state["consumed"])
        self.workers = {int(w): (int(e), int(i), dict(s)) for w, (e, i, s) in state["workers"].items()}

    def __iter__(self) -> Iterator[Batch]:
        ds = self.dataset
        ds.offset = self.consumed % ds.num_workers
        ds.start = dict(self.workers)
        if self.cfg.workers > 0:
            loader = DataLoader(ds, batch_size=None, num_workers=self.cfg.workers, prefetch_factor=self.cfg.prefetch,
                                persistent_workers=False, pin_memory=torch.cuda.is_available())
        else:
            loader = ds
        for item in loader:
            self.workers[item.worker] = (item.epoch, item.index + 1, item.stats)
            self.consumed += 1
            yield item.batch


def eval_batches(cfg, task, serializer, split: str, *, max_samples: int = 0, batch_size: int = 0,
                 pad_multiple: int = 1, rank: int = 0, world: int = 1) -> list[Batch]:
    """A fixed, finite list of batches of ``split`` (the first ``max_samples`` samples), this rank's share.

    Rows go to ranks round-robin. Over-long streams under the ``error`` policy are cropped here (with
    a warning) rather than ending an evaluation; concat packing keeps the final short row.
    """
    stats: dict = {}
    packing = packing_of(cfg, task)
    if cfg.source == "h5":
        store = _h5(cfg.path, split, training=False)
        n = len(store) if not max_samples else min(max_samples, len(store))
        streams: Any = (store[i] for i in range(n))
    else:
        samples = source_samples(cfg, task, split)
        if max_samples:
            samples = (s for i, s in zip(range(max_samples), samples))
        streams = serialize(samples, serializer, getattr(task.config, "on_bad_sample", "fail"), stats)
    if packing == "concat":
        rows = list(concat_rows(streams, cfg.seq_len, cfg.separator, keep_tail=True))
        length = None
    else:
        overlong = "crop" if cfg.overlong == "error" else cfg.overlong
        rows = list(pad_rows(streams, cfg.seq_len, overlong, stats))
        length = cfg.seq_len if cfg.pad_to == "seq_len" else None
    if stats:
        log.warning("eval %s: %s", split, stats)
    if not rows:
        raise DataError(f"eval split {split!r} produced no rows")
    mine = rows[rank::world]
    return list(make_batches(mine, batch_size or cfg.batch_size, length, pad_multiple, keep_tail=True))
