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
in ``stats["bad_samples"]`` and goes on; samples the task itself skips are counted in ``stats["task_skipped"]``.
Stores are checked as for training: an h5 store made with another serializer config, or shards of another
task, are refused.
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


def eval_items(data_cfg, task, serializer, split: str, *, max_samples: int = 0,
               stats: dict | None = None, subset: dict | None = None) -> Iterator[EvalItem]:
    """The items of ``split`` from ``data_cfg.source`` (module docstring): all (``max_samples`` 0) or
    ``max_samples`` spread over the split (:func:`~omnibyte.data.loader.eval_streams`; ``subset`` receives which).

    ``stats`` (if given) receives the counters of the samples read: ``bad_samples`` (serializer), ``task_skipped``
    (task).
    """
    from .loader import eval_streams

    for stream, meta, sample in eval_streams(data_cfg, task, serializer, split, max_samples=max_samples,
                                             stats=stats, with_samples=True, subset=subset):
        yield EvalItem(meta, stream, {"sample": sample} if sample is not None else {})
