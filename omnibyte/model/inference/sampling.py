"""Sampling one token per row from logits, and prompt normalisation shared by the decoders."""

from __future__ import annotations

import torch


def as_batch(prompt, device) -> torch.Tensor:
    if isinstance(prompt, (bytes, bytearray)):
        prompt = list(prompt)
    if isinstance(prompt, torch.Tensor):
        t = prompt.to(device=device, dtype=torch.long)
    else:
        t = torch.tensor(list(prompt), dtype=torch.long, device=device)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"prompt must be (B, P) or 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"prompt: a batch of no rows (shape {tuple(t.shape)}); give at least one row (a row may be "
                         f"empty: shape (B, 0))")
    return t


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (N, V) -> (N,) ids. temperature 0 = argmax; top_k / top_p (nucleus) filtering."""
    if temperature <= 0:
        return logits.float().argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution :func:`sample` draws from, (..., V) fp32: logits / temperature, then the top-k
    filter, then the nucleus (top-p) filter, then softmax. temperature 0: one-hot at the argmax. Speculative
    decoding applies it to the target's and the drafter's logits alike."""
    shape = logits.shape
    logits = logits.float().reshape(-1, shape[-1])
    if temperature <= 0:
        out = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return out.view(shape)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        remove = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    return logits.softmax(-1).view(shape)
