"""Triton kernels for one decode position of a Mamba-2 stage: three launches per layer instead of the compiled
torch step's ~9 (issue 17 item 3; opt-in, ``GraphStepper.ssm_kernels``).

The global stage of the 360M config steps once per 8-byte patch, and that step (25 layers) took ~0.59 ms on an
H100 as compiled torch ops: ~230 small kernels, ~13 MB of weights per layer read at well under half the memory
bandwidth (RESULTS.md, generation). Here each layer of an :class:`~omnibyte.model.blocks.ssm_stack.SSMStack` of
Mamba-2 mixers is

1. :func:`~omnibyte.model.inference.kernels.norm_linear`: RMSNorm(x) @ W_in -> zxbcdt = (z | xBC | dt)
2. ``_ssm_step``, one program per (head, block of ``BLOCK_P`` head channels) x batch row: the depthwise causal
   conv + SiLU of its x channels and of its group's B and C (recomputed by every program from the conv window:
   ``d_conv`` taps of 2 ``d_state`` channels), dt = softplus(dt + dt_bias), the state update
   S = exp(-dt exp(A_log)) S + dt x B^T and y = S C + D x; writes y and the shifted conv window of its x channels;
3. ``_gated_out``: x + W_out @ GatedRMSNorm(y, z) (one norm group, ``norm_before_gate=False``); the programs of
   the first weight block also shift the B / C channels' conv window, which every head's program of kernel 2
   reads, so it can only move once kernel 2 is done;

then, where the layers have an MLP, the Transformer kernels' norm + SwiGLU and down projection + residual. The
weights (read-only) are loaded before the wait on the previous kernel (programmatic dependent launch, as in
:mod:`~omnibyte.model.inference.kernels`); state and activations only after it. Values are rounded to the activation dtype where the torch step
(:func:`~omnibyte.model.inference.graphs._mamba2_layer_step`) rounds them, so the result matches it to rounding
order. Tested on CPU under Triton's interpreter against the torch step, and on CUDA.
"""

from __future__ import annotations

import torch

from ..blocks.mamba2_ref import Mamba2Mixer
from ..blocks.ssm_stack import SSMStack
from . import kernels as K
from .kernels import triton

