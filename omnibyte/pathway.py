"""Multimodal Pathway (Zhang et al., arXiv 2401.14405): a model of one modality helped by the weights of a model
trained on another (``train.pathway_from``).

Each chosen ``nn.Linear`` of the base model becomes a :class:`PathwayLinear` whose effective weight is
``W + lambda * W'`` (and bias ``b + lambda * b'`` when the layer has one: one scalar per layer serves both), where
``W'`` is the same-named layer of the auxiliary run's model and ``lambda`` a learnable scalar initialised to 0,
so a fresh pathway model computes exactly what the base model computes. ``W'`` trains too unless
``train.pathway_train_aux: false`` (then it is a frozen parameter).

State-dict keys: a wrapped layer keeps the base model's own keys (``....qkv.weight``, ``....qkv.bias`` hold ``W``
and ``b``) and adds ``aux_weight``, ``aux_bias`` and ``pathway_lambda`` beside them, so a pathway checkpoint holds
everything needed to resume it, evaluate it or merge it without the auxiliary run. The effective weight is the
module's ``weight`` attribute (a property), so every consumer that reads ``layer.weight`` rather than calling the
layer -- mamba-ssm's fused Mamba-2 kernel (``out_proj.weight``), the Mamba-1 CUDA scan (``dt_proj.weight``), the
decode kernels and the per-byte step -- gets ``W + lambda * W'`` as well. :func:`merge_state_dict` folds a pathway
state dict into an ordinary one (``W^ = W + lambda * W'``, computed as the layer computes it: the same fp32 result).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .runconfig import PATHWAY_LAYERS

log = logging.getLogger("omnibyte.pathway")

AUX_KEYS = ("aux_weight", "aux_bias", "pathway_lambda")


class PathwayLinear(nn.Module):
    """A linear layer computing ``x (W + lambda W')^T + (b + lambda b')`` (see the module docstring).

    ``weight`` and ``bias`` are the *effective* tensors; the base parameters live under the same state-dict keys
    (``self._parameters["weight"]``, ``["bias"]``), readable as :attr:`base_weight` / :attr:`base_bias`."""

    def __init__(self, base: nn.Linear, aux_weight: torch.Tensor, aux_bias: torch.Tensor | None, train_aux: bool):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # the base parameters keep their keys; the ``weight`` / ``bias`` attributes are the properties below
        self._parameters["weight"] = base.weight
        self._parameters["bias"] = base.bias
        w = base.weight
        self.aux_weight = nn.Parameter(aux_weight.detach().to(w.device, w.dtype).clone(), requires_grad=train_aux)
        if base.bias is not None:
            self.aux_bias = nn.Parameter(aux_bias.detach().to(w.device, w.dtype).clone(), requires_grad=train_aux)
        else:
            self.register_parameter("aux_bias", None)
        self.pathway_lambda = nn.Parameter(torch.zeros((), device=w.device, dtype=w.dtype))

    @property
    def base_weight(self) -> torch.Tensor:
        return self._parameters["weight"]

    @property
    def base_bias(self) -> torch.Tensor | None:
        return self._parameters["bias"]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        p = self._parameters
        return p["weight"] + p["pathway_lambda"] * p["aux_weight"]

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        p = self._parameters
        return None if p["bias"] is None else p["bias"] + p["pathway_lambda"] * p["aux_bias"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.base_bias is not None}, aux_trains={self.aux_weight.requires_grad}")


def _stage_indices(model: nn.Module, stages: tuple[int, ...]) -> list[int]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"train.pathway_from: {type(model).__name__} has no stages (model.blocks); Multimodal "
                          f"Pathway applies to MBLM stage blocks")
    num = len(blocks)
    if any(not -num <= s < num for s in stages):
        raise ConfigError(f"train.pathway_stages={list(stages)}: the model has stages 0..{num - 1}")
    return sorted({s % num for s in stages}) if stages else list(range(num))


def pathway_targets(model: nn.Module, layers: tuple[str, ...], stages: tuple[int, ...]) -> list[str]:
    """The names (from the model root) of the linear layers a pathway wraps: every module of the chosen stages'
    blocks whose own name is in ``layers``. A chosen name on a module that is not an ``nn.Linear`` is refused
    (its weight could be consumed in ways a wrapper cannot cover); no layer at all is refused."""
    unknown = [name for name in layers if name not in PATHWAY_LAYERS]
    if unknown:
        raise ConfigError(f"train.pathway_layers: unknown {unknown}; known: {', '.join(PATHWAY_LAYERS)}")
    out = []
    for s in _stage_indices(model, stages):
        for name, mod in model.blocks[s].named_modules():
            if name.rpartition(".")[2] not in layers:
                continue
            full = f"blocks.{s}.{name}"
            if isinstance(mod, PathwayLinear):
                raise ConfigError(f"{full}: already a pathway layer")
            if type(mod) is not nn.Linear:
                raise ConfigError(f"train.pathway_layers: {full} is a {type(mod).__name__}, not an nn.Linear; "
                                  f"Multimodal Pathway wraps plain linear layers only (drop "
                                  f"{name.rpartition('.')[2]!r} from train.pathway_layers)")
            out.append(full)
    if not out:
        raise ConfigError(f"train.pathway_from: no layer named {list(layers)} in stages "
                          f"{_stage_indices(model, stages)} of this model (train.pathway_layers / pathway_stages)")
    return out


def _aux_tensors(name: str, base: nn.Linear, aux: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', b')`` of layer ``name`` of the auxiliary model, checked against the base layer (a ConfigError
    naming the layer and both shapes when they differ)."""
    if aux is None:
        raise ConfigError(f"train.pathway_from: layer {name} is not in the auxiliary model (its architecture "
                          f"must have the same-named layer; choose train.pathway_stages / pathway_layers it has)")
    if not isinstance(aux, nn.Linear):
        raise ConfigError(f"train.pathway_from: layer {name} of the auxiliary model is a {type(aux).__name__}, "
                          f"not a linear layer")
    w, b = aux.weight, aux.bias
    if w.shape != base.weight.shape:
        raise ConfigError(f"train.pathway_from: layer {name}: weight shape {tuple(base.weight.shape)} in this "
                          f"model, {tuple(w.shape)} in the auxiliary model")
    if (b is None) != (base.bias is None):
        have = lambda t: "no bias" if t is None else f"bias {tuple(t.shape)}"  # noqa: E731
        raise ConfigError(f"train.pathway_from: layer {name}: {have(base.bias)} in this model, {have(b)} in the "
                          f"auxiliary model")
    return w, b


