"""Shape-stable batches: ``data.pad_to: buckets`` pads each batch to one of a few row lengths.

A batch is padded to the smallest bucket that holds its longest row, so a run sees at most
``len(buckets)`` batch shapes (what ``torch.compile`` and CUDA graphs want) instead of one per longest
row. Padding carries weight 0, so the loss is that of ``pad_to: longest`` on the same rows.

``data.buckets: [a, b, ...]`` gives the lengths (ascending, each a multiple of the model's patch product,
the last >= ``data.seq_len``). Empty, they are chosen from the data, deterministically: the lengths of the
first :data:`SAMPLES` streams of the training split (in the source's fixed order, over-long ones counted at
``seq_len``), their quantiles ``1/8, 2/8, ..., 8/8`` rounded up to a multiple of ``lcm(64, patch product)``,
and ``seq_len`` rounded up to the patch product (so any row fits): at most 9 buckets.
:func:`resolve_buckets` computes them from lengths read once per process; the training loader records them in its position (a resumed run
uses the same), and a run that writes them into its resolved config (``data.buckets``) fixes them for good.
:func:`buckets_in_use` names the buckets those sampled streams actually fall into: the shape warm-up
(``train.warm_shapes``) warms only these, not a ``seq_len`` bucket that no sampled row needs (a batch that
needs it later warms it when it comes, as ``pad_to: longest`` does for every new length).
"""

from __future__ import annotations

import dataclasses
import math
from itertools import islice

import numpy as np

from ..errors import DataError

SAMPLES = 1024
QUANTILES = 8
GRANULE = 64

_lengths_cache: dict[tuple, list[int]] = {}


def _up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def choose_buckets(lengths, seq_len: int, multiple: int = 1) -> tuple[int, ...]:
    """The buckets for these stream lengths (module docstring)."""
    top = _up(seq_len, multiple)
    g = math.lcm(GRANULE, multiple)
    v = np.sort(np.minimum(np.asarray(list(lengths), dtype=np.int64), seq_len))
    out = {top}
    if len(v):
        for q in range(1, QUANTILES + 1):
            out.add(min(_up(max(int(v[math.ceil(q * len(v) / QUANTILES) - 1]), 1), g), top))
    return tuple(sorted(out))


def check_buckets(buckets: tuple[int, ...], seq_len: int, multiple: int) -> tuple[int, ...]:
    bad = [b for b in buckets if b % multiple]
    if bad:
        raise DataError(f"data.buckets: {bad} not a multiple of the model's patch product {multiple}")
    if not buckets or buckets[-1] < seq_len:
        raise DataError(f"data.buckets: the largest bucket must hold data.seq_len={seq_len}")
    return tuple(int(b) for b in buckets)


def _lengths(cfg, task, serializer) -> list[int]:
    """The lengths of the first :data:`SAMPLES` training streams (computed once per process for the same data)."""
    from .provenance import canonical, config_record
    from .sources import open_h5, policy_of, serialize, split_samples

    key = (canonical(config_record(dataclasses.replace(cfg, buckets=()))), canonical(config_record(task.config)),
           canonical(config_record(serializer.config)))
    if key not in _lengths_cache:
        split = cfg.train_split
        if cfg.source == "h5":
            got = open_h5(cfg, task, serializer, split, training=True).lengths(SAMPLES).tolist()
        else:
            streams = serialize(islice(split_samples(cfg, task, split, {}), SAMPLES), serializer, policy_of(task), {})
            got = [len(s) for _, s in streams]
        _lengths_cache[key] = [int(n) for n in got]
    return _lengths_cache[key]


def resolve_buckets(cfg, task, serializer, multiple: int = 1) -> tuple[int, ...]:
    """``data.buckets`` if given (checked), else the buckets chosen from the training data; ``()`` unless
    ``data.pad_to`` is ``buckets``. The sampled lengths are read once per process for the same data."""
    if cfg.pad_to != "buckets":
        return ()
    if cfg.buckets:
        return check_buckets(tuple(cfg.buckets), cfg.seq_len, multiple)
    return choose_buckets(_lengths(cfg, task, serializer), cfg.seq_len, multiple)


def in_use(lengths, buckets: tuple[int, ...], seq_len: int) -> tuple[int, ...]:
    """The buckets these stream lengths fall into (a row longer than ``seq_len`` is cut to it)."""
    from .position import bucket_for

    return tuple(sorted({bucket_for(min(int(n), seq_len), buckets) for n in lengths}))


def buckets_in_use(cfg, task, serializer, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets the first :data:`SAMPLES` training streams fall into (module docstring); ``()`` without
    buckets. The same on every rank (the sampled streams are the split's first, in its fixed order)."""
    if not buckets:
        return ()
    return in_use(_lengths(cfg, task, serializer), tuple(buckets), cfg.seq_len) or tuple(buckets)
