"""Mamba-1 stage block (selective scan), so MambaByte-style flat models and Mamba-1 hierarchies are configs.

Parameterisation as mamba_ssm's ``Mamba`` (``in_proj`` -> [x, z], depthwise causal ``conv1d``, ``x_proj``
-> [dt_low_rank, B, C], ``dt_proj``, ``A_log`` (d_inner, d_state), ``D``, ``out_proj``). The scan uses
mamba-ssm's compiled ``selective_scan_cuda`` through ``selective_scan_fn`` when that extension imports
(CUDA, no cache); otherwise the reference below, a chunked exact scan in fp32::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        y_t = <C_t, h_t> + D * x_t
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Node
from ...registry import STAGES
from .experts import ExpertLinear, ExpertsOption, normalize_groups, num_experts
from .ssm_stack import SSMMixer, SSMStack, log, log_path_once, require_positive


@lru_cache(maxsize=1)
def _selective_scan_fn():
    if not torch.cuda.is_available():
        return None
    try:
        if importlib.util.find_spec("selective_scan_cuda") is None:
            return None
        return importlib.import_module("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    except Exception:  # noqa: BLE001
        return None


# mamba-ssm's selective_scan_cuda indexes its (N, d_inner, T) inputs with 32-bit offsets (``index_t`` is
# uint32 in its csrc, and some products are signed); it takes no initial state, so a longer input cannot be split
# into segments as the Mamba-2 path does (mamba2.INDEX_LIMIT): it goes to the reference scan instead.
CUDA_SCAN_LIMIT = 2**31 - 1


def cuda_scan_fits(N: int, d_inner: int, T: int) -> bool:
    """Whether an (N, d_inner, T) scan input stays inside selective_scan_cuda's 32-bit offsets."""
    return N * d_inner * T <= CUDA_SCAN_LIMIT


def selective_scan_ref(x, dt, A, B, C, D, h0=None, chunk: int = 16):
    """x, dt (N, T, E); A (E, n); B, C (N, T, n); D (E,); h0 (N, E, n). -> y (N, T, E) fp32, h_T.
    Chunks of ``chunk`` steps: inside a chunk the decays are cumulative products computed as exp of cumsums
    relative to the chunk start (exact, no division by small numbers)."""
    N, T, E = x.shape
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    h = h0.float() if h0 is not None else x.new_zeros(N, E, A.shape[1])
    ys = []
    for a in range(0, T, chunk):
        dtc, xc, Bc, Cc = dt[:, a:a + chunk], x[:, a:a + chunk], B[:, a:a + chunk], C[:, a:a + chunk]
        la = dtc[..., None] * A.float()  # (N, l, E, n) log decay per step
        cs = la.cumsum(1)  # (N, l, E, n)
        u = (dtc * xc)[..., None] * Bc[:, :, None, :]  # (N, l, E, n) inputs
        # h_t = exp(cs_t) h0 + sum_{s<=t} exp(cs_t - cs_s) u_s  (exp(cs_t - cs_s) <= 1: stable)
        n_steps = dtc.shape[1]
        diff = cs[:, :, None] - cs[:, None, :]  # (N, t, s, E, n)
        mask = torch.ones(n_steps, n_steps, dtype=torch.bool, device=x.device).tril()[None, :, :, None, None]
        w = torch.exp(diff.masked_fill(~mask, float("-inf")))
        hs = torch.einsum("btsed,bsed->bted", w, u) + torch.exp(cs) * h[:, None]
        ys.append(torch.einsum("bted,btd->bte", hs, Cc))
        h = hs[:, -1]
    y = torch.cat(ys, 1) + x * D.float()
    return y, h


