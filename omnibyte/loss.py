"""Masked next-byte cross-entropy, bits per byte, per-modality sums.

``logits[:, t]`` predicts ``tokens[:, t]``, so ``loss_mask[:, t]`` weights that prediction. Weights may be
fractional. The loss is ``sum(w * nll) / sum(w)`` (a zero with a gradient path when ``sum(w) == 0``).

Memory: the model computes per-token NLL itself (``model.nll(tokens, chunk_size)``), chunked over the
sequence and checkpointed, so fp32 logits exist for one chunk at a time, forward and backward. Training calls
it through :class:`LossModule` (the module DDP / FSDP2 wrap), so their hooks run around the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import vocab

LN2 = math.log(2.0)


def bits_per_byte(nats: float | torch.Tensor, n: float | torch.Tensor) -> float:
    """Total nats over ``n`` bytes -> bits per byte (nan when n == 0)."""
    nats, n = float(nats), float(n)
    return nats / n / LN2 if n > 0 else float("nan")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backprop: sum(w * nll) / sum(w)
    nats_sum: torch.Tensor  # detached sum(w * nll)
    weight_sum: torch.Tensor  # detached sum(w)
    per_modality: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def bpb(self) -> float:
        return bits_per_byte(self.nats_sum, self.weight_sum)

    def modality_bpb(self) -> dict[int, float]:
        """Bits per byte of each modality that carries loss weight."""
        return {m: bits_per_byte(n, w) for m, (n, w) in self.per_modality.items() if float(w) > 0}


def masked_loss(nll: torch.Tensor, loss_mask: torch.Tensor, modality: torch.Tensor | None = None) -> LossOutput:
    """The masked loss of per-token ``nll`` (B, L) fp32 with ``loss_mask`` (B, L) weights; per-modality sums
    when ``modality`` (B, L) codes are given."""
    w = loss_mask.to(nll.device, torch.float32)
    weighted = nll * w
    nats = weighted.sum()
    wsum = w.sum()
    # sum(w) == 0 gives nats == 0 and a zero gradient here: no host sync to branch on it
    loss = nats / wsum.clamp_min(1e-12)
    per: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if modality is not None:
        # one entry per vocab.Modality code (zero weight where absent): a fixed set of keys, summed with one
        # scatter and no host sync (finding the codes present would sync every micro-batch)
        codes = [int(m) for m in vocab.Modality]
        mod = modality.to(nll.device).long().flatten()
        both = torch.stack((weighted.detach().flatten(), w.detach().flatten()), dim=1)  # (B * L, 2)
        sums = both.new_zeros(max(codes) + 1, 2).index_add_(0, mod.clamp(0, max(codes)), both)
        per = {c: (sums[c, 0], sums[c, 1]) for c in codes}
    return LossOutput(loss=loss, nats_sum=nats.detach(), weight_sum=wsum.detach(), per_modality=per)


def compute_loss(model, tokens: torch.Tensor, loss_mask: torch.Tensor, modality: torch.Tensor | None = None,
                 chunk_size: int | None = None) -> LossOutput:
    """Masked next-byte cross-entropy of a byte LM (a :class:`~omnibyte.model.api.StreamModel`). tokens (B, L)
    long, loss_mask (B, L) float weights, modality (B, L) codes (optional). ``chunk_size``: bytes of the
    sequence per checkpointed chunk (None: model default)."""
    if model.stream_meta.modality_aware:  # routes by the modality track (raises without one)
        return masked_loss(model.nll(tokens.long(), chunk_size, modality=modality), loss_mask, modality)
    return masked_loss(model.nll(tokens.long(), chunk_size), loss_mask, modality)


@torch.no_grad()
def per_token_nll(model, tokens: torch.Tensor, chunk_size: int | None = None,
                  modality: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) float32 nats of each token given the ones before it (evaluation outputs); ``modality``: the
    tokens' modality track (needed by modality-aware models)."""
    if model.stream_meta.modality_aware:
        return model.nll(tokens.long(), chunk_size, modality=modality).float()
    return model.nll(tokens.long(), chunk_size).float()


class LossModule(torch.nn.Module):
    """The module the training loop calls and DDP / FSDP2 wrap: ``forward(batch)`` is the model's
    :meth:`~omnibyte.model.api.StreamModel.batch_loss`, so the wrappers' hooks run around the whole loss.
    Returns plain tensors (``unpack`` makes them a :class:`LossOutput` again)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        out = self.model.batch_loss(batch)
        return out.loss, out.nats_sum, out.weight_sum, dict(out.per_modality)

    @staticmethod
    def unpack(outputs) -> LossOutput:
        loss, nats, weight, per_modality = outputs
        return LossOutput(loss=loss, nats_sum=nats, weight_sum=weight, per_modality=per_modality)
