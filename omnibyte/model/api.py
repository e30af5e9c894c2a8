"""The model contract: what training, evaluation and generation need from any registered model.

Every model in :data:`omnibyte.registry.MODELS` subclasses :class:`StreamModel`. The engine and the tasks
use only these members, never ``hasattr`` probes:

* ``stream_meta`` (:class:`StreamMeta`): vocabulary, padding multiple, length bound, token-contract version,
  and whether the model gives per-token losses (byte language models do; a classifier does not).
* ``batch_loss(batch) -> LossOutput``: the training objective over a :class:`~omnibyte.stream.Batch`.
  Byte LMs inherit the default, masked next-byte cross-entropy of :meth:`nll`; a classifier overrides it.
* ``nll(tokens) -> (B, L)`` fp32 nats of ``-log p(tokens[t] | tokens[<t])``: byte LMs only.
* ``score(prefix, candidates) -> (K,)`` log-likelihood (nats) of each candidate continuation of one prefix
  (closed-set ranking, e.g. VQA answers); ``score_batch(prefixes, candidates) -> (B, K)`` the same for many
  prefixes at once (default: a loop over ``score``; fast paths must equal it).
* ``generate(prompt, max_new_bytes, ...) -> (B, <= max_new_bytes)`` new tokens.

``forward`` is the model's own business (an MBLM returns logits); the engine calls ``batch_loss`` through
:class:`omnibyte.loss.LossModule`, the module that DDP / FSDP2 wrap, so their hooks run around the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..vocab import CONTRACT_VERSION


@dataclass(frozen=True)
class StreamMeta:
    vocab_size: int
    patch_product: int = 1  # inputs are padded to a multiple of this
    max_len: int | None = None  # longest stream the model accepts (None: unbounded)
    contract_version: int = CONTRACT_VERSION
    per_token_losses: bool = True  # nll() gives per-token losses (False: e.g. a classifier)
    # routes tokens by their modality track (modality-aware blocks): nll/forward/score/generate need modality=
    modality_aware: bool = False


class StreamModel(nn.Module):
    """Base class of every registered model (see the module docstring for the contract)."""

    stream_meta: StreamMeta

    def batch_loss(self, batch):
        """The training objective over a batch (:class:`~omnibyte.loss.LossOutput`); default: masked
        next-byte cross-entropy of :meth:`nll` weighted by ``batch.loss_mask``, per modality."""
        from ..loss import compute_loss

        return compute_loss(self, batch.tokens, batch.loss_mask, batch.modality)

    def nll(self, tokens: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """(B, L) fp32 nats of ``-log p(tokens[t] | tokens[<t])``."""
        raise NotImplementedError(f"{type(self).__name__} gives no per-token losses "
                                  f"(stream_meta.per_token_losses is False)")

    def score(self, prefix, candidates: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-likelihood (nats) of each candidate continuation (token lists) of ``prefix`` (1-D tokens)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement score()")

    def score_batch(self, prefixes, candidates: Sequence[Sequence[int]], modalities=None) -> torch.Tensor:
        """(B, K) log-likelihoods of every candidate after each of ``prefixes`` (1-D token tensors of any
        lengths): row b = ``score(prefixes[b], candidates)``. Models override it with a batched path that must
        equal this one (closed-set VQA ranks every question of a batch at once). ``modalities``: the prefixes'
        modality tracks, for models with ``stream_meta.modality_aware`` (passed on as ``score(..., modality=)``)."""
        if modalities is not None:
            rows = [self.score(p, candidates, modality=m) for p, m in zip(prefixes, modalities, strict=True)]
        else:
            rows = [self.score(p, candidates) for p in prefixes]
        return torch.stack(rows) if rows else torch.zeros(0, len(candidates))

    def generate(self, prompt, max_new_bytes: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 stop_tokens=(), generator: torch.Generator | None = None, **options) -> torch.Tensor:
        """Up to ``max_new_bytes`` new tokens after ``prompt`` ((B, P) LongTensor, list[int] or bytes)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement generate()")

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


__all__ = ["StreamMeta", "StreamModel"]
