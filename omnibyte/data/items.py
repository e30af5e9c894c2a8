"""Evaluation items: what task metrics are computed on, whatever the run's data source.

An :class:`EvalItem` is one sample of an eval split as the model sees it: its serialized ``stream`` and its
``meta`` (the raw sample's fields that are not bytes: ``id``, ``question``, ``answer``, ``qtype``, ``family``,
``text``, ...). :func:`eval_items` yields them from the run's own ``data.source``, so task metrics (VQA
accuracy, word perplexity) score the data the run trained on, never a default set beside it:

* ``task``: the task's samples, serialized here;
* ``shards``: the prepared webdataset shards of the split (``omnibyte prepare``), serialized here;
* ``h5``: the pre-serialized streams of the split's store, with the metadata the store keeps per stream.

A split the source does not hold is a :class:`~omnibyte.errors.DataError` naming the option that adds it.
Bad samples follow the task's ``on_bad_sample`` policy: ``fail`` raises naming the sample, ``skip`` counts it
in ``stats["bad_samples"]`` and goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..stream import ByteStream


@dataclass(frozen=True)
class EvalItem:
    meta: dict[str, Any]
    stream: ByteStream
    extra: dict[str, Any] = field(default_factory=dict)  # source-specific extras (e.g. the raw sample)

    @property
    def id(self) -> str:
        return str(self.meta.get("id", self.stream.id))


def sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The fields of a raw sample that are not bytes (what an h5 store keeps beside each stream)."""
    return {k: v for k, v in sample.items() if not isinstance(v, (bytes, bytearray, memoryview))}


def eval_items(data_cfg, task, serializer, split: str, *, max_samples: int = 0,
               stats: dict | None = None) -> Iterator[EvalItem]:
    """The first ``max_samples`` (0: all) items of ``split`` from ``data_cfg.source`` (module docstring)."""
    from itertools import islice

    from .loader import serialize, source_samples

    stats = {} if stats is None else stats
    if data_cfg.source == "h5":
        from .loader import _h5

        store = _h5(data_cfg.path, split, training=False)
        n = len(store) if not max_samples else min(max_samples, len(store))
        for i in range(n):
            stream = store[i]
            yield EvalItem(store.meta(i) if hasattr(store, "meta") else {"id": stream.id}, stream)
        return
    samples = source_samples(data_cfg, task, split)
    if max_samples:
        samples = islice(samples, max_samples)
    policy = getattr(task.config, "on_bad_sample", "fail")
    held: dict[str, Any] = {}

    def remember(it):
        for s in it:
            held["last"] = s
            yield s

    for stream in serialize(remember(samples), serializer, policy, stats):
        s = held["last"]
        yield EvalItem(sample_meta(s), stream, {"sample": s})
