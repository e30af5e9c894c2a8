"""The generate-mode answer rule: how a greedily generated VQA answer and the gold answer are made comparable.

One owner for the rule, so the evaluation (``tasks/vqa_eval.py``: accuracies, ``vqa_<split>.json``) and the
analysis of its per-question records (:mod:`omnibyte.analysis.transfer`: standard errors, paired differences)
cannot drift apart and report different numbers for the same predictions:

* :func:`decode_answer`: generated tokens -> the bytes before the first special token (EOS, PAD, ... : any
  id >= 256), decoded as UTF-8 (invalid bytes -> U+FFFD), then :func:`normalize_answer`.
* :func:`normalize_answer`: surrounding whitespace stripped (``str.strip()``: spaces, tabs, newlines and the
  other Unicode whitespace); nothing else (case, inner whitespace, NUL bytes are kept). Applied to the gold
  answer and to the closed set too: the ``qa`` serializer trains on the answer exactly as given, so a gold
  answer with surrounding whitespace could otherwise never be matched.

Rank mode compares the answers as given (no rule: the prediction is one of the closed set).
"""

from __future__ import annotations

from collections.abc import Iterable

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
