"""The training stream: endless, shuffled, split by rank and worker, resumable; and fixed eval lists.

Splitting. With ``world`` ranks and ``W`` DataLoader workers per rank there are ``S = world * W``
data shards; data shard ``s = rank * W + worker`` owns the samples whose index ``i`` in the source's
fixed order has ``i % S == s`` (for webdataset shards with at least ``S`` tar files: every ``S``-th file,
whole). Every data shard loops over its own samples epoch after epoch, on its own: there is no global
epoch boundary to agree on, so no rank ever waits for, drops or repeats another's samples (the classic
webdataset-under-DDP bugs come from mixing a global epoch with per-worker iteration). Epoch ``e`` of
data shard ``s`` is shuffled by a generator seeded with ``(seed, e, s)`` only.

Order and position. A rank's DataLoader takes batches from its workers round-robin, so the rank's
``n``-th batch is the next one of logical worker ``n % W``. The position is, per worker, the epoch, the
batches it has handed out in that epoch, its counters (``bad_samples``, ``task_skipped``,
``overlong_skipped``) and its place inside the epoch (:mod:`.position`: items read, the shuffle buffers as
item indexes, the generator state). Resuming rebuilds each worker's place (reading back only the few
samples its buffers refer to) and rotates worker ids so the first batch comes from the right worker. The
stream after a resume is therefore exactly the stream an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError
from ..stream import Batch
from .buckets import buckets_in_use, resolve_buckets
from .packing import concat_rows, pad_rows
from .position import EpochRun, make_batches
from .sources import DataShard, open_h5, open_shards, policy_of, sample_meta, serialize, split_samples

log = logging.getLogger("omnibyte.data")


def ignore_interrupts_in_workers(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group, and a cluster's time limit sends
    SIGTERM to every process of the job; the training process decides what they mean (stop after the step in
    progress, with a checkpoint), so a worker must not die of them first and take the step's batches with it.
    (Workers still end with the training process: the DataLoader stops them, and they exit when it is gone.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def packing_of(cfg, task) -> str:
    return getattr(task, "packing", "pad") if cfg.packing == "auto" else cfg.packing


@dataclass
class LoaderItem:
    batch: Batch
    worker: int  # logical worker id
    epoch: int
    index: int  # batches this worker handed out in this epoch before this one
    stats: dict  # this worker's cumulative counters (bad samples, task skips, over-long skips)
    state: dict | None = None  # the worker's place in the epoch after this batch (see position.py)

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
        self.buckets: tuple[int, ...] = ()  # pad_to=buckets: set by TrainLoader before iterating
        self.offset = 0  # logical worker of the first batch
        self.start: dict[int, dict] = {}  # worker -> its saved position (TrainLoader.state_dict's entries)

    def _store(self):
        cfg = self.cfg
        if cfg.source == "h5":
            return open_h5(cfg, self.task, self.serializer, self.split, training=True)
        if cfg.source == "shards":
            return open_shards(cfg, self.task, self.split)
        return None

    def __iter__(self) -> Iterator[LoaderItem]:
        info = get_worker_info()
        W = info.num_workers if info is not None else 1
        if W != self.num_workers:
            raise RuntimeError(f"TrainStream made for {self.num_workers} workers runs under {W}")
        worker = ((info.id if info is not None else 0) + self.offset) % W
        shard, shards = self.rank * W + worker, self.world * W
        saved = self.start.get(worker)
        epoch, index = (int(saved["epoch"]), int(saved["batches"])) if saved else (0, 0)
        stats = dict(saved["stats"]) if saved else {}
        state = saved.get("state") if saved else None
        replay = index if saved and state is None else 0  # a position without its place: replay the epoch
        if replay:
            stats = {}
        store = self._store()
        while True:
            rng = np.random.default_rng([self.seed, epoch, shard])
            data = DataShard(self.cfg, self.task, self.split, store, seed=self.seed, epoch=epoch, shard=shard,
                             shards=shards, rng=rng)
            run = EpochRun(data, self.serializer, self.cfg, packing=self.packing, rng=rng, stats=stats, state=state)
            n = index if state is not None else 0
            for batch, pos in run.batches(self.pad_multiple, self.buckets):
                if n >= replay:
                    yield LoaderItem(batch, worker, epoch, n, dict(stats), pos)
                elif n == replay - 1:
                    stats.clear()
                    stats.update(saved["stats"])
                n += 1
            if n == 0:
                raise DataError(
                    f"split {self.split!r}: data shard {shard} of {shards} (rank {self.rank}, worker {worker}) "
                    f"got no full batch of {self.cfg.batch_size} rows in an epoch; use more data, fewer "
                    f"workers/ranks or a smaller data.batch_size")
            epoch, index, state, replay = epoch + 1, 0, None, 0


class TrainLoader:
    """Iterate Batches for one rank; ``state_dict()`` is the exact position (see the module docstring)."""

    def __init__(self, cfg, task, serializer, *, seed: int, rank: int = 0, world: int = 1, pad_multiple: int = 1):
        self.cfg = cfg
        self.dataset = TrainStream(cfg, task, serializer, seed=seed, rank=rank, world=world,
                                   pad_multiple=pad_multiple)
        self.consumed = 0
        self.workers: dict[int, dict] = {}
        self.buckets: tuple[int, ...] | None = None  # pad_to=buckets: resolved on first use or from a position
        self._files_rule: tuple[bool, bool] | None = None  # data.source=shards: see _shard_rule

    @property
    def stats(self) -> dict:
        out: dict[str, int] = {}
        for w in self.workers.values():
            for k, v in w["stats"].items():
                out[k] = out.get(k, 0) + v
        return out

    def resolve_buckets(self) -> tuple[int, ...]:
        """The batch lengths of ``pad_to: buckets`` (``()`` otherwise), see :mod:`.buckets`."""
        if self.buckets is None:
            ds = self.dataset
            self.buckets = resolve_buckets(self.cfg, ds.task, ds.serializer, ds.pad_multiple)
        return self.buckets

    def warm_buckets(self) -> tuple[int, ...]:
        """The buckets the run's sampled training streams fall into (what the shape warm-up warms), see
        :mod:`.buckets`; ``()`` unless ``pad_to: buckets``."""
        ds = self.dataset
        return buckets_in_use(self.cfg, ds.task, ds.serializer, self.resolve_buckets())

    def _shard_rule(self) -> tuple[bool, bool]:
        """data.source=shards: ``(now, before)``: whether each data shard reads whole shard files
        (``sources.whole_files``), which decides what a saved position's item numbers mean, and whether it did
        under the earlier rule (whole files wherever every data shard had a file). Read from the shard index once
        a run: every checkpoint records it."""
        if self._files_rule is None:
            from .sources import whole_files

            ds = self.dataset
            counts, shards = ds._store().counts, ds.world * ds.num_workers
            self._files_rule = (whole_files(counts, shards), len(counts) >= shards)
        return self._files_rule

    def state_dict(self) -> dict:
        out = {"consumed": self.consumed, "num_workers": self.dataset.num_workers,
               "buckets": list(self.buckets) if self.buckets else [],
               "workers": {str(w): dict(v) for w, v in self.workers.items()}}
        if self.cfg.source == "shards":
            out["whole_files"] = self._shard_rule()[0]
        return out

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_workers"]) != self.dataset.num_workers:
            raise DataError(f"checkpoint data position was taken with {state['num_workers']} data workers per "
                            f"rank; this run has {self.dataset.num_workers} (set data.workers to match)")
        if self.cfg.source == "shards":
            # a position saved before the rule was recorded: then every data shard with a file of its own read
            # whole files, also where their samples were unequal in number (sources.whole_files)
            now, before = self._shard_rule()
            then = state.get("whole_files", before)
            if then != now:
                raise DataError(f"data.path={self.cfg.path}: the checkpoint's data position was taken while each "
                                f"(rank, worker) read {'whole shard files' if then else 'every S-th sample'}, and "
                                f"this omnibyte reads {'whole files' if now else 'every S-th sample'} for these "
                                f"files, whose samples cannot be shared equally by whole files: the position would "
                                f"name other samples. Resume with the omnibyte that wrote it, or start a new run "
                                f"from its weights (train.init_from)")
        saved = tuple(int(b) for b in state.get("buckets") or ())
        if self.cfg.pad_to == "buckets":
            if self.cfg.buckets and saved and tuple(self.cfg.buckets) != saved:
                raise DataError(f"data.buckets={list(self.cfg.buckets)}, but the checkpoint's run used "
                                f"{list(saved)}; leave data.buckets empty (or set it to those) to resume")
            if saved:
                self.buckets = saved
        self.consumed = int(state["consumed"])
        self.workers = {}
        for w, v in state["workers"].items():
            if isinstance(v, (list, tuple)):  # an older position: epoch, batches, counters
                v = {"epoch": v[0], "batches": v[1], "stats": v[2], "state": None}
            self.workers[int(w)] = {"epoch": int(v["epoch"]), "batches": int(v["batches"]),
                                    "stats": dict(v["stats"]), "state": v.get("state")}

    def __iter__(self) -> Iterator[Batch]:
        ds = self.dataset
        ds.buckets = self.resolve_buckets()
        ds.offset = self.consumed % ds.num_workers
        ds.start = {w: dict(v) for w, v in self.workers.items()}
        if self.cfg.workers > 0:
            loader = DataLoader(ds, batch_size=None, num_workers=self.cfg.workers, prefetch_factor=self.cfg.prefetch,
                                persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                worker_init_fn=ignore_interrupts_in_workers)
        else:
            loader = ds
        for item in loader:
            self.workers[item.worker] = {"epoch": item.epoch, "batches": item.index + 1, "stats": item.stats,
                                         "state": item.state}
            self.consumed += 1
            yield item.batch


def eval_streams(cfg, task, serializer, split: str, *, max_samples: int = 0, stats: dict | None = None,
                 with_samples: bool = False, subset: dict | None = None, rule: str = "spread") -> Iterator:
    """The serialized streams of ``split`` from ``cfg.source`` in split order: all of them (``max_samples`` 0), or
    ``max_samples`` of them spread over the split (:data:`~.sources.SUBSET_RULE`; ``rule="first"``: the first N,
    the rule before it, kept for runs that began under it); with ``with_samples``, ``(stream, meta, sample)``
    triples (h5: the stored meta, no sample). ``subset`` (a dict) receives what they cover
    (:func:`~.sources.subset_record`); ``stats`` the skip counts of the samples read."""
    from itertools import islice

    from .sources import samples_at, split_size, subset_positions, subset_record

    stats = {} if stats is None else stats
    first = rule == "first"
    if cfg.source == "h5":
        store = open_h5(cfg, task, serializer, split, training=False)
        total = len(store)
        if first and max_samples:
            positions, record = range(min(max_samples, total)), {"rule": "first", "n": max_samples, "of": total}
        else:
            positions, record = subset_positions(total, max_samples), subset_record(total, max_samples)
        if subset is not None:
            subset.update(record)
        for i in positions:
            yield (store[i], store.meta(i), None) if with_samples else store[i]
        return
    if first or not max_samples:
        samples = split_samples(cfg, task, split, stats)
        if max_samples:
            samples = islice(samples, max_samples)
        if subset is not None:
            subset.update({"rule": "first", "n": max_samples} if max_samples else subset_record(None, 0))
    else:
        total = split_size(cfg, task, split)
        if subset is not None:
            subset.update(subset_record(total, max_samples))
        samples = samples_at(cfg, task, split, subset_positions(total, max_samples), stats) \
            if max_samples < total else split_samples(cfg, task, split, stats)
    for s, stream in serialize(((s, s) for _, s in samples), serializer, policy_of(task), stats, log):
        yield (stream, sample_meta(s), s) if with_samples else stream


def eval_batches(cfg, task, serializer, split: str, *, max_samples: int = 0, batch_size: int = 0,
                 pad_multiple: int = 1, rank: int = 0, world: int = 1, stats: dict | None = None,
                 streams=None, subset: dict | None = None, rule: str = "spread") -> list[Batch]:
    """A fixed, finite list of batches of ``split`` (``max_samples`` samples: :func:`eval_streams`), this rank's
    share.
    ``streams``: the split's streams serialized already (e.g. the :func:`~omnibyte.data.items.eval_items` a task
    evaluation reads), batched instead of serializing the split again.

    Rows go to ranks round-robin. Over-long streams under the ``error`` policy are cropped here (with
    a warning) rather than ending an evaluation; concat packing keeps the final short row. ``stats`` (a dict)
    receives the counts of cropped (``overlong_cropped``), skipped and task-skipped samples, so a result can
    say that its bits per byte are not over whole streams.
    """
    stats = {} if stats is None else stats
    packing = packing_of(cfg, task)
    if streams is None:
        streams = eval_streams(cfg, task, serializer, split, max_samples=max_samples, stats=stats, subset=subset,
                               rule=rule)
    buckets: tuple[int, ...] = ()
    if packing == "concat":
        rows = list(concat_rows(streams, cfg.seq_len, cfg.separator, keep_tail=True))
        length = None
    else:
        overlong = "crop" if cfg.overlong == "error" else cfg.overlong
        rows = list(pad_rows(streams, cfg.seq_len, overlong, stats))
        length = cfg.seq_len if cfg.pad_to == "seq_len" else None
        buckets = resolve_buckets(cfg, task, serializer, pad_multiple)
    if stats:
        log.warning("eval %s: %s", split, stats)
    if not rows:
        raise DataError(f"eval split {split!r} produced no rows")
    mine = rows[rank::world]
    return list(make_batches(mine, batch_size or cfg.batch_size, length, pad_multiple, keep_tail=True,
                             buckets=buckets))
