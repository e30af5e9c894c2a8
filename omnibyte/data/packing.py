"""Packing: how serialized streams become fixed-length rows.

* ``pad`` (one example per row; VQA): each stream is one row, right-padded with PAD (weight 0) at
  collate time. A stream longer than ``seq_len`` follows the ``overlong`` policy: ``error`` (raise
  naming the sample), ``skip`` (drop it and count it) or ``crop`` (keep its first ``seq_len`` tokens;
  for QA streams that usually cuts the answer, so prefer a larger ``seq_len``). Cost: padding.
* ``concat`` (long text): streams are concatenated, a separator (EOS, unless the stream already ends
  with it) between documents, and cut into rows of exactly ``seq_len`` tokens. No padding and no
  waste, but a row may start mid-document and the model sees nothing of the row before it; a short
  tail at the end of a finite list is kept only when ``keep_tail`` (evaluation).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np

from .. import vocab
from ..errors import DataError
from ..stream import ByteStream


def pad_rows(streams: Iterable[ByteStream], seq_len: int,
             overlong: Literal["error", "skip", "crop"] = "error", stats: dict | None = None) -> Iterator[ByteStream]:
    """One stream per row, each at most ``seq_len`` tokens (see the module docstring)."""
    for s in streams:
        if len(s) > seq_len:
            if overlong == "error":
                raise DataError(f"sample {s.id!r}: {len(s)} tokens, more than data.seq_len={seq_len} "
                                f"(raise data.seq_len, or set data.overlong=skip|crop)")
            if overlong == "skip":
                if stats is not None:
                    stats["overlong_skipped"] = stats.get("overlong_skipped", 0) + 1
                continue
            s = s[:seq_len]
        if len(s) == 0:
            continue
        yield s


def _separator(s: ByteStream, separator: str) -> ByteStream | None:
    if separator == "none" or (len(s) and int(s.tokens[-1]) == vocab.EOS):
        return None
    return ByteStream.special(vocab.EOS, id=s.id)


def concat_rows(streams: Iterable[ByteStream], seq_len: int, separator: Literal["eos", "none"] = "eos",
                keep_tail: bool = False) -> Iterator[ByteStream]:
    """Concatenate documents (with separators) and cut rows of exactly ``seq_len`` tokens."""
    parts: list[ByteStream] = []
    held = 0
    for s in streams:
        sep = _separator(s, separator)
        for piece in (s, sep):
            if piece is None or len(piece) == 0:
                continue
            parts.append(piece)
            held += len(piece)
            while held >= seq_len:
                buf = ByteStream.concat(parts, id=parts[0].id)
                yield buf[:seq_len]
                rest = buf[seq_len:]
                parts = [rest] if len(rest) else []
                held = len(rest)
    if keep_tail and held:
        yield ByteStream.concat(parts, id=parts[0].id)


def shuffled(items: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """Buffer shuffle (webdataset-style): hold ``buffer`` items, emit a random one as each new one comes."""
    if buffer <= 1:
        yield from items
        return
    held: list = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        k = int(rng.integers(len(held)))
        held[k], item = item, held[k]
        yield item
    while held:
        k = int(rng.integers(len(held)))
        held[k], held[-1] = held[-1], held[k]
        yield held.pop()
