"""The precision policy: bf16 autocast on CUDA by default, fp32 elsewhere (``train.precision``)."""

from __future__ import annotations

import contextlib

import torch


def use_bf16(precision: str, device: torch.device) -> bool:
    """``precision``: auto | bf16 | fp32 (``train.precision``); auto means bf16 on CUDA only."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def autocast(device: torch.device, bf16: bool, cache: bool = True):
    """bf16 autocast when asked for, else nothing. ``cache=False`` re-casts weights at each use (required
    around CUDA-graphed blocks)."""
    if bf16:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()