if triton is not None:
    import triton.language as tl

    from .kernels import _MATVEC, _after_prior, _batch_rows, _prune, _rows, _store_residual

    @triton.jit
    def _window(zx_ptr, conv_ptr, ch, cm, KM1: tl.constexpr, KP: tl.constexpr):
        """Channels ``ch`` (of xBC; mask ``cm``) of one row: the conv window (fp32, (len, KP)), the new value, and
        the window shifted by one with the new value last (in the window's dtype, for the caller to store)."""
        t = tl.arange(0, KP)
        m2 = cm[:, None] & (t < KM1)[None, :]
        win = tl.load(conv_ptr + ch[:, None] * KM1 + t[None, :], mask=m2, other=0.0)
        new = tl.load(zx_ptr + ch, mask=cm, other=0.0)
        winf = win.to(tl.float32)
        shifted = tl.where(t[None, :] == KM1 - 1, new.to(tl.float32)[:, None], 0.0)
        for s in tl.static_range(1, KM1):  # column s moves to s - 1 (in registers: no other thread's store)
            col = tl.sum(tl.where(t[None, :] == s, winf, 0.0), 1)
            shifted = tl.where(t[None, :] == s - 1, col[:, None], shifted)
        return winf, new, shifted.to(win.dtype), m2

    @triton.jit
    def _conv_silu(zx_ptr, conv_ptr, cw_ptr, cb_ptr, ch, cm, KM1: tl.constexpr, KP: tl.constexpr,
                   HAS_CB: tl.constexpr):
        """SiLU(depthwise conv over the window and the new value + bias) of channels ``ch``, rounded like the
        torch step; and the shifted window and its mask (see ``_window``)."""
        winf, new, shifted, m2 = _window(zx_ptr, conv_ptr, ch, cm, KM1, KP)
        t = tl.arange(0, KP)
        w = tl.load(cw_ptr + ch[:, None] * (KM1 + 1) + t[None, :], mask=m2, other=0.0).to(tl.float32)
        wl = tl.load(cw_ptr + ch * (KM1 + 1) + KM1, mask=cm, other=0.0).to(tl.float32)
        dt = new.dtype
        acc = (tl.sum(winf * w, 1) + new.to(tl.float32) * wl).to(dt).to(tl.float32)
        if HAS_CB:
            acc = (acc + tl.load(cb_ptr + ch, mask=cm, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        return (acc * tl.sigmoid(acc)).to(dt).to(tl.float32), shifted, m2

    @triton.jit
    def _softplus(x):
        """F.softplus (threshold 20), without log(1 + tiny) losing the small values."""
        return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))

    @triton.jit
    def _ssm_step(zx_ptr, conv_ptr, cw_ptr, cb_ptr, dtb_ptr, alog_ptr, d_ptr, ssm_ptr, y_ptr,
                  stride_zx, stride_conv, stride_ssm, stride_y,
                  DI: tl.constexpr, CD: tl.constexpr, HPG: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
                  NS: tl.constexpr, NSP: tl.constexpr, BLOCK_P: tl.constexpr, KM1: tl.constexpr,
                  KP: tl.constexpr, HAS_CB: tl.constexpr, PDL: tl.constexpr):
        NPB: tl.constexpr = P // BLOCK_P
        pid, n = tl.program_id(0), tl.program_id(1)
        h = pid // NPB
        g = h // HPG
        pr = (pid % NPB) * BLOCK_P + tl.arange(0, BLOCK_P)
        s = tl.arange(0, NSP)
        sm = s < NS
        st_ptrs = ssm_ptr + n * stride_ssm + h * (P * NS) + pr[:, None] * NS + s[None, :]
        # only after the wait: with PDL the part before it may run ahead of earlier kernels, and a pass with two
        # global steps writes this state in the same graph (read-only weights are all that may load early)
        _after_prior(PDL)
        S = tl.load(st_ptrs, mask=sm[None, :], other=0.0)
        zx = zx_ptr + n * stride_zx
        conv = conv_ptr + n * stride_conv
        cx = h * P + pr
        xm = cx < DI
        xv, xwin, m2 = _conv_silu(zx + DI, conv, cw_ptr, cb_ptr, cx, xm, KM1, KP, HAS_CB)
        tl.store(conv + cx[:, None] * KM1 + tl.arange(0, KP)[None, :], xwin, mask=m2)
        bv, _, _ = _conv_silu(zx + DI, conv, cw_ptr, cb_ptr, DI + g * NS + s, sm, KM1, KP, HAS_CB)
        cv, _, _ = _conv_silu(zx + DI, conv, cw_ptr, cb_ptr, DI + (G + g) * NS + s, sm, KM1, KP, HAS_CB)
        dtp = _softplus(tl.load(zx + DI + CD + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32))
        decay = tl.exp(dtp * -tl.exp(tl.load(alog_ptr + h).to(tl.float32)))
        S = S * decay + (dtp * xv)[:, None] * bv[None, :]
        tl.store(st_ptrs, S, mask=sm[None, :])
        y = tl.sum(S * cv[None, :], 1) + tl.load(d_ptr + h).to(tl.float32) * xv
        tl.store(y_ptr + n * stride_y + cx, y.to(y_ptr.dtype.element_ty), mask=xm)

    # restore_value: autotuning runs the kernel once per candidate config (and times it several times); each run
    # shifts the B / C conv window again, so the autotuner must put the window back after every run
    @triton.autotune(configs=_MATVEC, key=["R", "KI", "N"], prune_configs_by={"early_config_prune": _prune},
                     restore_value=["conv_ptr"])
    @triton.jit
    def _gated_out(y_ptr, zx_ptr, nw_ptr, w_ptr, b_ptr, x_ptr, out_ptr, conv_ptr, R, KI, N, eps,
                   stride_y, stride_zx, stride_x, stride_o, stride_conv, BC0, BCN,
                   HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_BC: tl.constexpr, KM1: tl.constexpr,
                   KP: tl.constexpr, PDL: tl.constexpr, RPP: tl.constexpr, CHUNKED: tl.constexpr,
                   BLOCK_R: tl.constexpr):
        """out[n] = x[n] + round(W_out @ GatedRMSNorm(y[n], z[n])) (z: the first KI values of zx[n])."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rows < R
        w = _rows(w_ptr, rows, rm, KI, BLOCK_K)
        offs = tl.arange(0, BLOCK_K)
        km = offs < KI
        nw = tl.load(nw_ptr + offs, mask=km, other=0.0).to(tl.float32)
        _after_prior(PDL)
        lo, hi = _batch_rows(N, RPP, CHUNKED)
        dt = out_ptr.dtype.element_ty
        for n in range(lo, hi):
            yv = tl.load(y_ptr + n * stride_y + offs, mask=km, other=0.0).to(tl.float32)
            zv = tl.load(zx_ptr + n * stride_zx + offs, mask=km, other=0.0).to(tl.float32)
            gv = yv * zv * tl.sigmoid(zv)
            inv = 1.0 / tl.sqrt(tl.sum(gv * gv, 0) / KI + eps)
            gn = (gv * inv * nw).to(dt).to(tl.float32)
            acc = tl.sum(w.to(tl.float32) * gn[None, :], 1)
            _store_residual(acc, b_ptr, x_ptr + n * stride_x, out_ptr + n * stride_o, rows, rm, HAS_BIAS)
            if pid == 0:  # B / C channels' conv window: every head's ssm program read it; it moves now
                for c0 in range(0, BCN, BLOCK_BC):
                    ch = BC0 + c0 + tl.arange(0, BLOCK_BC)
                    _, _, win, m2 = _window(zx_ptr + n * stride_zx + KI, conv_ptr + n * stride_conv, ch,
                                            ch < BC0 + BCN, KM1, KP)
                    tl.store(conv_ptr + n * stride_conv + ch[:, None] * KM1 + tl.arange(0, KP)[None, :], win,
                             mask=m2)


BLOCK_P = 16  # head channels per ssm program (a head of 64: 4 programs, each its 16 x d_state block of the state)
MAX_STATE = 256  # d_state held whole per program
MAX_CONV = 8  # d_conv - 1 taps of window held per channel


def supports(blk) -> bool:
    """Whether an SSM stage block fits the kernels: Mamba-2 mixers (not modality-aware), one norm group and one
    ngroups-wide B / C group per ``ngroups`` (the gated norm over all of d_inner: ``ngroups == 1``), head width a
    multiple of BLOCK_P or a power of two below it, d_state <= MAX_STATE, d_conv - 1 <= MAX_CONV, widths <=
    ``kernels.MAX_K`` and contiguous weights."""
    if not isinstance(blk, SSMStack) or getattr(blk, "modality_aware", False):
        return False
    for lay in blk.layers:
        m = lay.mixer
        if not isinstance(m, Mamba2Mixer) or getattr(m, "experts", 0):
            return False
        if m.norm.group_size != m.d_inner or m.ngroups != 1:
            return False
        if m.headdim % min(BLOCK_P, m.headdim) or (m.headdim < BLOCK_P and m.headdim & (m.headdim - 1)):
            return False
        if m.d_state > MAX_STATE or m.d_conv - 1 > MAX_CONV or m.d_conv < 2:
            return False
        lins = [m.in_proj, m.out_proj] + ([lay.mlp.gate_up, lay.mlp.down] if lay.mlp is not None else [])
        if max(lin.in_features for lin in lins) > K.MAX_K or not all(lin.weight.is_contiguous() for lin in lins):
            return False
        if not m.conv1d.weight.is_contiguous():
            return False
    return True


def mamba2_ssm(m: Mamba2Mixer, zx: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor:
    """Kernel 2 for a batch: zx (N, d_in_proj) -> y (N, d_inner); updates the x channels' conv window (N, C,
    d_conv - 1) and the fp32 state (N, H, P, n) in place."""
    N = zx.shape[0]
    if not (conv.is_contiguous() and ssm.is_contiguous() and zx.stride(-1) == 1):
        raise ValueError("mamba2_ssm: the conv window and the SSM state must be contiguous")
    y = torch.empty(N, m.d_inner, dtype=zx.dtype, device=zx.device)
    bp = min(BLOCK_P, m.headdim)
    cb = m.conv1d.bias
    _ssm_step[(m.nheads * (m.headdim // bp), N)](
        zx, conv, m.conv1d.weight, cb if cb is not None else m.conv1d.weight, m.dt_bias, m.A_log, m.D, ssm, y,
        zx.stride(0), conv.stride(0), ssm.stride(0), y.stride(0),
        DI=m.d_inner, CD=m.conv_dim, HPG=m.nheads // m.ngroups, G=m.ngroups, P=m.headdim, NS=m.d_state,
        NSP=triton.next_power_of_2(m.d_state), BLOCK_P=bp, KM1=m.d_conv - 1,
        KP=triton.next_power_of_2(m.d_conv - 1), HAS_CB=cb is not None, **K._launch(zx))
    return y


def gated_out_residual(m: Mamba2Mixer, y: torch.Tensor, zx: torch.Tensor, conv: torch.Tensor,
                       x: torch.Tensor) -> torch.Tensor:
    """Kernel 3: x + out_proj(norm(y, z)) (N, D); shifts the B / C channels' conv window."""
    N, KI = y.shape
    R = m.out_proj.weight.shape[0]
    out = torch.empty_like(x)
    b, has_b = K._bias(m.out_proj)
    bcn = 2 * m.ngroups * m.d_state
    _gated_out[K._grid(R, N)](y, zx, m.norm.weight, m.out_proj.weight, b, x, out, conv, R, KI, N, m.norm.eps,
                              y.stride(0), zx.stride(0), x.stride(0), out.stride(0), conv.stride(0), m.d_inner, bcn,
                              HAS_BIAS=has_b, BLOCK_K=K._block_k(KI), BLOCK_BC=min(128, triton.next_power_of_2(bcn)),
                              KM1=m.d_conv - 1, KP=triton.next_power_of_2(m.d_conv - 1), **K._chunks(N),
                              **K._launch(x))
    return out


def ssm_stage_step(blk: SSMStack, x: torch.Tensor, caches: list[dict], fuse: bool = False) -> torch.Tensor:
    """One position through every layer of a Mamba-2 stage block as Triton kernels; x (N, 1, D). Same contract as
    :func:`~omnibyte.model.inference.graphs.ssm_stage_step` (``fuse`` is the torch step's and unused here)."""
    N, _, D = x.shape
    h = x.reshape(N, D).contiguous()
    for lay, c in zip(blk.layers, caches):
        m = lay.mixer
        zx = K.norm_linear(h, lay.norm, m.in_proj)
        y = mamba2_ssm(m, zx, c["conv"], c["ssm"])
        h = gated_out_residual(m, y, zx, c["conv"], h)
        if lay.mlp is not None:
            h = K.mlp_residual(lay, h)
    return blk.norm(h.view(N, 1, D))