def attach_pathway(model: nn.Module, layers: tuple[str, ...], stages: tuple[int, ...],
                   aux_model: nn.Module | None, train_aux: bool) -> list[str]:
    """Wrap the chosen layers of ``model`` in place (:class:`PathwayLinear`); returns their names.

    ``aux_model``: the auxiliary run's model (``W'`` is its same-named layer); ``None`` when the model is
    rebuilt to resume a pathway checkpoint, which then provides ``W'`` and ``lambda`` (``W'`` starts as zeros)."""
    names = pathway_targets(model, layers, stages)
    aux_modules = dict(aux_model.named_modules()) if aux_model is not None else None
    wrapped = []
    for name in names:
        base = model.get_submodule(name)
        if aux_modules is not None:
            w, b = _aux_tensors(name, base, aux_modules.get(name))
        else:
            w = torch.zeros_like(base.weight)
            b = torch.zeros_like(base.bias) if base.bias is not None else None
        wrapped.append((name, PathwayLinear(base, w, b, train_aux)))
    for name, layer in wrapped:  # replaced only once every layer passed its checks
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)
    return names


def is_pathway_state(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(".pathway_lambda") for k in state)


def merge_state_dict(state: dict[str, torch.Tensor], where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """A pathway state dict folded into an ordinary one: for each layer with a ``pathway_lambda``,
    ``weight = W + lambda W'`` and ``bias = b + lambda b'`` (as :class:`PathwayLinear` computes them), the
    ``aux_*`` and ``pathway_lambda`` keys dropped. Returns (merged state, merged layer names). A layer with some
    but not all of its pathway tensors is a ConfigError naming it."""
    out = dict(state)
    layers = sorted(k[: -len(".pathway_lambda")] for k in state if k.endswith(".pathway_lambda"))
    for name in layers:
        lam = out.pop(f"{name}.pathway_lambda")
        try:
            w, aux_w = out[f"{name}.weight"], out.pop(f"{name}.aux_weight")
        except KeyError as e:
            raise ConfigError(f"{where}: pathway layer {name} lacks {e.args[0]}") from None
        out[f"{name}.weight"] = w + lam * aux_w
        b, aux_b = out.get(f"{name}.bias"), out.pop(f"{name}.aux_bias", None)
        if (b is None) != (aux_b is None):
            raise ConfigError(f"{where}: pathway layer {name} has {'a bias' if b is not None else 'no bias'} but "
                              f"{'an aux_bias' if aux_b is not None else 'no aux_bias'}")
        if b is not None:
            out[f"{name}.bias"] = b + lam * aux_b
    stray = [k for k in out if k.rpartition(".")[2] in AUX_KEYS]
    if stray:
        raise ConfigError(f"{where}: pathway tensors without a pathway_lambda: {stray[:3]}")
    return out, layers


def merge_modules(model: nn.Module) -> int:
    """Replace every :class:`PathwayLinear` of ``model`` by an ``nn.Linear`` holding its effective weight and
    bias, in place; returns how many."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PathwayLinear)]
    for name, m in found:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.base_bias is not None, device=m.base_weight.device,
                        dtype=m.base_weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(m.weight)
            if lin.bias is not None:
                lin.bias.copy_(m.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, lin)
    return len(found)


__all__ = ["PathwayLinear", "attach_pathway", "pathway_targets", "merge_state_dict", "merge_modules",
           "is_pathway_state"]
