"""Triton kernels for one decode position of a Transformer stage: four kernel launches per layer.

At batch 1 a layer's step is four matrix-vector products plus a little elementwise work, and the cost is
launches and poorly streamed weights rather than arithmetic: compiled with torch.compile the step of the 360M
config's local layer took ~11 kernels and ~26 us on an H100 (RESULTS.md). Here each layer is

1. ``_norm_matvec``: RMSNorm(x) @ W_qkv                                   -> qkv
2. ``_attn_out``: RoPE(q, k), attention over the cached slots + the new one, @ W_out, + x -> x1; program 0
   also writes the rotated k and v into the cache slot ``pos``
3. ``_norm_matvec`` (SWIGLU): silu(RMSNorm(x1) @ W_gate) * (RMSNorm(x1) @ W_up) -> g
4. ``_matvec_residual``: x1 + g @ W_down                                   -> x2

Every kernel is a grid of (row blocks of its weight) x (chunks of ``ROW_CHUNK`` batch rows); a program loads its
weight block once and loops over its chunk's rows (so a batch of up to ``ROW_CHUNK`` rows reads the weights once,
not N times; a larger batch is split into chunks that read the same block, mostly from L2, in parallel, where one
program used to loop over every row). The stepper uses the kernels by default up to ``MAX_ROWS`` rows (measured),
and at any batch size when asked (``GraphStepper(..., kernels=True)``). Each program recomputes what it needs from
the small input vectors (the norm of x, the attention of all heads over <= P slots: a few KB from L2) so no kernel
waits on another program. Intermediate values are rounded to the activation dtype where the torch step rounds them
(norm output, projections, RoPE, attention output), so the result matches ``generation.transformer_stage_step`` to
rounding order. On Hopper and newer the launches are chained with programmatic dependent launch (see
``_after_prior``).

Tested on CPU with Triton's interpreter (``TRITON_INTERPRET=1``) against the torch step, and on CUDA.
Block sizes are autotuned per weight shape on the first call (before CUDA-graph capture).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (CUDA with Triton, or any device under the interpreter)."""
    return triton is not None and (device.type == "cuda" or _INTERPRET)


MAX_K = 4096  # each program holds whole rows of its weight block (input widths up to this)
# GraphStepper uses the kernels by default up to this batch size (larger: kernels=True). A program loops over its
# rows one after another, so a step's time grows by ~0.12 ms a row (H100, 360M config: 0.41 ms at batch 1, 0.75 at 4,
# 2.25 at 16), where the torch step's matrix products took 0.96 ms at 16 rows (2.3x the kernels' total bytes/s).
# From 8 rows the torch step wins (0.96 ms at 16 is under the kernels' ~1.2 ms at 8). At 4 the torch step with
# matrix-product linears is not measured yet, so the crossover (between 2 and 8 rows) is open: 4 keeps the
# kernels where they measured well (benchmarks/RESULTS.md, eleventh session).
MAX_ROWS = 4


def by_default(rows: int) -> bool:
    """Whether a decode step (GraphStepper: its batch) or a verification segment (StaticVerifier: batch x patch
    rows) of ``rows`` rows takes these kernels when nobody chose: the one place the measured crossover is applied."""
    return rows <= MAX_ROWS


ROW_CHUNK = 16  # batch rows per program (a larger batch: more programs per weight block, grid axis 1)


def _configs(pairs):
    """Autotune candidates (BLOCK_R rows per program, warps). Under the interpreter (which cannot time kernels)
    one block of 16 rows, so the tests' tiny shapes still take several row blocks with a ragged end."""
    if _INTERPRET:
        pairs = [(16, 4)]
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r, w in pairs]


def _prune(configs, named_args, **kwargs):
    """Drop blocks that would hold more than 64 weight elements per thread (register spills)."""
    bk = kwargs.get("BLOCK_K") or named_args.get("BLOCK_K") or 1
    keep = [c for c in configs if c.kwargs["BLOCK_R"] * bk <= 64 * 32 * c.num_warps]
    return keep or configs[:1]


