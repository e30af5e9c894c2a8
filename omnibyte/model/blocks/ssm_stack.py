"""The layer stack shared by every SSM stage block (Mamba-1, Mamba-2 and its twin): pre-norm residual layers
around a mixer, an optional SwiGLU MLP, a final RMSNorm, per-layer caches and activation checkpointing."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..cache import BlockCache
from ..layers import RMSNorm, init_linear, scaled_std
from .experts import ExpertRMSNorm, ExpertSwiGLU, ModalityAware, Routing, norm_then, num_experts
from .transformer import SwiGLU

log = logging.getLogger("omnibyte.model")
_logged: set[str] = set()


def log_path_once(path: str) -> None:
    if path not in _logged:
        _logged.add(path)
        log.info("mamba path: %s", path)



class SSMMixer(nn.Module):
    """Base of SSM mixers: ``forward(u (N, T, D), state: dict | None) -> (N, T, D)``."""

    @property
    def compile_friendly(self) -> bool:
        """False where the mixer runs kernels torch.compile cannot trace (they stay eager)."""
        return True


class SSMLayer(nn.Module):
    """Pre-norm residual layer around a mixer, with an optional SwiGLU MLP (mlp_ratio > 0). Modality-aware
    (``modality_experts``): the mixer's projections and the MLP with its norm are per modality; the pre-norm of
    the mixer stays shared (as Mixture-of-Mamba, which splits only the projections)."""

    def __init__(self, dim: int, mixer: nn.Module, cfg, dropout: float):
        super().__init__()
        E = self.experts = num_experts(cfg)
        self.norm = RMSNorm(dim, cfg.norm_eps)
        self.mixer = mixer
        self.mlp = None
        if cfg.mlp_ratio > 0:
            hidden = -(-int(cfg.mlp_ratio * dim) // 64) * 64
            self.norm2 = ExpertRMSNorm(E, dim, cfg.norm_eps) if E else RMSNorm(dim, cfg.norm_eps)
            self.mlp = ExpertSwiGLU(E, dim, hidden, cfg.bias) if E else SwiGLU(dim, hidden, cfg.bias)
        self.drop = nn.Dropout(dropout)

    @property
    def compile_friendly(self) -> bool:
        """False where the mixer calls mamba-ssm's kernels (torch.compile leaves those layers eager: tracing
        them buys little, the kernels dominate) and for modality-aware layers (data-dependent dispatch)."""
        return self.mixer.compile_friendly and not self.experts

    def forward(self, x: torch.Tensor, state: dict | None = None, routing: Routing | None = None) -> torch.Tensor:
        x = x + self.drop(self.mixer(self.norm(x), state, routing))
        if self.mlp is not None:
            h = self.mlp(self.norm2(x)) if routing is None else routing.apply(norm_then(self.norm2, self.mlp.expert), x)
            x = x + self.drop(h)
        return x


class SSMStack(ModalityAware, nn.Module):
    """A stack of SSM layers with a final RMSNorm; subclasses say which mixer to build."""

    unbounded = True
    cache_time_dims = None  # recurrent state only: rolled back from per-position snapshots

    def __init__(self, config, *, dim: int, layers: int, max_len: int | None = None, dropout: float = 0.0,
                 init_std: float = 0.02):
        super().__init__()
        self.config = config
        self.setup_experts(config)
        self.layers = nn.ModuleList(SSMLayer(dim, self.make_mixer(dim, config), config, dropout)
                                    for _ in range(layers))
        self.norm = RMSNorm(dim, config.norm_eps)
        for layer in self.layers:
            init_linear(layer, init_std)
            nn.init.normal_(layer.mixer.out_proj.weight, std=scaled_std(init_std, layers))
            if layer.mlp is not None:
                nn.init.normal_(layer.mlp.down.weight, std=scaled_std(init_std, layers))
        self.checkpoint_layers = False

    def make_mixer(self, dim: int, config) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cache: BlockCache | None = None, modality: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``modality``: (N, T) Modality codes routing each input position (modality-aware blocks only)."""
        routing = self.routing(modality, x)
        extra = () if routing is None else (routing,)
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, cache.layer(i), *extra)
            elif self.checkpoint_layers and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, None, *extra, use_reentrant=False)
            else:
                x = layer(x, None, *extra)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)


def require_positive(config, fields: tuple[str, ...]) -> None:
    """Raise ValueError naming the first of ``fields`` of an SSM block config that is below 1."""
    for k in fields:
        if getattr(config, k) < 1:
            raise ValueError(f"{k} must be >= 1, got {getattr(config, k)}")
