"""Small building blocks shared by the stage blocks: RMSNorm, rotary embeddings, init helpers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight in the input's dtype: under autocast a dtype mismatch disables the fused kernel
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, head_dim/2) in fp32 for integer ``positions`` (T,)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.to(torch.float32)[:, None] * inv[None, :]  # (T, hd/2)
    return ang.cos(), ang.sin()


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@torch.compiler.disable
def rope_table(offset: int, length: int, head_dim: int, base: float, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of positions offset..offset+length-1, memoised (a few distinct lengths per model);
    kept out of compiled graphs so they are inputs there, not recomputed per element."""
    key = (offset, length, head_dim, base, str(device))
    tab = _ROPE_TABLES.get(key)
    if tab is None:
        if len(_ROPE_TABLES) > 256:  # e.g. prefill offsets of many prompts
            _ROPE_TABLES.clear()
        with torch.inference_mode(False):  # usable by autograd later even if first made under inference mode
            tab = rope_cos_sin(torch.arange(offset, offset + length, device=device), head_dim, base)
        _ROPE_TABLES[key] = tab
    return tab


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim; x: (N, H, T, hd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def init_linear(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():  # nn.Linear and stacked per-modality ones (blocks.experts.ExpertLinear)
        if isinstance(m, nn.Linear) or getattr(m, "is_expert_linear", False):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def scaled_std(std: float, layers: int) -> float:
    """Residual-branch output projections are scaled down by sqrt(2 * layers) (GPT-2 style)."""
    return std / math.sqrt(2 * max(1, layers))
