"""Where a run's samples come from (``data.source``), opened and checked for this run.

* ``task``: the task's own samples (``task.samples(split)``), serialized by the loader;
* ``shards``: prepared webdataset shards of raw samples (:mod:`.shards`), serialized by the loader;
* ``h5``: a prepared store of serialized streams (:mod:`.h5store`).

Opening a store checks that it was made for this run (:mod:`.provenance`): the token contract and the task
name for both, and for h5 also the serializer config. A split the source does not hold is a ``DataError``
naming the option that adds it.

Task-level skips (a task's ``skipped`` counter: a missing image, a question without answer, an undecodable
book) are counted as ``stats["task_skipped"]`` next to the serializer's ``bad_samples``. Skips the task
makes before yielding sample ``i`` belong to ``i`` (those after the last sample to the index ``N``), and a
data shard counts those that belong to its own samples, so every skip is counted once per pass over the
split. Each pass uses a fresh task instance: a task may count some skips only when it first loads a split
(CLEVR's question index), and a fresh one counts every pass alike, in any process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, SerializationError

log = logging.getLogger("omnibyte.data")


def sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The fields of a raw sample that are not bytes (what an h5 store keeps beside each stream)."""
    return {k: v for k, v in sample.items() if not isinstance(v, (bytes, bytearray, memoryview))}


def policy_of(task) -> str:
    return getattr(getattr(task, "config", None), "on_bad_sample", "fail")


def count(stats: dict, key: str, n: int = 1) -> None:
    if n:
        stats[key] = stats.get(key, 0) + n


def serialize(items: Iterable[tuple[int, Any]], serializer, on_bad_sample: str, stats: dict,
              log=None) -> Iterator[tuple[int, Any]]:
    """``(j, sample) -> (j, stream)``; a bad sample raises (naming it) or is skipped and counted as
    ``stats["bad_samples"]``, per the task's ``on_bad_sample``."""
    for j, sample in items:
        try:
            yield j, serializer(sample)
        except SerializationError as e:
            if on_bad_sample != "skip":
                raise
            count(stats, "bad_samples")
            if log is not None:
                log.warning("skipping bad sample: %s", e)


def task_samples(task, split: str, stats: dict, *, shard: int = 0, shards: int = 1, start: int = 0,
                 counted_from: int = 0) -> Iterator[tuple[int, dict]]:
    """``(k, sample)`` for the samples ``i`` of ``split`` with ``i % shards == shard``, ``k = i // shards``,
    from ``k = start`` on; task skips that belong to this shard's samples with ``k >= counted_from`` are
    counted (module docstring)."""
    have = task.splits()
    if split not in have:
        raise DataError(f"task {task.name!r} has no split {split!r} (splits: {', '.join(have) or 'none'})")
    fresh = type(task)(task.config)
    last = fresh.skipped

    def skips(i: int) -> None:
        nonlocal last
        d, last = fresh.skipped - last, fresh.skipped
        if i % shards == shard and i // shards >= counted_from:
            count(stats, "task_skipped", d)

    n = 0
    for i, sample in enumerate(fresh.samples(split)):
        skips(i)
        if i % shards == shard and i // shards >= start:
            yield i // shards, sample
        n = i + 1
    skips(n)


#: how ``eval.max_samples`` (and ``omnibyte robustness --limit``) picks N of a split's M samples; recorded in every
#: eval record (``bpb_subset`` / ``task_subset``) so two runs' numbers can be checked to cover the same samples
SUBSET_SEED = 0
SUBSET_RULE = ("spread: the positions sorted(numpy.random.default_rng(0).choice(M, N, replace=False)) of the "
               "split's M samples in their fixed order (the whole split when N = 0 or N >= M)")


def subset_positions(total: int, n: int) -> list[int]:
    """The positions of the ``n`` of ``total`` samples an evaluation scores (:data:`SUBSET_RULE`), ascending."""
    if not n or n >= total:
        return list(range(total))
    return sorted(int(i) for i in np.random.default_rng(SUBSET_SEED).choice(total, n, replace=False))