class Mamba1Mixer(SSMMixer):
    """Modality-aware (``modality_experts``): ``in_proj``, ``x_proj``, ``dt_proj`` (with its bias, drawn per
    modality) and ``out_proj`` per modality, as Mixture-of-Mamba; ``conv1d``, ``A_log``, ``D`` shared."""

    def __init__(self, dim: int, cfg):
        super().__init__()
        X = self.experts = num_experts(cfg)
        E = self.d_inner = cfg.expand * dim
        self.d_state, self.d_conv = cfg.d_state, cfg.d_conv
        self.dt_rank = cfg.dt_rank or math.ceil(dim / 16)

        def lin(i, o, bias):
            return ExpertLinear(X, i, o, bias) if X else nn.Linear(i, o, bias=bias)

        self.in_proj = lin(dim, 2 * E, cfg.bias)
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, bias=cfg.conv_bias)
        self.x_proj = lin(E, self.dt_rank + 2 * cfg.d_state, False)
        self.dt_proj = lin(self.dt_rank, E, True)
        shape = (X, E) if X else (E,)
        dt = torch.exp(torch.rand(shape) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self._dt_bias_init = dt + torch.log(-torch.expm1(-dt))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = lin(E, dim, cfg.bias)

    def reset_dt(self) -> None:
        with torch.no_grad():
            self.dt_proj.bias.copy_(self._dt_bias_init)
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)

    @property
    def compile_friendly(self) -> bool:
        """False where training runs mamba-ssm's compiled selective scan (not traced by torch.compile)."""
        return _selective_scan_fn() is None

    def forward(self, u: torch.Tensor, state: dict | None = None, routing=None) -> torch.Tensor:
        N, T, _ = u.shape
        if routing is None:
            proj = lambda lin, v: lin(v)  # noqa: E731
        else:
            proj = lambda lin, v: lin(v, routing)  # noqa: E731
        x, z = proj(self.in_proj, u).chunk(2, dim=-1)
        xt = x.transpose(1, 2)  # (N, E, T)
        k = self.d_conv - 1
        hist = state.get("conv") if state is not None else None
        full = torch.cat((hist.to(xt.dtype) if hist is not None else xt.new_zeros(N, self.d_inner, k), xt), -1)
        if state is not None:
            state["conv"] = full[..., full.shape[-1] - k:].clone()
        b = self.conv1d.bias
        x = F.silu(F.conv1d(full, self.conv1d.weight.to(xt.dtype), b.to(xt.dtype) if b is not None else None,
                            groups=self.d_inner)).transpose(1, 2)  # (N, T, E)
        dtl, B, C = torch.split(proj(self.x_proj, x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        scan = _selective_scan_fn() if (u.is_cuda and state is None) else None
        if scan is not None and not cuda_scan_fits(N, self.d_inner, T):
            log.warning("mamba1: %d rows x %d channels x %d positions pass selective_scan_cuda's 32-bit offsets; "
                        "this call runs the torch reference scan (exact, slower)", N, self.d_inner, T)
            scan = None
        if scan is not None and routing is not None:  # per-token dt_proj (its bias included): no delta_bias
            log_path_once("mamba1: selective_scan_cuda")
            y = scan(x.transpose(1, 2).contiguous(), proj(self.dt_proj, dtl).transpose(1, 2).contiguous(), A,
                     B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float(), z=None,
                     delta_bias=None, delta_softplus=True).transpose(1, 2)
        elif scan is not None:
            log_path_once("mamba1: selective_scan_cuda")
            y = scan(x.transpose(1, 2).contiguous(), (self.dt_proj.weight @ dtl.transpose(1, 2)).contiguous(), A,
                     B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float(), z=None,
                     delta_bias=self.dt_proj.bias.float(), delta_softplus=True).transpose(1, 2)
        else:
            log_path_once("mamba1: torch reference scan")
            dt = F.softplus(proj(self.dt_proj, dtl).float())
            y, h = selective_scan_ref(x, dt, A, B, C, self.D, state.get("ssm") if state is not None else None)
            if state is not None:
                state["ssm"] = h
        y = y.to(u.dtype) * F.silu(z)
        return proj(self.out_proj, y)


@STAGES.register("mamba1")
class Mamba1Block(SSMStack):
    """Mamba-1 layers (selective scan): mamba-ssm's CUDA kernel when compiled, the reference scan otherwise."""

    @dataclasses.dataclass(frozen=True)
    class Config(Node):
        name: str = "mamba1"
        d_state: int = 16
        d_conv: int = 4
        expand: int = 2
        dt_rank: int = 0  # 0: ceil(width / 16)
        dt_min: float = 0.001
        dt_max: float = 0.1
        dt_init_floor: float = 1e-4
        conv_bias: bool = True
        bias: bool = False
        norm_eps: float = 1e-5
        mlp_ratio: float = 0.0
        # per-modality in_proj, x_proj, dt_proj (+ bias), out_proj (and MLP): [image, question, answer] or
        # groups [[image], [question, answer]]; unlisted modalities share one more copy
        modality_experts: ExpertsOption = ()

        def __post_init__(self):
            require_positive(self, ("d_state", "d_conv", "expand"))
            object.__setattr__(self, "modality_experts", normalize_groups(self.modality_experts))
            if self.dt_rank < 0:
                raise ValueError(f"dt_rank must be >= 0 (0: ceil(width / 16)), got {self.dt_rank}")

    def make_mixer(self, dim: int, config) -> nn.Module:
        return Mamba1Mixer(dim, config)

    def __init__(self, config, **kw):
        super().__init__(config, **kw)
        for layer in self.layers:
            layer.mixer.reset_dt()  # after the generic linear init
