"""Triton kernels for a static verification segment's local Transformer stage (``graph_verify``, with the
stepper's decode kernels): the rows of a segment -- the positions p0.. of one patch, for each batch row -- go
through the decode kernels of :mod:`~omnibyte.model.inference.kernels` as if they were batch rows, so each weight
block is read once for all of them (a segment costs about one plain step where weight reads are the cost, where
the compiled torch segment was a few small matrix products and many more launches). Per layer:

1. ``norm_linear``: RMSNorm(x) @ W_qkv for every row;
2. ``_kv_write``: the segment's rotated k and v into cache slots p0.. (valid rows only: a segment is padded to a
   patch's worth of rows, the padding computed and ignored);
3. ``_attn_out`` in SEG mode: each row attends to its sequence's slots up to its own position, @ W_out, + x;
4. ``norm_linear`` (SwiGLU) and ``linear_residual`` as in plain decoding.

Tested on CPU under Triton's interpreter against the torch segment, and on CUDA.
"""

from __future__ import annotations

import torch

from . import kernels as K
from .kernels import triton

if triton is not None:
    import triton.language as tl

    from .kernels import _after_prior, _rope

    @triton.jit
    def _kv_write(qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos, SL, L, P, stride_qkv, stride_cn,
                  H: tl.constexpr, HD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_ROPE: tl.constexpr, PDL: tl.constexpr):
        """Row n (position pos + n % SL of cache row n // SL; rows with n % SL >= L are padding): its rotated k and
        its v into that slot."""
        n = tl.program_id(0)
        r = n % SL
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        hdm = (h[:, None] < H) & (d[None, :] < HD) & (r < L)
        pn = tl.minimum(pos + r, P - 1)
        _after_prior(PDL)
        base = qkv_ptr + n * stride_qkv
        k = _rope(base + H * HD, h, d, hdm, cos_ptr + pn * (HD // 2), sin_ptr + pn * (HD // 2), HD, HAS_ROPE)
        v = tl.load(base + 2 * H * HD + h[:, None] * HD + d[None, :], mask=hdm, other=0.0)
        slot = (n // SL) * stride_cn + h[:, None] * (P * HD) + pn * HD + d[None, :]
        tl.store(kc_ptr + slot, k, mask=hdm)
        tl.store(vc_ptr + slot, v, mask=hdm)


def transformer_segment(blk, x: torch.Tensor, caches: list[dict], rope, p0: int, L: int) -> torch.Tensor:
    """Rows of a segment (x: (N, R, D): positions p0..p0+L-1 of each batch row's patch, then R - L padding rows)
    through every layer of a Transformer stage block on its static KV buffers (N, H, P, hd); ``rope``: the (cos,
    sin) tables over the patch's slots (P, hd / 2), or None. (N, R, D), the padding rows' values meaningless."""
    N, R, D = x.shape
    h = x.reshape(N * R, D).contiguous()
    for lay, c in zip(blk.layers, caches):
        qkv = K.norm_linear(h, lay.norm1, lay.attn.qkv)
        kc, vc = c["k"], c["v"]
        K.check_kv(kc, vc, "transformer_segment")  # before _kv_write writes into it
        _, H, P, hd = kc.shape
        cos, sin = rope if rope is not None else (qkv, qkv)
        _kv_write[(N * R,)](qkv, kc, vc, cos, sin, p0, R, L, P, qkv.stride(0), kc.stride(0), H=H, HD=hd,
                            BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(hd),
                            HAS_ROPE=rope is not None, **K._launch(h))
        h = K.mlp_residual(lay, K.attention_out_residual(qkv, kc, vc, rope, p0, lay.attn, h, seg=R))
    return blk.norm(h.view(N, R, D))