def subset_record(total: int | None, n: int) -> dict[str, Any]:
    """What an eval record says about the samples it covers (``rule``: spread or all; ``n`` of ``of``)."""
    if not n or (total is not None and n >= total):
        return {"rule": "all", "n": total, "of": total}
    return {"rule": "spread", "seed": SUBSET_SEED, "n": n, "of": total}


def split_size(cfg, task, split: str) -> int:
    """The number of samples of ``split`` in the run's source (task: its ``num_samples``, else one counting pass;
    shards: their index counts)."""
    if cfg.source == "shards":
        return sum(open_shards(cfg, task, split).counts)
    have = task.splits()
    if split not in have:
        raise DataError(f"task {task.name!r} has no split {split!r} (splits: {', '.join(have) or 'none'})")
    fresh = type(task)(task.config)  # the run's task instance keeps its own skip counts
    n = fresh.num_samples(split)
    return n if n is not None else sum(1 for _ in fresh.samples(split))


def samples_at(cfg, task, split: str, positions: list[int], stats: dict) -> Iterator[tuple[int, dict]]:
    """``(position, sample)`` for ``positions`` (ascending) of ``split`` (sources ``task`` and ``shards``). Task
    skips are counted for the chosen samples only (a task's ``samples_at``), not for the rest of the split, nor
    those it counts when it loads its index (bad records that are no sample of the split's order)."""
    if cfg.source == "shards":
        want = set(positions)
        for i, sample in enumerate(open_shards(cfg, task, split).read()):
            if i in want:
                yield i, sample
        return
    fresh = type(task)(task.config)
    fresh.num_samples(split)  # an index loaded (and its own skips made) before counting
    last = fresh.skipped
    for i, sample in fresh.samples_at(split, positions):
        count(stats, "task_skipped", fresh.skipped - last)
        last = fresh.skipped
        yield i, sample
    count(stats, "task_skipped", fresh.skipped - last)


def h5_path(path: str, split: str, training: bool) -> Path:
    """``<path>/<split>.h5`` for a folder; for a file (``data.path=out/train.h5``) the file itself when
    training, and ``<split>.h5`` beside it for evaluation; ``{split}`` in ``path`` is replaced."""
    if "{split}" in path:
        return Path(path.replace("{split}", split))
    p = Path(path)
    if p.is_dir():
        return p / f"{split}.h5"
    if not training and p.stem != split:
        return p.with_name(f"{split}.h5")
    return p


def h5_file(cfg, split: str, training: bool) -> Path:
    """The existing h5 store of ``split`` under ``cfg.path`` (:func:`h5_path`), else a ``DataError`` naming
    the command that writes it."""
    p = h5_path(cfg.path, split, training)
    if not p.is_file():
        raise DataError(f"data.source=h5: no store for split {split!r} at {p}; write it with "
                        f"`omnibyte prepare <config> --h5 --splits {split}`")
    return p


def open_h5(cfg, task, serializer, split: str, *, training: bool):
    from .h5store import H5Streams

    p = h5_file(cfg, split, training)
    store = H5Streams(p)
    # a file named in data.path is what training reads: data.path=out/val.h5 trained on the validation split
    # (and evaluated on that same file) without a word; the store records the split it was written for
    use = "training" if training else "evaluation"
    if store.split and store.split != split:
        raise DataError(f"data.path={cfg.path}: {p} holds split {store.split!r}, read as split {split!r} for {use}; "
                        f"point data.path at the folder of the <split>.h5 files (or at {split}.h5)")
    if not store.split and p.stem != split:
        raise DataError(f"data.path={cfg.path}: {p} records no split and is not named {split}.h5: cannot tell that "
                        f"it holds split {split!r} ({use}); rename it or re-write it with `omnibyte prepare --h5`")
    return store.check(task.name, serializer.config, where=f"data.path={cfg.path} ({p.name})", task=task)


def open_shards(cfg, task, split: str):
    from .shards import ShardSet

    return ShardSet(cfg.path, split).check(task.name, task)


