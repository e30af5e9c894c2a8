"""The task interface: where raw samples come from, and how a trained model is scored on them.

A task reads a dataset in its native layout under ``root`` and yields raw samples (dicts, see
:mod:`serializers.base`) in a fixed, deterministic order. Sharding across ranks and workers,
shuffling and packing are the data loader's job (:mod:`omnibyte.data`), not the task's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from omnibyte.config import Node
from omnibyte.registry import TASKS  # noqa: F401  (re-exported for task modules)


@dataclass(frozen=True)
class TaskConfig(Node):
    root: str = ""  # the dataset's directory; tasks may provide a default (e.g. generated data)
    on_bad_sample: Literal["fail", "skip"] = "fail"  # skip = count and go on; fail = raise naming it


class Task:
    Config = TaskConfig
    #: how samples become fixed-length rows: one per row ("pad") or concatenated and chunked ("concat")
    packing: Literal["pad", "concat"] = "pad"
    #: task-config keys that do not shape the samples (read at evaluation or run time): a prepared store made
    #: under other values of them is still this run's (every other key must match: data/provenance.py).
    #: on_bad_sample: a store holds the samples that were good; it records how many it skipped
    store_neutral: frozenset[str] = frozenset({"on_bad_sample"})

    def store_neutral_for(self, recorded: dict) -> frozenset[str]:
        """:attr:`store_neutral` for a store whose recorded task config is ``recorded`` (a task whose neutral keys
        depend on it, e.g. on its source folder, overrides this)."""
        return self.store_neutral

    def __init__(self, config: TaskConfig | None = None):
        self.config = config if config is not None else self.Config()
        self.skipped = 0  # bad samples skipped under on_bad_sample=skip

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def splits(self) -> list[str]:
        raise NotImplementedError

    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        """Every sample of ``split``, in a fixed order; finite."""
        raise NotImplementedError

    def samples_at(self, split: str, positions: Iterable[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(position, sample)`` for the given ascending positions of :meth:`samples`' order (an evaluation's
        subset). Skips the task makes count only for the chosen samples (``skipped``). Default: one pass over
        :meth:`samples`; tasks with an index override it so that only the chosen samples are read."""
        want = iter(positions)
        nxt = next(want, None)
        before = self.skipped
        for i, sample in enumerate(self.samples(split)):
            if nxt is None:
                break
            if i == nxt:
                yield i, sample
                nxt = next(want, None)
            else:  # skips made on the way to a sample belong to it: not counted for one that is not chosen
                self.skipped = before
            before = self.skipped
        self.skipped = before

    def num_samples(self, split: str) -> int | None:
        """Number of samples in ``split`` if cheaply known."""
        return None

    def evaluate(self, model: Any, items: Iterable[Any], *, split: str, out_dir: Any = None,
                 **options: Any) -> dict:
        """Task metrics (accuracy, perplexity, ...) beyond the generic bits per byte. Default: none.

        ``items`` are :class:`omnibyte.data.items.EvalItem` (``meta`` + serialized ``stream``) of ``split`` from
        the run's own data source (``omnibyte.run`` makes them); a task never reads its split itself here, so
        metrics always score the data the run trained on. ``model`` follows
        :class:`omnibyte.model.api.StreamModel`. ``out_dir``: where to write result files (None: nowhere).
        ``options``: evaluation settings the run passes (e.g. ``context`` = the run's ``data.seq_len``,
        ``batch_size``, ``progress``); tasks ignore the ones they do not use.
        """
        return {}

    def split_meta(self, split: str) -> Iterator[dict[str, Any]]:
        """The non-bytes fields of every sample of ``split`` (default: from :meth:`samples`; tasks with an index
        override it so nothing large is read)."""
        from omnibyte.data.sources import sample_meta

        for s in self.samples(split):
            yield sample_meta(s)

    def answer(self, model: Any, prompt: Any, *, max_new_bytes: int = 0, generate: bool = True) -> dict:
        """Answer one question (``omnibyte ask``): ``prompt`` is the serialized question with its context, up to
        where the answer starts. Returns ``{"answers": [{"answer", "prob", "logprob"}, ...] (best first),
        "generated": str | None}``. Tasks without questions and answers raise NotImplementedError."""
        raise NotImplementedError(f"task {self.name!r} does not answer questions (not a question-answering task)")

    def report(self, results: dict) -> list[str]:
        """A few human-readable lines summarising this task's ``evaluate`` results (default: none)."""
        return []
