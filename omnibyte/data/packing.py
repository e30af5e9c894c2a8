"""Packing: how serialized streams become fixed-length rows.

* ``pad`` (one example per row; VQA): each stream is one row, right-padded with PAD (weight 0) at
  collate time. A stream longer than ``seq_len`` follows the ``overlong`` policy: ``error`` (raise
  naming the sample), ``skip`` (drop it and count it) or ``crop`` (keep its first ``seq_len`` tokens;
  for QA streams that usually cuts the answer, so prefer a larger ``seq_len``). Cost: padding.
* ``concat`` (long text): streams are concatenated, a separator (EOS, unless the stream already ends
  with it) between documents, and cut into rows of exactly ``seq_len`` tokens. No padding and no
  waste, but a row may start mid-document and the model sees nothing of the row before it; a short
  tail at the end of a finite list is kept only when ``keep_tail`` (evaluation). A row's id is the id
  of the document its first token comes from.

:class:`Concat` and :class:`Shuffle` keep their state in plain attributes, current whenever they yield, so
the training stream can store its position inside them (:mod:`.position`).
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
            if stats is not None:
                stats["overlong_cropped"] = stats.get("overlong_cropped", 0) + 1
            s = s[:seq_len]
        if len(s) == 0:  # nothing to score or train on (e.g. utf8 of "" without bos/eos); counted like any skip
            if stats is not None:
                stats["empty_skipped"] = stats.get("empty_skipped", 0) + 1
            continue
        yield s


_EOS = ByteStream.special(vocab.EOS)


def separator_of(s: ByteStream, separator: str) -> ByteStream | None:
    """The separator concat packing puts after a document: EOS, unless it already ends with one."""
    if separator == "none" or (len(s) and int(s.tokens[-1]) == vocab.EOS):
        return None
    return ByteStream(_EOS.tokens, _EOS.loss_mask, _EOS.modality, id=s.id)  # arrays shared, never written


def with_separator(s: ByteStream, separator: str) -> ByteStream:
    """A document as concat packing lays it down: the stream, then its separator (if any)."""
    sep = separator_of(s, separator)
    return s if sep is None else ByteStream.concat([s, sep], id=s.id)


class Concat:
    """Concat-and-chunk with the provenance of every row, so a position inside it can be stored.

    Documents arrive as ``(j, stream)``; document ``j``'s tokens are :func:`with_separator` of its stream.
    A row is described by its pieces ``(j, a, b)``: tokens ``a:b`` of document ``j``. ``parts`` (the
    leftover of fewer than ``seq_len`` tokens, as ``[j, a, b, stream, base]``: ``stream`` holds document ``j``'s
    tokens from ``base`` on) is up to date whenever a row is yielded, and a ``Concat`` built with ``parts``
    continues exactly where that one stood.
    """

    def __init__(self, seq_len: int, separator: str = "eos", parts: list | None = None):
        self.seq_len, self.separator = seq_len, separator
        self.parts: list[list] = parts if parts is not None else []
        self.held = sum(p[2] - p[1] for p in self.parts)

    @staticmethod
    def row(pieces: list[ByteStream]) -> ByteStream:
        return pieces[0] if len(pieces) == 1 else ByteStream.concat(pieces, id=pieces[0].id)

    def _cut(self, n: int) -> tuple[list[tuple[int, int, int]], ByteStream]:
        refs, pieces = [], []
        self.held -= n
        while n:
            part = self.parts[0]
            j, a, b, stream, base = part
            take = min(n, b - a)
            refs.append((j, a, a + take))
            pieces.append(stream[a - base:a - base + take])
            n -= take
            if a + take == b:
                self.parts.pop(0)
            else:
                part[1] = a + take
        return refs, self.row(pieces)

    def run(self, docs: Iterable[tuple[int, ByteStream]], keep_tail: bool = False) -> Iterator[tuple[list, ByteStream]]:
        """``(pieces, row)`` for each row of exactly ``seq_len`` tokens (and the short tail if ``keep_tail``)."""
        L = self.seq_len
        while self.held >= L:  # rows still in a restored leftover come before the next document
            yield self._cut(L)
        for j, s in docs:
            n = len(s)
            if n:
                self.parts.append([j, 0, n, s, 0])
            sep = separator_of(s, self.separator)
            if sep is not None:
                self.parts.append([j, n, n + 1, sep, n])
                n += 1
            self.held += n
            while self.held >= L:
                yield self._cut(L)
        if keep_tail and self.held:
            yield self._cut(self.held)


def concat_rows(streams: Iterable[ByteStream], seq_len: int, separator: Literal["eos", "none"] = "eos",
                keep_tail: bool = False) -> Iterator[ByteStream]:
    """Concatenate documents (with separators) and cut rows of exactly ``seq_len`` tokens."""
    for _, row in Concat(seq_len, separator).run(enumerate(streams), keep_tail):
        yield row


class Shuffle:
    """Buffer shuffle (webdataset-style): hold ``buffer`` items, emit a random one as each new one comes.

    Its state is the held items and the generator: both are up to date whenever an item is yielded, and a
    ``Shuffle`` built with them (``held``, a generator in the same state) continues the same sequence.
    """

    def __init__(self, buffer: int, rng: np.random.Generator, held: list | None = None):
        self.buffer, self.rng = buffer, rng
        self.held: list = held if held is not None else []

    def run(self, items: Iterable) -> Iterator:
        held, rng = self.held, self.rng
        if self.buffer <= 1:
            yield from items
            return
        for item in items:
            if len(held) < self.buffer:
                held.append(item)
                continue
            k = int(rng.integers(len(held)))
            held[k], item = item, held[k]
            yield item
        while held:
            k = int(rng.integers(len(held)))
            held[k], held[-1] = held[-1], held[k]
            yield held.pop()
