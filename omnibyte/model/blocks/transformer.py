"""Transformer stage block: pre-norm, RMSNorm, RoPE (or learned positions), SwiGLU, causal SDPA.

``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=True`` picks the flash / cuDNN /
memory-efficient kernels on H100 (the reference falls back to math attention on anything but an A100).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Node
from ...registry import STAGES
from ..cache import BlockCache
from ..layers import RMSNorm, apply_rope, init_linear, rope_table, scaled_std
from .experts import (
    ExpertLinear,
    ExpertRMSNorm,
    ExpertsOption,
    ExpertSwiGLU,
    ModalityAware,
    Routing,
    norm_then,
    normalize_groups,
    num_experts,
)


class Attention(nn.Module):
    max_batch = 16384  # sequences per attention kernel call (see forward)
    short = 32  # sequences up to this length use matrix-product attention (see forward)
    # "flex": compiled CUDA layers pack them into FlexAttention rows (packed_block_mask); "matmul": never
    short_impl = "flex"

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float, rope: bool, rope_base: float,
                 bias: bool, experts: int = 0):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        if experts:  # per-modality QKV and output projections (blocks.experts); attention itself shared
            self.qkv = ExpertLinear(experts, dim, 3 * heads * head_dim, bias)
            self.out = ExpertLinear(experts, heads * head_dim, dim, bias)
        else:
            self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=bias)
            self.out = nn.Linear(heads * head_dim, dim, bias=bias)
        self.dropout = dropout
        self.rope = rope
        self.rope_base = rope_base

    def forward(self, x: torch.Tensor, state: dict | None = None, offset: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, packed=None) -> torch.Tensor:
        """``rope``: the (cos, sin) tables of positions offset..offset+T-1 (the block computes them once for
        all its layers; computed here when not given). ``packed``: see :func:`packed_block_mask`."""
        N, T, _ = x.shape
        qkv = self.qkv(x).view(N, T, 3, self.heads, self.head_dim)  # (N, T, 3, H, hd)
        if packed is not None and state is None and torch.compiler.is_compiling():
            return self.out(self._packed_attention(qkv, rope, offset, *packed))
        return self.out(self.attend(qkv, state, offset, rope))

    def attend(self, qkv: torch.Tensor, state: dict | None, offset: int, rope) -> torch.Tensor:
        """Causal attention of qkv (N, T, 3, H, hd) (continuing ``state``'s keys) -> (N, T, H * hd)."""
        N, T = qkv.shape[:2]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, hd)
        if self.rope:
            cos, sin = rope if rope is not None else rope_table(offset, T, self.head_dim, self.rope_base, qkv.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            if "k" in state:
                k = torch.cat((state["k"], k), dim=2)
                v = torch.cat((state["v"], v), dim=2)
            state["k"], state["v"] = k, v
        S = k.shape[2]
        drop = self.dropout if self.training else 0.0
        if S == T and T <= self.short:
            y = short_causal_attention(q, k, v, drop, self.training)
        elif S == T and N > self.max_batch:
            # CUDA attention kernels put the batch in a grid dimension limited to 65,535 (flash, mem-efficient)
            # and cuDNN fails on very large batches: inner stages of long inputs have millions of sequences
            y = torch.cat([F.scaled_dot_product_attention(q[i:i + self.max_batch], k[i:i + self.max_batch],
                                                          v[i:i + self.max_batch], is_causal=True, dropout_p=drop)
                           for i in range(0, N, self.max_batch)])
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:  # T new queries after S - T cached keys: query i sees keys <= S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=qkv.device).tril(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return y.transpose(1, 2).reshape(N, T, self.heads * self.head_dim)  # (N, T, H*hd)


    def _packed_attention(self, qkv: torch.Tensor, rope, offset: int, block_mask, per_row: int) -> torch.Tensor:
        """Short sequences packed ``per_row`` at a time into rows of FlexAttention with a block-diagonal causal
        mask: one kernel that reads q, k, v once and skips every block outside the diagonal (compiled only)."""
        from torch.nn.attention.flex_attention import flex_attention

        N, T, _, H, hd = qkv.shape
        q, k, v = qkv.unbind(2)  # (N, T, H, hd): RoPE in this layout, no permuted copy first
        if self.rope:
            cos, sin = rope if rope is not None else rope_table(offset, T, hd, self.rope_base, qkv.device)
            q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        rows = lambda t: t.reshape(N // per_row, per_row * T, H, hd).transpose(1, 2)  # noqa: E731
        y = flex_attention(rows(q), rows(k), rows(v), block_mask=block_mask)  # (N / per_row, H, per_row * T, hd)
        return y.transpose(1, 2).reshape(N, T, H * hd)


_BLOCK_MASKS: dict[tuple, object] = {}


@torch.compiler.disable
def packed_block_mask(N: int, T: int, device: torch.device, max_row: int = 2048):
    """(block_mask, per_row) to run N causal sequences of length T as rows of ``per_row`` sequences through
    FlexAttention, or None when N has no suitable divisor (rows must be a multiple of 128 positions)."""
    per_row = next((m for m in range(max_row // T, 0, -1) if N % m == 0 and (m * T) % 128 == 0), None)
    if per_row is None:
        return None
    L = per_row * T
    key = (T, L, str(device))
    if key not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_sequence_causal(b, h, q, kv):
            return (q // T == kv // T) & (kv <= q)

        _BLOCK_MASKS[key] = create_block_mask(same_sequence_causal, None, None, L, L, device=device)
    return _BLOCK_MASKS[key], per_row


def short_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
                           training: bool) -> torch.Tensor:
    """Causal attention as two batched matrix products, for short sequences (inner stages: patches of a
    few bytes, tens of thousands of them per batch). Fused kernels tile 64-128 queries per block, so on
    8-byte patches most of their work is padding: on an H100 (360M config, 8-byte patches) cuDNN's flash
    attention took 4.5 ms per layer, forward + backward. Softmax in fp32."""
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (N, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.float().masked_fill(future, float("-inf")).softmax(-1).to(v.dtype)
    if dropout > 0:
        probs = F.dropout(probs, dropout, training)
    return probs @ v


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    """Pre-norm attention + SwiGLU. Modality-aware (``modality_experts``, Mixture-of-Transformers): both norms,
    QKV, the output projection and the feed-forward per modality; attention runs once over all positions."""

    def __init__(self, dim: int, cfg: TransformerBlock.Config, dropout: float):
        super().__init__()
        E = self.experts = num_experts(cfg)
        head_dim = cfg.head_dim or dim // cfg.heads
        hidden = cfg.mlp_hidden or -(-int(cfg.mlp_ratio * dim) // 64) * 64  # ceil to a multiple of 64
        self.norm1 = ExpertRMSNorm(E, dim, cfg.norm_eps) if E else RMSNorm(dim, cfg.norm_eps)
        self.attn = Attention(dim, cfg.heads, head_dim, dropout, cfg.positions == "rope", cfg.rope_base, cfg.bias,
                              experts=E)
        self.norm2 = ExpertRMSNorm(E, dim, cfg.norm_eps) if E else RMSNorm(dim, cfg.norm_eps)
        self.mlp = ExpertSwiGLU(E, dim, hidden, cfg.bias) if E else SwiGLU(dim, hidden, cfg.bias)
        self.drop = nn.Dropout(dropout)

    @property
    def compile_friendly(self) -> bool:
        """Modality-aware layers stay eager under torch.compile (data-dependent dispatch)."""
        return not self.experts

    def forward(self, x: torch.Tensor, state: dict | None = None, offset: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, packed=None, routing: Routing | None = None
                ) -> torch.Tensor:
        if routing is None:
            x = x + self.drop(self.attn(self.norm1(x), state, offset, rope, packed))
            return x + self.drop(self.mlp(self.norm2(x)))
        a = self.attn
        N, T, _ = x.shape
        qkv = routing.apply(norm_then(self.norm1, a.qkv.expert), x).view(N, T, 3, a.heads, a.head_dim)
        x = x + self.drop(a.out(a.attend(qkv, state, offset, rope), routing))
        return x + self.drop(routing.apply(norm_then(self.norm2, self.mlp.expert), x))


@STAGES.register("transformer")
class TransformerBlock(ModalityAware, nn.Module):
    """A stack of causal Transformer layers over (N, T, D) sequences, with a final RMSNorm."""

    cache_time_dims = {"k": 2, "v": 2}  # the KV cache only grows along time (rolled back by truncation)

    @dataclasses.dataclass(frozen=True)
    class Config(Node):
        name: str = "transformer"
        heads: int = 8  # attention heads (width must divide into them unless head_dim is set)
        head_dim: int = 0  # 0: width // heads
        mlp_ratio: float = 8 / 3  # SwiGLU hidden = ratio * width, rounded to a multiple of 64
        mlp_hidden: int = 0  # explicit SwiGLU hidden size (overrides mlp_ratio)
        positions: Literal["rope", "learned", "none"] = "rope"  # rotary, learned (bounds the length) or none
        rope_base: float = 10000.0  # rotary frequency base
        norm_eps: float = 1e-5  # RMSNorm epsilon
        bias: bool = False  # biases in the attention and MLP projections
        # per-modality norms, QKV, output projection and feed-forward (attention shared): [image, question,
        # answer] or groups [[image], [question, answer]]; unlisted modalities share one more copy
        modality_experts: ExpertsOption = ()

        def __post_init__(self):
            object.__setattr__(self, "modality_experts", normalize_groups(self.modality_experts))
            if self.heads < 1:
                raise ValueError(f"heads must be >= 1, got {self.heads}")
            if self.head_dim and self.head_dim % 2:
                raise ValueError(f"head_dim must be even (RoPE), got {self.head_dim}")

        def check_width(self, width: int) -> None:
            """Raise ValueError (naming ``width`` and ``block.heads``) unless a stage of this width can be built;
            :class:`~omnibyte.model.mblm.StageConfig` calls it, so the error is a config error at parse time."""
            if not self.head_dim and width % self.heads:
                raise ValueError(f"width {width} is not divisible by block.heads {self.heads} "
                                 f"(choose a multiple of heads, or set block.head_dim)")
            hd = self.head_dim or width // self.heads
            if self.positions == "rope" and hd % 2:
                raise ValueError(f"width {width} / block.heads {self.heads} gives an odd head_dim {hd}; RoPE needs "
                                 f"an even one (change width or heads, or set block.head_dim)")

    def __init__(self, config: Config, *, dim: int, layers: int, max_len: int | None = None,
                 dropout: float = 0.0, init_std: float = 0.02):
        super().__init__()
        self.config = config
        self.setup_experts(config)
        if not config.head_dim and dim % config.heads:
            raise ValueError(f"transformer: width {dim} is not divisible by heads {config.heads}; set head_dim")
        hd = config.head_dim or dim // config.heads
        if config.positions == "rope" and hd % 2:
            raise ValueError(f"transformer: RoPE needs an even head_dim, got {hd}")
        self.max_len = max_len if config.positions == "learned" else None
        if config.positions == "learned":
            if not max_len:
                raise ValueError("transformer: positions 'learned' needs the stage length")
            self.pos = nn.Parameter(torch.zeros(max_len, dim))
            nn.init.normal_(self.pos, std=init_std)
        self.layers = nn.ModuleList(TransformerLayer(dim, config, dropout) for _ in range(layers))
        self.norm = RMSNorm(dim, config.norm_eps)
        init_linear(self, init_std)
        for layer in self.layers:
            nn.init.normal_(layer.attn.out.weight, std=scaled_std(init_std, layers))
            nn.init.normal_(layer.mlp.down.weight, std=scaled_std(init_std, layers))
        self.checkpoint_layers = False

    @property
    def unbounded(self) -> bool:
        return self.max_len is None

    def forward(self, x: torch.Tensor, cache: BlockCache | None = None, modality: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x: (N, T, D) -> (N, T, D), causal over T. With ``cache``, x continues the cached positions.
        ``modality``: (N, T) Modality codes routing each input position (modality-aware blocks only)."""
        routing = self.routing(modality, x)
        offset = cache.length if cache is not None else 0
        T = x.shape[1]
        if self.max_len is not None:
            if offset + T > self.max_len:
                raise ValueError(f"transformer with learned positions: sequence of {offset + T} positions "
                                 f"exceeds the stage length {self.max_len}")
            x = x + self.pos[offset:offset + T].to(x.dtype)
        cfg = self.config
        # the RoPE tables once for all layers, as inputs: inside a compiled layer they would otherwise be
        # recomputed per element (cos/sin of every query and key element)
        rope = rope_table(offset, T, cfg.head_dim or x.shape[-1] // cfg.heads, cfg.rope_base, x.device) \
            if cfg.positions == "rope" else None
        packed = None  # compiled layers on CUDA: short sequences through FlexAttention (see Attention)
        if (cache is None and routing is None and x.is_cuda and T <= Attention.short
                and Attention.short_impl == "flex"
                and self.layers and getattr(self.layers[0], "_compiled_call_impl", None) is not None
                and not (self.training and self.layers[0].attn.dropout > 0)):
            packed = packed_block_mask(x.shape[0], T, x.device)
        for i, layer in enumerate(self.layers):
            state = cache.layer(i) if cache is not None else None
            extra = () if routing is None else (routing,)
            if self.checkpoint_layers and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, None, offset, rope, packed, *extra,
                                                      use_reentrant=False)
            else:
                x = layer(x, state, offset, rope, packed, *extra)
        if cache is not None:
            cache.length += T
        return self.norm(x)
