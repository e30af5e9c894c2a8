"""ByteStream (one serialized sample) and Batch (a padded stack of them).

A ByteStream is three aligned arrays of length L:

* ``tokens``    uint16 ids under the token contract (:mod:`omnibyte.vocab`),
* ``loss_mask`` float32 loss weight per token (0 = not trained on; fractional weights are kept),
* ``modality``  uint8 :class:`~omnibyte.vocab.Modality` code per token.

``logits[:, t]`` of a model predicts ``tokens[:, t]``, so ``loss_mask[t]`` weights the prediction of
token ``t`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import vocab
from .vocab import Modality

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class ByteStream:
    tokens: np.ndarray
    loss_mask: np.ndarray
    modality: np.ndarray
    id: str = ""

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | np.ndarray, modality: Modality | int,
                   loss: float = 1.0, id: str = "") -> ByteStream:
        """Wrap raw bytes (zero-copy into uint8, one widening copy into uint16)."""
        raw = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        n = raw.shape[0]
        return cls(
            tokens=raw.astype(np.uint16),
            loss_mask=np.full(n, loss, dtype=np.float32),
            modality=np.full(n, int(modality), dtype=np.uint8),
            id=id,
        )

    @classmethod
    def special(cls, *tokens: int, loss: float = 1.0, modality: Modality | int = Modality.SPECIAL,
                id: str = "") -> ByteStream:
        for t in tokens:
            if not vocab.is_special(t) or t >= vocab.VOCAB_SIZE:
                raise ValueError(f"{t} is not a special token id")
        n = len(tokens)
        return cls(
            tokens=np.asarray(tokens, dtype=np.uint16),
            loss_mask=np.full(n, loss, dtype=np.float32),
            modality=np.full(n, int(modality), dtype=np.uint8),
            id=id,
        )

    @classmethod
    def empty(cls, id: str = "") -> ByteStream:
        return cls(np.zeros(0, np.uint16), np.zeros(0, np.float32), np.zeros(0, np.uint8), id=id)

    @classmethod
    def concat(cls, parts: Iterable[ByteStream], id: str | None = None) -> ByteStream:
        parts = list(parts)
        if not parts:
            return cls.empty(id or "")
        return cls(
            tokens=np.concatenate([p.tokens for p in parts]),
            loss_mask=np.concatenate([p.loss_mask for p in parts]),
            modality=np.concatenate([p.modality for p in parts]),
            id=parts[0].id if id is None else id,
        )

    # --- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, index: slice) -> ByteStream:
        if not isinstance(index, slice):
            raise TypeError("ByteStream supports slicing only; index .tokens for single tokens")
        return ByteStream(self.tokens[index], self.loss_mask[index], self.modality[index], id=self.id)

    def with_loss(self, loss_mask: np.ndarray) -> ByteStream:
        return ByteStream(self.tokens, np.asarray(loss_mask, dtype=np.float32), self.modality, id=self.id)

    def data_bytes(self, modality: Modality | int | None = None) -> bytes:
        """The byte tokens (specials dropped), optionally only those of one modality."""
        keep = self.tokens < vocab.NUM_BYTES
        if modality is not None:
            keep &= self.modality == int(modality)
        return self.tokens[keep].astype(np.uint8).tobytes()

    def spans(self) -> list[tuple[Modality, int, int]]:
        """Maximal runs of equal modality as ``(modality, start, end)`` with ``end`` exclusive."""
        m = self.modality
        if m.shape[0] == 0:
            return []
        cuts = np.flatnonzero(m[1:] != m[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [m.shape[0]]])
        return [(Modality(int(m[s])), int(s), int(e)) for s, e in zip(starts, ends)]

    def validate(self) -> ByteStream:
        """Check dtypes, aligned lengths and id ranges; return self (raises ValueError)."""
        who = f"stream {self.id!r}: " if self.id else "stream: "
        for name, arr, dtype in (("tokens", self.tokens, np.uint16), ("loss_mask", self.loss_mask, np.float32),
                                 ("modality", self.modality, np.uint8)):
            if arr.ndim != 1:
                raise ValueError(f"{who}{name} must be 1-D, got shape {arr.shape}")
            if arr.dtype != dtype:
                raise ValueError(f"{who}{name} must be {np.dtype(dtype).name}, got {arr.dtype}")
        n = len(self)
        if self.loss_mask.shape[0] != n or self.modality.shape[0] != n:
            raise ValueError(f"{who}lengths differ: tokens {n}, loss_mask {self.loss_mask.shape[0]}, "
                             f"modality {self.modality.shape[0]}")
        if n and int(self.tokens.max()) >= vocab.VOCAB_SIZE:
            raise ValueError(f"{who}token id {int(self.tokens.max())} >= vocabulary size {vocab.VOCAB_SIZE}")
        if n and (not np.isfinite(self.loss_mask).all() or float(self.loss_mask.min()) < 0):
            raise ValueError(f"{who}loss_mask must be finite and >= 0")
        if n and int(self.modality.max()) > max(Modality):
            raise ValueError(f"{who}unknown modality code {int(self.modality.max())}")
        return self

    def __repr__(self) -> str:
        spans = ", ".join(f"{m.name.lower()}[{s}:{e}]" for m, s, e in self.spans()[:8])
        more = ", ..." if len(self.spans()) > 8 else ""
        return f"ByteStream(id={self.id!r}, len={len(self)}, spans=[{spans}{more}])"


@dataclass
class Batch:
    """A (B, L) stack of streams as torch tensors.

    ``tokens`` int64, ``loss_mask`` float32, ``modality`` uint8; rows shorter than L are filled with
    ``PAD`` tokens of weight 0 and modality SPECIAL. ``lengths`` holds each row's real length.
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    modality: torch.Tensor
    lengths: torch.Tensor
    ids: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    @classmethod
    def collate(cls, streams: Sequence[ByteStream], length: int | None = None, pad_to_multiple: int = 1,
                meta: Sequence[dict] | None = None) -> Batch:
        """Stack streams, padding (right) to ``length`` or the longest, rounded up to ``pad_to_multiple``.

        A stream longer than ``length`` raises: cropping is the packing policy's job, never silent here.
        """
        import torch

        if not streams:
            raise ValueError("cannot collate an empty list of streams")
        longest = max(len(s) for s in streams)
        L = longest if length is None else length
        if longest > L:
            bad = next(s.id for s in streams if len(s) > L)
            raise ValueError(f"stream {bad!r} has {longest} tokens, more than the batch length {L}")
        L = -(-max(L, 1) // pad_to_multiple) * pad_to_multiple
        B = len(streams)
        tokens = np.full((B, L), vocab.PAD, dtype=np.int64)
        mask = np.zeros((B, L), dtype=np.float32)
        mod = np.zeros((B, L), dtype=np.uint8)
        for i, s in enumerate(streams):
            n = len(s)
            tokens[i, :n] = s.tokens
            mask[i, :n] = s.loss_mask
            mod[i, :n] = s.modality
        return cls(
            tokens=torch.from_numpy(tokens),
            loss_mask=torch.from_numpy(mask),
            modality=torch.from_numpy(mod),
            lengths=torch.tensor([len(s) for s in streams], dtype=torch.int64),
            ids=[s.id for s in streams],
            meta=list(meta) if meta is not None else [{} for _ in streams],
        )

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            loss_mask=self.loss_mask.to(device, non_blocking=non_blocking),
            modality=self.modality.to(device, non_blocking=non_blocking),
            lengths=self.lengths,
            ids=self.ids,
            meta=self.meta,
        )

    def pin_memory(self) -> Batch:
        return Batch(self.tokens.pin_memory(), self.loss_mask.pin_memory(), self.modality.pin_memory(),
                     self.lengths, self.ids, self.meta)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])
