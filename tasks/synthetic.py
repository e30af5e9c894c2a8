"""``synthetic_text``: generated English-like text with learnable structure, for smoke tests and demos.

Each sample is a short paragraph from a tiny grammar (``the red fox sees a small cat.``) plus a counting
line (``count: 3 4 5 6.``). A byte model learns the spelling within seconds and the grammar and the
counting soon after, so a CPU run shows a loss curve that visibly falls. Samples are a pure function of
``(seed, split, index)``: nothing is downloaded or stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .base import TASKS, Task, TaskConfig

_ADJ = ("red", "small", "quick", "old", "blue", "happy", "quiet", "green")
_NOUN = ("fox", "cat", "dog", "bird", "tree", "river", "house", "child")
_VERB = ("sees", "likes", "follows", "finds", "hears", "draws", "paints", "helps")
_DET = ("the", "a", "every", "one")
_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SyntheticTextConfig(TaskConfig):
    samples: dict[str, int] | None = None  # samples per split; default train 4096, others 128
    min_sentences: int = 2
    max_sentences: int = 6
    seed: int = 1234
    packing: Literal["pad", "concat"] = "concat"

    def __post_init__(self):
        if not 1 <= self.min_sentences <= self.max_sentences:
            raise ValueError("need 1 <= min_sentences <= max_sentences")
        unknown = sorted(set(self.samples or {}) - set(_SPLITS))
        if unknown:  # a misspelt split (samples.valdation) left the real one at its default in silence
            raise ValueError(f"samples: no split {', '.join(map(repr, unknown))} (splits: {', '.join(_SPLITS)})")


@TASKS.register("synthetic_text")
class SyntheticText(Task):
    """Generated grammar-and-counting text (no data needed)."""

    Config = SyntheticTextConfig
    store_neutral = Task.store_neutral | {"packing"}  # how samples become rows, not the samples

    def __init__(self, config: SyntheticTextConfig | None = None):
        super().__init__(config)
        self.packing = self.config.packing

    def splits(self) -> list[str]:
        return list(_SPLITS)

    def num_samples(self, split: str) -> int:
        if split not in _SPLITS:
            raise KeyError(f"synthetic_text has no split {split!r} (splits: {', '.join(_SPLITS)})")
        default = 4096 if split == "train" else 128
        return int((self.config.samples or {}).get(split, default))

    def text(self, split: str, index: int) -> str:
        c = self.config
        rng = np.random.default_rng([c.seed, _SPLITS.index(split), index])
        sentences = []
        for _ in range(int(rng.integers(c.min_sentences, c.max_sentences + 1))):
            subj = f"{_DET[rng.integers(4)]} {_ADJ[rng.integers(8)]} {_NOUN[rng.integers(8)]}"
            obj = f"{_DET[rng.integers(4)]} {_NOUN[rng.integers(8)]}"
            sentences.append(f"{subj} {_VERB[rng.integers(8)]} {obj}.")
        start = int(rng.integers(0, 10))
        count = " ".join(str(start + k) for k in range(int(rng.integers(3, 7))))
        return " ".join(sentences).capitalize() + f"\ncount: {count}.\n"

    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        for i in range(self.num_samples(split)):
            yield {"id": f"synthetic-{split}-{i:06d}", "text": self.text(split, i)}
