"""Mamba-2 stage block, pure PyTorch: the chunked SSD ("state space duality") twin of the Triton kernels.

Parameterisation mirrors mamba_ssm's ``Mamba2`` mixer (``in_proj`` -> [z, x, B, C, dt], depthwise causal
``conv1d`` over [x, B, C], per-head ``dt_bias``, ``A_log``, ``D``, gated RMSNorm ``norm``, ``out_proj``), so
:class:`Mamba2RefBlock` (registered ``mamba2_ref``) and :class:`~.mamba2.Mamba2Block` (``mamba2``, kernel
path on CUDA) have identical parameters and state_dict keys. The scan runs in fp32 whatever the input dtype.

Recurrence per head h (state S: headdim x d_state), with dt = softplus(dt_raw + dt_bias), A = -exp(A_log)::

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T          y_t = S_t C_t + D * x_t

The chunked form computes the same thing: quadratic attention-like products inside chunks of
``chunk_size`` positions and a linear recurrence over chunk states between them. This file is the math only:
the layer stack shared by every SSM block is :mod:`.ssm_stack`, the kernel dispatch :mod:`.mamba2`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Node
from ...registry import STAGES
from .experts import ExpertLinear, ExpertsOption, Routing, normalize_groups, num_experts
from .ssm_stack import SSMMixer, SSMStack, log_path_once, require_positive


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T) with out[i, j] = a[j+1] + ... + a[i] for j <= i and -inf above the diagonal
    (summed from a masked copy rather than as a cumsum difference, which loses precision)."""
    T = a.shape[-1]
    x = a.unsqueeze(-1).expand(*a.shape, T)  # x[..., i, j] = a[i]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    x = x.masked_fill(~strict, 0.0).cumsum(dim=-2)  # sum over i' <= i with i' > j
    return x.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk: int, D=None, initial_state=None):
    """Chunked SSD in fp32. x (N, T, H, P); dt (N, T, H) already softplus'ed; A (H,) negative;
    B, C (N, T, G, n); D (H,); initial_state (N, H, P, n). Returns y (N, T, H, P) fp32, final state."""
    N, T, H, P = x.shape
    G, n = B.shape[2], B.shape[3]
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    B = B.repeat_interleave(H // G, dim=2)  # (N, T, H, n)
    C = C.repeat_interleave(H // G, dim=2)
    chunk = max(1, min(chunk, T))
    pad = (-T) % chunk
    if pad:  # zero dt: no decay and no input, so the state passes through the padding unchanged
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (T + pad) // chunk
    X = (x * dt[..., None]).view(N, c, chunk, H, P)  # dt-scaled input
    a = (dt * A.float()).view(N, c, chunk, H).permute(0, 3, 1, 2)  # (N, H, c, l) log-decays
    Bc, Cc = B.view(N, c, chunk, H, n), C.view(N, c, chunk, H, n)
    acs = a.cumsum(-1)  # (N, H, c, l)
    # 1) within-chunk outputs (the "attention" form)
    # L[i, j] = exp(acs_i - acs_j) for j <= i (as the Triton kernel: a cumsum difference inside a chunk)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    Lmat = torch.exp((acs[..., :, None] - acs[..., None, :]).masked_fill(~causal, float("-inf")))  # (N,H,c,l,s)
    scores = torch.einsum("nclhd,ncshd->nhcls", Cc, Bc) * Lmat
    y = torch.einsum("nhcls,ncshp->nclhp", scores, X)
    # 2) state at the end of every chunk, from its own inputs
    decay_to_end = torch.exp(acs[..., -1:] - acs)  # (N, H, c, l)
    states = torch.einsum("nclhd,nhcl,nclhp->nchpd", Bc, decay_to_end, X)  # (N, c, H, P, n)
    # 3) pass states between chunks
    init = initial_state.float() if initial_state is not None else x.new_zeros(N, H, P, n)
    states = torch.cat((init[:, None], states), dim=1)  # (N, c + 1, H, P, n)
    chunk_decay = torch.exp(segsum(F.pad(acs[..., -1], (1, 0))))  # (N, H, c + 1, c + 1)
    states = torch.einsum("nhzc,nchpd->nzhpd", chunk_decay, states)
    final = states[:, -1]
    # 4) contribution of the state entering each chunk
    y = y + torch.einsum("nclhd,nchpd,nhcl->nclhp", Cc, states[:, :-1], torch.exp(acs))
    y = y.reshape(N, c * chunk, H, P)[:, :T]
    if D is not None:
        y = y + x[:, :T] * D.float()[:, None]
    return y, final


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, normalised per group of ``group_size`` channels (norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        g = y.float() * F.silu(z.float())
        shp = g.shape
        g = g.view(*shp[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.view(shp) * self.weight.float()).to(dtype)


class Mamba2Mixer(SSMMixer):
    """The Mamba-2 mixer in pure PyTorch (any device); :class:`~.mamba2.Mamba2KernelMixer` adds the Triton
    kernels for CUDA inputs on the same parameters."""

    def __init__(self, dim: int, cfg):
        super().__init__()
        E = self.experts = num_experts(cfg)  # 0: dense; else per-modality in_proj, dt_bias, out_proj
        self.d_inner = cfg.expand * dim
        if self.d_inner % cfg.headdim:
            raise ValueError(f"mamba2: expand * width = {self.d_inner} is not divisible by headdim {cfg.headdim}")
        self.headdim, self.d_state, self.ngroups, self.d_conv = cfg.headdim, cfg.d_state, cfg.ngroups, cfg.d_conv
        self.nheads = self.d_inner // cfg.headdim
        if self.nheads % cfg.ngroups:
            raise ValueError(f"mamba2: {self.nheads} heads are not divisible into {cfg.ngroups} groups")
        self.chunk_size = cfg.chunk_size
        self.conv_dim = self.d_inner + 2 * cfg.ngroups * cfg.d_state
        n_in = 2 * self.d_inner + 2 * cfg.ngroups * cfg.d_state + self.nheads
        self.in_proj = ExpertLinear(E, dim, n_in, cfg.bias) if E else nn.Linear(dim, n_in, bias=cfg.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias)
        shape = (E, self.nheads) if E else (self.nheads,)  # per modality: drawn independently for each
        dt = torch.exp(torch.rand(shape) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(*cfg.A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // cfg.ngroups, cfg.norm_eps)
        self.out_proj = ExpertLinear(E, self.d_inner, dim, cfg.bias) if E else nn.Linear(self.d_inner, dim,
                                                                                          bias=cfg.bias)

    def project_in(self, u: torch.Tensor, routing: Routing | None = None):
        """(z, xBC, dt, dt_bias). Modality-aware: each token's own expert in_proj, and its expert's dt_bias
        already added to dt (fp32), so dt_bias is None (the scans then add none)."""
        if routing is None:
            return (*self._split(self.in_proj(u)), self.dt_bias)
        z, xBC, dt = self._split(self.in_proj(u, routing))
        return z, xBC, dt.float() + self.dt_bias[routing.expert].float(), None

    def project_out(self, y: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        return self.out_proj(y) if routing is None else self.out_proj(y, routing)

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _conv(self, xBC: torch.Tensor, state: dict | None) -> torch.Tensor:
        """Depthwise causal conv + SiLU over time; xBC (N, T, C). Keeps the last d_conv - 1 inputs in state."""
        N, T, Cd = xBC.shape
        xt = xBC.transpose(1, 2)  # (N, C, T)
        k = self.d_conv - 1
        w, b = self.conv1d.weight.to(xt.dtype), self.conv1d.bias
        b = b.to(xt.dtype) if b is not None else None
        if state is None:  # zero history: left padding, cropped (no concatenated copy of the input)
            out = F.conv1d(xt, w, b, padding=k, groups=Cd)[..., :T]
            return F.silu(out).transpose(1, 2)
        hist = state.get("conv")
        if hist is None:
            hist = xt.new_zeros(N, Cd, k)
        full = torch.cat((hist.to(xt.dtype), xt), dim=-1)  # (N, C, k + T)
        state["conv"] = full[..., full.shape[-1] - k:].clone() if k else full[..., :0]
        out = F.conv1d(full, w, b, groups=Cd)
        return F.silu(out).transpose(1, 2)  # (N, T, C)

    def forward(self, u: torch.Tensor, state: dict | None = None, routing: Routing | None = None) -> torch.Tensor:
        log_path_once("torch twin (pure-PyTorch chunked SSD)")
        return self.forward_ref(u, state, routing)

    def forward_ref(self, u: torch.Tensor, state: dict | None = None, routing: Routing | None = None
                    ) -> torch.Tensor:
        N, T, _ = u.shape
        z, xBC, dt, dt_bias = self.project_in(u, routing)
        xBC = self._conv(xBC, state)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
        dt = F.softplus(dt.float() + dt_bias.float() if dt_bias is not None else dt.float())  # (N, T, H)
        A = -torch.exp(self.A_log.float())
        y, final = ssd_chunked(x.view(N, T, self.nheads, self.headdim), dt, A,
                               B.view(N, T, self.ngroups, self.d_state), C.view(N, T, self.ngroups, self.d_state),
                               self.chunk_size, self.D, state.get("ssm") if state is not None else None)
        if state is not None:
            state["ssm"] = final
        y = self.norm(y.reshape(N, T, self.d_inner).to(u.dtype), z)
        return self.project_out(y, routing)


@dataclasses.dataclass(frozen=True)
class Mamba2Config(Node):
    name: str = "mamba2"
    d_state: int = 128  # SSM state size per head (N)
    d_conv: int = 4  # width of the depthwise causal convolution
    expand: int = 2  # inner width = expand * stage width
    headdim: int = 64  # channels per SSM head (heads = inner width / headdim)
    ngroups: int = 1  # groups sharing B and C (heads must divide into them)
    chunk_size: int = 256  # positions per chunk of the chunked SSD scan
    A_init_range: tuple[float, float] = (1.0, 16.0)  # A = -exp(A_log) drawn uniformly in this range at init
    dt_min: float = 0.001  # initial step sizes dt are log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1  # (see dt_min)
    dt_init_floor: float = 1e-4  # smallest initial dt
    conv_bias: bool = True  # a bias in the causal convolution
    bias: bool = False  # biases in the input and output projections
    norm_eps: float = 1e-5  # RMSNorm epsilon (layer and gated norms)
    mlp_ratio: float = 0.0  # 0: no MLP (as MBLM's Mamba-2 stages)
    # per-modality in_proj (z, x, B, C and dt: Mamba-2's dt projection), dt_bias and out_proj (and MLP), e.g.
    # [image, question, answer] or [[image], [question, answer]]; unlisted modalities share one more copy
    modality_experts: ExpertsOption = ()

    def __post_init__(self):
        require_positive(self, ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"))
        object.__setattr__(self, "modality_experts", normalize_groups(self.modality_experts))


@STAGES.register("mamba2_ref")
class Mamba2RefBlock(SSMStack):
    """Mamba-2 layers that always run the pure-PyTorch path (any device)."""

    @dataclasses.dataclass(frozen=True)
    class Config(Mamba2Config):
        name: str = "mamba2_ref"

    def make_mixer(self, dim: int, config) -> nn.Module:
        return Mamba2Mixer(dim, config)
