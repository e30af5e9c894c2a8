"""Mamba-2 stage block on mamba-ssm's Triton kernels (CUDA), falling back to the pure-PyTorch twin.

Loading: released ``mamba_ssm``'s package ``__init__`` imports ``selective_scan_cuda`` (a compiled
extension, via ``mamba_ssm.ops.selective_scan_interface``), so with a ``MAMBA_SKIP_CUDA_BUILD`` install
every ``import mamba_ssm...`` fails, although the Mamba-2 kernels we need are plain Triton modules
(``ops.triton.ssd_combined``, ``ops.triton.layernorm_gated``, ``ops.triton.selective_state_update``).
:func:`load_mamba_kernels` therefore registers the ``mamba_ssm`` package in ``sys.modules`` as a bare
package object created from its import spec *without executing its __init__* (its ``__path__`` points at
the installed folder), and then imports the three submodules normally. Their own imports stay inside
``mamba_ssm.ops.triton`` / ``mamba_ssm.utils`` (whose ``__init__`` files are empty), so nothing compiled is
needed. This saves users the long CUDA build of mamba-ssm. Side effect: in that process ``import mamba_ssm``
then returns the bare package (no ``Mamba2`` attribute); where ``selective_scan_cuda`` exists we import the
package normally instead.

Paths (logged once each on logger ``omnibyte.model``):
* "triton fused": training/eval forward without a cache when ``causal_conv1d``'s compiled extension imports:
  ``mamba_split_conv1d_scan_combined`` (conv, scan, gated norm and out_proj in one memory-efficient op).
* "triton unfused": torch conv1d + ``mamba_chunk_scan_combined`` + Triton gated RMSNorm (also every
  prefill with a cache); decode steps use ``selective_state_update``.
* "torch twin": CPU, or no mamba-ssm / Triton.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types
from functools import lru_cache

import torch
import torch.nn.functional as F

from ...registry import STAGES
from .mamba2_ref import Mamba2Config, Mamba2Mixer, Mamba2RefBlock
from .ssm_stack import log, log_path_once


@lru_cache(maxsize=1)
def load_mamba_kernels() -> types.SimpleNamespace | None:
    """The Triton kernels as a namespace, or None (logged) when CUDA, Triton or mamba-ssm is missing."""
    if not torch.cuda.is_available():
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        log.info("mamba2: triton not importable; using the torch twin")
        return None
    try:
        spec = importlib.util.find_spec("mamba_ssm")  # finds the package without running its __init__
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.submodule_search_locations is None:
        log.info("mamba2: mamba-ssm not installed; using the torch twin")
        return None
    try:
        if "mamba_ssm" not in sys.modules:
            if importlib.util.find_spec("selective_scan_cuda") is not None:
                importlib.import_module("mamba_ssm")  # a full build: the normal import works
            else:
                pkg = importlib.util.module_from_spec(spec)  # bare package: __path__ set, __init__ not run
                sys.modules["mamba_ssm"] = pkg
        ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        lng = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
        ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    except Exception as e:  # noqa: BLE001 - any failure means: use the twin, and say why
        log.warning("mamba2: could not load mamba-ssm Triton kernels (%s: %s); using the torch twin",
                    type(e).__name__, e)
        return None
    fused = getattr(ssd, "causal_conv1d_fwd_function", None) is not None
    causal_conv1d_fn = getattr(ssd, "causal_conv1d_fn", None) if fused else None
    return types.SimpleNamespace(
        chunk_scan=ssd.mamba_chunk_scan_combined,
        split_conv1d_scan=ssd.mamba_split_conv1d_scan_combined,
        rmsnorm_fn=lng.rmsnorm_fn,
        state_update=ssu.selective_state_update,
        fused=fused,
        causal_conv1d_fn=causal_conv1d_fn,
    )


# mamba-ssm's Triton kernels compute element offsets in 32-bit integers (``row * stride_row`` with a program id
# and a stride that each fit in int32): past 2**31 - 1 elements from a tensor's start the offset wraps. The gated
# RMSNorm reads z, a view into the in_proj output whose rows are 2 * d_inner + 2 * ngroups * d_state + nheads
# wide, so it is the first to wrap: for the ctx3 global stage (1024 wide) past 489,845 patches, i.e. ~239 MiB of
# context at batch 1. There it read other memory and trained on garbage without an error (and crashed with an
# illegal memory access at 512 MiB, on an H100). Longer inputs therefore go through the kernels in segments
# along time, each carrying the conv history and the scan state to the next (exact: the same recurrence).
INDEX_LIMIT = 2**31 - 1


def segment_positions(m, N: int, T: int) -> int:
    """Positions per kernel call for an (N, T) input of mixer ``m``: T when the widest tensor the kernels index
    (the in_proj output, N x T x its width) stays inside int32 offsets, else the most chunks that do."""
    width = 2 * m.d_inner + 2 * m.ngroups * m.d_state + m.nheads
    if N * T * width <= INDEX_LIMIT:
        return T
    most = INDEX_LIMIT // (N * width)
    if most < 1:
        raise ValueError(f"mamba2: a batch of {N} rows of a {m.d_inner}-wide mixer does not fit mamba-ssm's int32 "
                         f"kernel offsets even one position at a time; use fewer rows")
    return most // m.chunk_size * m.chunk_size or most


def kernel_forward(m, K, u: torch.Tensor, state: dict | None, routing=None) -> torch.Tensor:
    """The Mamba-2 mixer ``m`` (a Mamba2Mixer) on CUDA through the Triton kernels. Modality-aware (``routing``):
    per-modality in_proj / dt_bias / out_proj around the same conv, scan and gated norm kernels (never the
    fused path, whose out_proj is one matrix). Inputs too long for the kernels' int32 offsets run in segments
    (:data:`INDEX_LIMIT`)."""
    N, T, _ = u.shape
    S = segment_positions(m, N, T)
    if S < T:
        return segmented_forward(m, K, u, state, routing, S)
    A = -torch.exp(m.A_log.float())
    if state is None and K.fused and routing is None:
        zxbcdt = m.in_proj(u)
        log_path_once("triton fused (mamba_split_conv1d_scan_combined)")
        return K.split_conv1d_scan(
            zxbcdt, m.conv1d.weight.squeeze(1), m.conv1d.bias, m.dt_bias, A, m.D, m.chunk_size,
            activation="silu", rmsnorm_weight=m.norm.weight, rmsnorm_eps=m.norm.eps,
            outproj_weight=m.out_proj.weight, outproj_bias=m.out_proj.bias, headdim=m.headdim,
            ngroups=m.ngroups, norm_before_gate=False)
    z, xBC, dt, dt_bias = m.project_in(u, routing)
    if state is not None and T == 1 and "ssm" in state:
        log_path_once("triton step (selective_state_update)")
        xBC = m._conv(xBC, state)[:, 0]  # (N, C)
        x, B, C = torch.split(xBC, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], -1)
        H, P, n = m.nheads, m.headdim, m.d_state
        if dt_bias is None:  # modality-aware: each token's bias is already in dt. mamba-ssm's selective_state_update
            dt_bias = dt.new_zeros(H)  # reads dt_bias.stride() unconditionally (2.3.2): a None crashes it
        y = K.state_update(
            state["ssm"], x.reshape(N, H, P), dt[:, 0, :, None].expand(N, H, P), A[:, None, None].expand(H, P, n),
            B.reshape(N, m.ngroups, n), C.reshape(N, m.ngroups, n), m.D[:, None].expand(H, P),
            z=None, dt_bias=dt_bias[:, None].expand(H, P), dt_softplus=True)
        y = K.rmsnorm_fn(y.reshape(N, 1, m.d_inner), m.norm.weight, None, z=z, eps=m.norm.eps,
                         group_size=m.d_inner // m.ngroups, norm_before_gate=False)
        return m.project_out(y, routing)
    if state is None and K.causal_conv1d_fn is not None:
        log_path_once("triton unfused (causal-conv1d + mamba_chunk_scan_combined)")
        xBC = K.causal_conv1d_fn(xBC.transpose(1, 2), m.conv1d.weight.squeeze(1), m.conv1d.bias,
                                 activation="silu").transpose(1, 2)
    elif state is None:
        log_path_once("triton unfused (compiled causal conv + mamba_chunk_scan_combined)")
        xBC = compiled_causal_conv_silu()(xBC, m.conv1d.weight[:, 0], m.conv1d.bias)
    else:
        xBC = m._conv(xBC, state)
    x, B, C = torch.split(xBC, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], -1)
    init = state.get("ssm") if state is not None else None
    out = K.chunk_scan(
        x.reshape(N, T, m.nheads, m.headdim), dt, A, B.reshape(N, T, m.ngroups, m.d_state),
        C.reshape(N, T, m.ngroups, m.d_state), chunk_size=m.chunk_size, D=m.D, z=None, dt_bias=dt_bias,
        dt_softplus=True, initial_states=init, return_final_states=state is not None)
    if state is not None:
        y, final = out
        state["ssm"] = final.float().contiguous()
    else:
        y = out
    y = K.rmsnorm_fn(y.reshape(N, T, m.d_inner), m.norm.weight, None, z=z, eps=m.norm.eps,
                     group_size=m.d_inner // m.ngroups, norm_before_gate=False)
    return m.project_out(y, routing)


_SEGMENTED_SHAPES: set[tuple[int, int]] = set()


def segmented_forward(m, K, u: torch.Tensor, state: dict | None, routing, S: int) -> torch.Tensor:
    """``kernel_forward`` over [0, S), [S, 2S), ...: each segment starts from the previous one's conv inputs
    (the last d_conv - 1) and final scan state, through the cached path (``state``); gradients flow through
    both into earlier segments (mamba-ssm's scan takes and returns states with their gradients). A caller's
    cache dict is filled as one call would; without one, a temporary dict carries the states."""
    from .experts import Routing

    if (u.shape[0], u.shape[1]) not in _SEGMENTED_SHAPES:  # once per input shape, not per layer and step
        _SEGMENTED_SHAPES.add((u.shape[0], u.shape[1]))
        log.info("mamba2: %d positions x %d rows exceed the kernels' int32 offsets: %d segments of %d positions",
                 u.shape[1], u.shape[0], -(-u.shape[1] // S), S)
    carry = state if state is not None else {}
    outs = []
    for a in range(0, u.shape[1], S):
        r = None if routing is None else Routing(routing.expert[:, a:a + S], len(routing.counts))
        outs.append(kernel_forward(m, K, u[:, a:a + S], carry, r))
    return torch.cat(outs, dim=1)


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU of the depthwise causal convolution over time of x (N, T, C) with weight (C, K): K shifted
    products and sums, in the (N, T, C) layout (no transposed copies). Compiled, forward and backward are
    a few fused kernels; aten's depthwise conv1d took ~0.4 ms per layer (forward + backward) on an H100
    for the 360M config's global stage."""
    N, T, C = x.shape
    K = weight.shape[1]
    w = weight.to(x.dtype)
    xp = F.pad(x, (0, 0, K - 1, 0))  # K - 1 zeros before the first position
    out = xp[:, K - 1:K - 1 + T] * w[:, K - 1]
    for k in range(K - 1):
        out = out + xp[:, k:k + T] * w[:, k]
    if bias is not None:
        out = out + bias.to(x.dtype)
    return F.silu(out)


@lru_cache(maxsize=1)
def compiled_causal_conv_silu():
    return torch.compile(causal_conv_silu, dynamic=None)


class Mamba2KernelMixer(Mamba2Mixer):
    """The Mamba-2 mixer with mamba-ssm's Triton kernels for CUDA inputs (when they load), the pure-PyTorch
    twin otherwise. Same parameters as :class:`Mamba2Mixer`."""

    def forward(self, u: torch.Tensor, state: dict | None = None, routing=None) -> torch.Tensor:
        if u.is_cuda:
            K = load_mamba_kernels()
            if K is not None:
                return kernel_forward(self, K, u, state, routing)
        return super().forward(u, state, routing)

    @property
    def compile_friendly(self) -> bool:
        return load_mamba_kernels() is None


@STAGES.register("mamba2")
class Mamba2Block(Mamba2RefBlock):
    """Mamba-2 layers: Triton kernels for CUDA inputs when mamba-ssm is installed, the twin otherwise.
    Same parameters and state_dict keys as ``mamba2_ref``."""

    @dataclasses.dataclass(frozen=True)
    class Config(Mamba2Config):
        name: str = "mamba2"

    def make_mixer(self, dim: int, config) -> Mamba2KernelMixer:
        return Mamba2KernelMixer(dim, config)


__all__ = ["INDEX_LIMIT", "Mamba2Block", "Mamba2KernelMixer", "kernel_forward", "load_mamba_kernels",
           "segment_positions", "segmented_forward"]
