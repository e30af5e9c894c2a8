"""The generate-mode answer rule: how a greedily generated VQA answer and the gold answer are made comparable.

One owner for the rule, so the evaluation (``tasks/vqa_eval.py``: accuracies, ``vqa_<split>_<step>.json``) and the
analysis of its per-question records (:mod:`omnibyte.analysis.transfer`: standard errors, paired differences)
cannot drift apart and report different numbers for the same predictions:

* :func:`decode_answer`: generated tokens -> the bytes before the first special token (EOS, PAD, ... : any
  id >= 256), decoded as UTF-8 (invalid bytes -> U+FFFD), then :func:`normalize_answer`.
* :func:`normalize_answer`: surrounding whitespace stripped (``str.strip()``: spaces, tabs, newlines and the
  other Unicode whitespace); nothing else (case, inner whitespace, NUL bytes are kept). Applied to the gold
  answer and to the closed set too: the ``qa`` serializer trains on the answer exactly as given, so a gold
  answer with surrounding whitespace could otherwise never be matched.

Rank mode compares the answers as given (no rule: the prediction is one of the closed set).

:func:`result_files` is the other shared rule: where an evaluation of a split at a checkpoint writes its results
and per-question records, and so where the analysis and the robustness table read them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .vocab import NUM_BYTES


def normalize_answer(text: str) -> str:
    """An answer as generate mode compares it: surrounding whitespace stripped, nothing else changed."""
    return text.strip()


def decode_answer(tokens: Iterable[int]) -> str:
    """Generated tokens -> answer text: the bytes before the first special token, UTF-8 (errors replaced),
    normalized (:func:`normalize_answer`)."""
    out = bytearray()
    for t in tokens:
        t = int(t)
        if t >= NUM_BYTES:
            break
        out.append(t)
    return normalize_answer(out.decode("utf-8", errors="replace"))


def result_files(out_dir: Any, split: str, step: int | None = None) -> tuple[Path, Path]:
    """``(results .json, predictions .jsonl)`` of the VQA evaluation of ``split`` at checkpoint ``step``:
    ``vqa_<split>_<step>.json`` and ``vqa_<split>_<step>_predictions.jsonl`` (without a step, and in runs
    evaluated before the step was in the name, ``vqa_<split>.json`` / ``vqa_<split>_predictions.jsonl``)."""
    stem = f"vqa_{split}" if step is None else f"vqa_{split}_{int(step)}"
    return Path(out_dir) / f"{stem}.json", Path(out_dir) / f"{stem}_predictions.jsonl"