if triton is not None:
    _MATVEC = _configs([(r, w) for r in (1, 2, 4, 8) for w in (2, 4, 8)])
    _ATTN = _configs([(r, w) for r in (1, 2, 4, 8) for w in (4, 8)])

    # Each program loads its whole weight block first, as one tile (whole rows: BLOCK_K = next power of 2 of
    # the input width), and only then the small input vector: the weight stream, which is the kernel's cost,
    # is in flight while the norm and the attention are computed. (A loop over K chunks after the norm's own
    # pass over x measured ~40% of HBM bandwidth on an H100: each step waited for the one before.)

    @triton.jit
    def _after_prior(PDL: tl.constexpr):
        """With programmatic dependent launch (PDL): let the next kernel start (its programs begin loading
        their weights), then wait until the previous kernel has finished; everything it wrote is read after."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _batch_rows(N, RPP: tl.constexpr, CHUNKED: tl.constexpr):
        """The batch rows [lo, hi) this program loops over: its chunk of RPP rows (grid axis 1) when CHUNKED (a
        batch over RPP rows), else every row, as one program did before chunks (the batch-1 path unchanged)."""
        if CHUNKED:
            return tl.program_id(1) * RPP, tl.minimum(tl.program_id(1) * RPP + RPP, N)
        return 0, N

    @triton.jit
    def _normed(x_ptr, g_ptr, K, eps, BLOCK_K: tl.constexpr):
        """RMSNorm of the row at x_ptr (width K) in fp32, rounded to x's dtype like F.rms_norm's output."""
        offs = tl.arange(0, BLOCK_K)
        km = offs < K
        xv = tl.load(x_ptr + offs, mask=km, other=0.0)
        xf = xv.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / K + eps)
        gv = tl.load(g_ptr + offs, mask=km, other=0.0).to(tl.float32)
        return (xf * inv * gv).to(xv.dtype).to(tl.float32)

    @triton.jit
    def _rows(w_ptr, rows, rm, K, BLOCK_K: tl.constexpr):
        offs = tl.arange(0, BLOCK_K)
        return tl.load(w_ptr + rows[:, None] * K + offs[None, :], mask=rm[:, None] & (offs < K)[None, :],
                       other=0.0)

    @triton.jit
    def _store_residual(acc, b_ptr, x_ptr, out_ptr, rows, rm, HAS_BIAS: tl.constexpr):
        """out[rows] = x[rows] + round(acc + bias[rows]) (x_ptr, out_ptr: this batch row), rounded like torch's
        ``x + linear(...)`` in the activation dtype."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        xv = tl.load(x_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, (xv + acc.to(dt).to(tl.float32)).to(dt), mask=rm)

    @triton.autotune(configs=_MATVEC, key=["R", "K", "N", "SWIGLU"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _norm_matvec(x_ptr, g_ptr, w_ptr, b_ptr, out_ptr, R, K, N, eps, stride_x, stride_o,
                     HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, SWIGLU: tl.constexpr,
                     RPP: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[n, j] = W[j] . n(x[n]) for j < R; SWIGLU: out[n, j] = silu(gate) * up with gate = W[j] . n(x[n])
        and up = W[R + j] . n(x[n]) (R = the hidden size, W = [W_gate; W_up])."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rows < R
        w = _rows(w_ptr, rows, rm, K, BLOCK_K)
        if SWIGLU:
            wu = _rows(w_ptr, rows + R, rm, K, BLOCK_K)
        _after_prior(PDL)
        dt = out_ptr.dtype.element_ty
        lo, hi = _batch_rows(N, RPP, CHUNKED)
        for n in range(lo, hi):  # the weight block is read once for the chunk's rows
            xn = _normed(x_ptr + n * stride_x, g_ptr, K, eps, BLOCK_K)
            y = tl.sum(w.to(tl.float32) * xn[None, :], 1)
            if HAS_BIAS:
                y += tl.load(b_ptr + rows, mask=rm, other=0.0).to(tl.float32)
            if SWIGLU:
                up = tl.sum(wu.to(tl.float32) * xn[None, :], 1)
                if HAS_BIAS:
                    up += tl.load(b_ptr + R + rows, mask=rm, other=0.0).to(tl.float32)
                gate = y.to(dt).to(tl.float32)
                y = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32) * up.to(dt).to(tl.float32)
            tl.store(out_ptr + n * stride_o + rows, y.to(dt), mask=rm)

    @triton.autotune(configs=_MATVEC, key=["R", "K", "N"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _matvec_residual(h_ptr, w_ptr, b_ptr, x_ptr, out_ptr, R, K, N, stride_h, stride_x, stride_o,
                         HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, RPP: tl.constexpr,
                         CHUNKED: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[n] = x[n] + round(W @ h[n])."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rows < R
        w = _rows(w_ptr, rows, rm, K, BLOCK_K)
        offs = tl.arange(0, BLOCK_K)
        _after_prior(PDL)
        lo, hi = _batch_rows(N, RPP, CHUNKED)
        for n in range(lo, hi):
            hv = tl.load(h_ptr + n * stride_h + offs, mask=offs < K, other=0.0).to(tl.float32)
            acc = tl.sum(w.to(tl.float32) * hv[None, :], 1)
            _store_residual(acc, b_ptr, x_ptr + n * stride_x, out_ptr + n * stride_o, rows, rm, HAS_BIAS)

    @triton.jit
    def _rope(ptr, h, d, hdm, cos_ptr, sin_ptr, HD: tl.constexpr, HAS_ROPE: tl.constexpr):
        """Load (H, hd) rows at ``ptr`` and rotate (first half, second half) pairs like layers.apply_rope."""
        x = tl.load(ptr + h[:, None] * HD + d[None, :], mask=hdm, other=0.0)
        if HAS_ROPE:
            half: tl.constexpr = HD // 2
            first = d < half
            partner = tl.where(first, d + half, d - half)
            xp = tl.load(ptr + h[:, None] * HD + partner[None, :], mask=hdm, other=0.0).to(tl.float32)
            c = tl.load(cos_ptr + (d % half), mask=d < HD, other=0.0)
            s = tl.load(sin_ptr + (d % half), mask=d < HD, other=0.0)
            sign = tl.where(first, -1.0, 1.0)
            x = (x.to(tl.float32) * c[None, :] + sign[None, :] * xp * s[None, :]).to(x.dtype)
        return x

    @triton.autotune(configs=_ATTN, key=["R", "P", "N", "SEG"])
    @triton.jit
    def _attn_out(qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, w_ptr, b_ptr, x_ptr, out_ptr, pos, R, N, P, scale,
                  stride_qkv, stride_cn, stride_x, stride_o, SL,
                  H: tl.constexpr, HD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_P: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
                  RPP: tl.constexpr, CHUNKED: tl.constexpr, SEG: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[n] = x[n] + round(W_out @ attention(n)); the cache is (N, H, P, hd) contiguous, slots < pos valid.
        SEG (a verification segment, ``segment_kernels``): row n is position pos + n % SL of cache row n // SL
        (clamped to the last slot), whose k and v are already in the cache: it attends to slots <= its position,
        and the rope tables (cos, sin) are per slot (P, hd / 2), not one row."""
        pid = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        hdm = (h[:, None] < H) & (d[None, :] < HD)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rows < R
        w = tl.load(w_ptr + rows[:, None, None] * (H * HD) + h[None, :, None] * HD + d[None, None, :],
                    mask=rm[:, None, None] & hdm[None, :, :], other=0.0)  # (BLOCK_R, H, hd), first
        _after_prior(PDL)
        p = tl.arange(0, BLOCK_P)
        dt = out_ptr.dtype.element_ty
        lo, hi = _batch_rows(N, RPP, CHUNKED)
        for n in range(lo, hi):
            base = qkv_ptr + n * stride_qkv
            if SEG:  # this row's sequence and position; its k, v and those before it are in the cache
                seq = n // SL
                pn = tl.minimum(pos + n % SL, P - 1)
                cs = cos_ptr + pn * (HD // 2)
                sn_ = sin_ptr + pn * (HD // 2)
                lim = pn + 1  # cached slots read: up to this position
            else:
                seq = n
                cs = cos_ptr
                sn_ = sin_ptr
                lim = pos  # cached slots read: those before the new position
            q = _rope(base, h, d, hdm, cs, sn_, HD, HAS_ROPE).to(tl.float32)
            slot = seq * stride_cn + h[:, None, None] * (P * HD) + p[None, :, None] * HD + d[None, None, :]
            cm = hdm[:, None, :] & (p[None, :, None] < lim)
            kc = tl.load(kc_ptr + slot, mask=cm, other=0.0).to(tl.float32)  # (H, P, hd)
            vc = tl.load(vc_ptr + slot, mask=cm, other=0.0).to(tl.float32)
            sc = tl.sum(q[:, None, :] * kc, 2) * scale  # (H, P)
            sc = tl.where(p[None, :] < lim, sc, float("-inf"))
            if SEG:
                mx = tl.max(sc, 1)
                e = tl.exp(sc - mx[:, None])
                y = tl.sum(e[:, :, None] * vc, 1) / tl.sum(e, 1)[:, None]
            else:
                k = _rope(base + H * HD, h, d, hdm, cs, sn_, HD, HAS_ROPE)
                v = tl.load(base + 2 * H * HD + h[:, None] * HD + d[None, :], mask=hdm, other=0.0)
                sn = tl.sum(q * k.to(tl.float32), 1) * scale  # (H,) the new position
                mx = tl.maximum(tl.max(sc, 1), sn)
                e = tl.exp(sc - mx[:, None])
                en = tl.exp(sn - mx)
                y = (tl.sum(e[:, :, None] * vc, 1) + en[:, None] * v.to(tl.float32)) / (tl.sum(e, 1) + en)[:, None]
                if pid == 0:  # the new slot, read by later positions (slots < pos are all this program reads);
                    # one program per chunk of rows writes its rows
                    new = n * stride_cn + h[:, None] * (P * HD) + pos * HD + d[None, :]
                    tl.store(kc_ptr + new, k, mask=hdm)
                    tl.store(vc_ptr + new, v, mask=hdm)
            y = y.to(dt).to(tl.float32)  # (H, hd)
            acc = tl.sum(tl.sum(w.to(tl.float32) * y[None, :, :], 2), 1)
            _store_residual(acc, b_ptr, x_ptr + n * stride_x, out_ptr + n * stride_o, rows, rm, HAS_BIAS)


def _chunks(N: int) -> dict:
    """The kernels' row-chunk constants for a batch of N rows (CHUNKED only over ROW_CHUNK: the path of up to
    ROW_CHUNK rows, batch 1 included, compiles as before chunks)."""
    return {"RPP": ROW_CHUNK, "CHUNKED": N > ROW_CHUNK}


def _grid(R: int, N: int):
    return lambda meta: (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(N, ROW_CHUNK))


use_pdl = True  # programmatic dependent launch on Hopper and newer (see _after_prior); False to compare


@functools.cache
def _pdl_supported(device: torch.device) -> bool:
    if _INTERPRET or device.type != "cuda" or torch.version.hip is not None:  # griddepcontrol is NVIDIA PTX
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:  # Hopper and newer
        return False
    try:
        import triton.language.extra.cuda as tlc
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return hasattr(tlc, "gdc_wait") and "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}


def _launch(x: torch.Tensor) -> dict:
    """PDL flag (constexpr) and launch option for kernels on ``x``'s device."""
    if use_pdl and _pdl_supported(x.device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def _block_k(K: int) -> int:
    if K > MAX_K:
        raise NotImplementedError(f"decode kernels: input width {K} > {MAX_K}")
    return triton.next_power_of_2(K)


def supports(blk) -> bool:
    """Whether a Transformer stage block fits the kernels: layer widths <= MAX_K (whole rows per program) and
    contiguous weights (the kernels index rows as ``row * width``). Never modality-aware blocks (one weight set)."""
    if getattr(blk, "modality_aware", False):
        return False
    for lay in blk.layers:
        lins = (lay.attn.qkv, lay.attn.out, lay.mlp.gate_up, lay.mlp.down)
        if max(lin.in_features for lin in lins) > MAX_K or not all(lin.weight.is_contiguous() for lin in lins):
            return False
    return True


def _bias(lin):
    return (lin.bias, True) if lin.bias is not None else (lin.weight, False)  # any pointer when absent


def norm_linear(x: torch.Tensor, norm, lin, swiglu: bool = False) -> torch.Tensor:
    """lin(norm(x)) for x (N, K) -> (N, R); ``swiglu``: silu(gate) * up of the two halves of ``lin(norm(x))``
    (a SwiGLU's ``gate_up``), (N, hidden)."""
    N, K = x.shape
    R = lin.weight.shape[0] // (2 if swiglu else 1)
    out = torch.empty(N, R, dtype=x.dtype, device=x.device)
    b, has_b = _bias(lin)
    _norm_matvec[_grid(R, N)](x, norm.weight, lin.weight, b, out, R, K, N, norm.eps, x.stride(0), out.stride(0),
                              HAS_BIAS=has_b, BLOCK_K=_block_k(K), SWIGLU=swiglu, **_chunks(N), **_launch(x))
    return out


def linear_residual(h: torch.Tensor, lin, x: torch.Tensor) -> torch.Tensor:
    """x + lin(h); h (N, K), x (N, R)."""
    N, K = h.shape
    R = lin.weight.shape[0]
    out = torch.empty_like(x)
    b, has_b = _bias(lin)
    _matvec_residual[_grid(R, N)](h, lin.weight, b, x, out, R, K, N, h.stride(0), x.stride(0), out.stride(0),
                                  HAS_BIAS=has_b, BLOCK_K=_block_k(K), **_chunks(N), **_launch(x))
    return out


def check_kv(kc: torch.Tensor, vc: torch.Tensor, who: str) -> None:
    """The kernels index the KV cache as contiguous (N, H, P, hd): a ValueError naming ``who`` otherwise."""
    if not (kc.is_contiguous() and vc.is_contiguous()):
        raise ValueError(f"{who}: the KV cache must be contiguous (N, H, P, hd)")


def attention_out_residual(qkv: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, rope, pos: int, attn,
                           x: torch.Tensor, seg: int = 0) -> torch.Tensor:
    """x + attn.out(attention of the new position ``pos`` over cache slots < pos and itself); writes the new
    (rotated) k and v into slot ``pos`` of ``kc``/``vc`` (N, H, P, hd). ``rope``: (cos, sin) (1, hd/2) or None.
    ``seg`` > 0 (a verification segment, :mod:`~omnibyte.model.inference.segment_kernels`): the rows of qkv / x
    are ``seg`` per cache row, row n at position pos + n % seg, its k and v already in the cache (nothing written);
    ``rope`` is then the tables over all P slots."""
    _, H, P, hd = kc.shape
    N = x.shape[0]
    check_kv(kc, vc, "attention_out_residual")
    if not 0 <= pos < P:
        raise ValueError(f"attention_out_residual: position {pos} outside the cache of {P} slots")
    R = attn.out.weight.shape[0]
    out = torch.empty_like(x)
    b, has_b = _bias(attn.out)
    cos, sin = rope if rope is not None else (qkv, qkv)
    _attn_out[_grid(R, N)](qkv, kc, vc, cos, sin, attn.out.weight, b, x, out, pos, R, N, P, hd ** -0.5,
                        qkv.stride(0), kc.stride(0), x.stride(0), out.stride(0), max(seg, 1), H=H, HD=hd,
                        BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(hd),
                        BLOCK_P=triton.next_power_of_2(P), HAS_ROPE=rope is not None, HAS_BIAS=has_b,
                        SEG=seg > 0, **_chunks(N), **_launch(x))
    return out


def mlp_residual(lay, h: torch.Tensor) -> torch.Tensor:
    """h + lay.mlp(lay.norm2(h)) (a SwiGLU) as two kernels: norm + gate/up + SiLU gating, then down + residual."""
    return linear_residual(norm_linear(h, lay.norm2, lay.mlp.gate_up, swiglu=True), lay.mlp.down, h)


def transformer_stage_step(blk, x: torch.Tensor, caches: list[dict], rope, pos: int) -> torch.Tensor:
    """One position through every layer of a Transformer stage block on static KV buffers, as four Triton
    kernel launches per layer; x (N, 1, D). Same contract as ``generation.transformer_stage_step`` with the position
    given as an int (each CUDA graph of the stepper serves one position)."""
    N, _, D = x.shape
    h = x.reshape(N, D).contiguous()
    for lay, c in zip(blk.layers, caches):
        qkv = norm_linear(h, lay.norm1, lay.attn.qkv)
        h = mlp_residual(lay, attention_out_residual(qkv, c["k"], c["v"], rope, pos, lay.attn, h))
    return blk.norm(h.view(N, 1, D))