def split_samples(cfg, task, split: str, stats: dict) -> Iterator[tuple[int, dict]]:
    """All raw samples of ``split`` in their fixed order (sources ``task`` and ``shards``)."""
    if cfg.source == "task":
        yield from task_samples(task, split, stats)
    elif cfg.source == "shards":
        yield from enumerate(open_shards(cfg, task, split).read())
    else:
        raise ValueError(f"data.source {cfg.source!r} holds streams, not raw samples")


def recorded_answers(data_cfg, split: str) -> tuple[str, ...] | None:
    """The sorted distinct answers of ``split`` as its shard index or h5 store records them (``None`` when
    its samples have no answers, or for ``data.source=task``, which records nothing)."""
    if data_cfg.source == "shards":
        from .shards import ShardSet

        return ShardSet(data_cfg.path, split).answers
    if data_cfg.source == "h5":
        from .h5store import H5Streams

        return H5Streams(h5_file(data_cfg, split, training=split == data_cfg.train_split)).answers
    return None


_warned_files: set[tuple[int, ...]] = set()


def whole_files(counts: list[int], shards: int) -> bool:
    """Whether ``shards`` data shards can own whole shard files (``files[shard::shards]``) and still see the same
    number of samples each. Every data shard hands out a batch per step and loops its own items, so one that
    owned fewer samples repeated them more often: 3 files of 8 samples over 2 ranks trained file 1 twice as often
    as files 0 and 2, without a word. Otherwise each data shard reads every file and keeps every ``shards``-th
    sample (equal to one sample; more reading), with a warning saying how to get whole files back."""
    if len(counts) < shards:
        return False
    shares = [sum(counts[i::shards]) for i in range(shards)]
    if len(set(shares)) == 1:
        return True
    key = (shards, *counts)
    if key not in _warned_files:
        _warned_files.add(key)
        log.warning("data.source=shards: %d shard files over %d data shards (ranks x workers) would give them %s "
                    "samples each, so some would be seen more often; each data shard reads every file instead and "
                    "keeps every %d-th sample (write a multiple of %d equal shard files to read whole files)",
                    len(counts), shards, sorted(shares), shards, shards)
    return False


class DataShard:
    """One data shard's items in their fixed order for one epoch (:mod:`.loader`), entered at any item.

    ``raw``: items are raw samples (task, shards) or serialized streams (h5). Shards: whole files
    (``files[shard::shards]``, in an order drawn from ``rng`` each epoch when shuffling) where every data shard
    then gets the same number of samples (:func:`whole_files`), else every ``shards``-th sample. h5: every
    ``shards``-th entry of a permutation of the store drawn from ``(seed, epoch)``. Task: every ``shards``-th
    sample of the task's order.
    """

    def __init__(self, cfg, task, split: str, store: Any, *, seed: int, epoch: int, shard: int, shards: int,
                 rng: np.random.Generator):
        self.cfg, self.task, self.split, self.store = cfg, task, split, store
        self.shard, self.shards = shard, shards
        self.raw = cfg.source != "h5"
        self.files: list[int] | None = None
        if cfg.source == "h5":
            n = len(store)
            order = np.random.default_rng([seed, epoch]).permutation(n) if cfg.shuffle else np.arange(n)
            self.order = order[shard::shards]
        elif cfg.source == "shards" and whole_files(store.counts, shards):
            files = list(range(len(store.urls)))[shard::shards]
            if cfg.shuffle:
                files = [files[i] for i in rng.permutation(len(files))]
            self.files = files

    def items(self, start: int, counted_from: int, stats: dict) -> Iterator[tuple[int, Any]]:
        """``(k, item)`` from item ``start`` on (``counted_from``: see :func:`task_samples`)."""
        src, shard, shards = self.cfg.source, self.shard, self.shards
        if src == "h5":
            for k in range(start, len(self.order)):
                yield k, self.store[int(self.order[k])]
        elif src == "task":
            yield from task_samples(self.task, self.split, stats, shard=shard, shards=shards, start=start,
                                    counted_from=counted_from)
        elif self.files is not None:
            yield from enumerate(self.store.read(self.files, start), start)
        else:
            first = shard + start * shards
            for g, sample in enumerate(self.store.read(None, first), first):
                if g % shards == shard:
                    yield g // shards, sample
