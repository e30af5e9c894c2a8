"""Modality-aware sparsity (Mixture-of-Mamba / Mixture-of-Transformers): per-modality copies of a block's
projections, each token using the copy of its modality; no router, no auxiliary loss.

``modality_experts`` (a block option) lists modality groups: ``[image, question, answer]`` is three groups of
one, ``[[image], [question, answer]]`` two groups. Expert ``g`` serves group ``g``; every modality not listed
(``text``, ``special``, ...) shares one more expert, the "rest" (absent when the groups cover every modality).

Tokens are dispatched by an index-select into expert order, each expert's slice goes through that expert's
weights, and an index-select puts the results back (:class:`Routing`): every token costs one expert's
FLOPs, as in the dense twin. An expert's weights are a slice of one stacked parameter ((E, out, in) for a
linear map), so an expert that no token uses gets an exactly-zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...vocab import Modality

ExpertsOption = tuple[tuple[str, ...] | str, ...]  # the config field's type (groups or single names)


def normalize_groups(value: Sequence) -> tuple[tuple[str, ...], ...]:
    """``modality_experts`` as canonical groups of lower-case modality names; ValueError on unknown or
    repeated names and empty groups."""
    groups: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for i, g in enumerate(value or ()):
        names = (g,) if isinstance(g, (str, int, Modality)) else tuple(g)
        if not names:
            raise ValueError(f"modality_experts.{i}: an empty group")
        canon = []
        for n in names:
            try:
                name = Modality.parse(n).name.lower()
            except ValueError as e:
                raise ValueError(f"modality_experts.{i}: {e}") from None
            if name in seen:
                raise ValueError(f"modality_experts: {name!r} is listed twice")
            seen.add(name)
            canon.append(name)
        groups.append(tuple(canon))
    return tuple(groups)


def expert_table(groups: tuple[tuple[str, ...], ...]) -> tuple[list[int], int]:
    """(expert index of every Modality code, number of experts): group g -> g, the rest -> len(groups)."""
    table = [-1] * (max(Modality) + 1)
    for g, names in enumerate(groups):
        for n in names:
            table[Modality.parse(n)] = g
    rest = len(groups)
    has_rest = any(t < 0 for t in table)
    return [rest if t < 0 else t for t in table], rest + int(has_rest)


class _Permute(torch.autograd.Function):
    """Rows of x in the order ``perm``; backward: the gradient's rows in the order ``inverse`` (a gather, where
    index_select's own backward is a scatter-add, several times slower on CPU and atomic on GPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class Routing:
    """The tokens of an (N, T) sequence batch in expert order: ``apply(fn, x)`` runs ``fn(e, x_e)`` on each
    expert's tokens and returns the outputs in the original order. One host sync (the expert sizes)."""

    def __init__(self, expert: torch.Tensor, num_experts: int):
        self.shape = tuple(expert.shape)
        self.expert = expert  # (N, T) expert index of every position
        flat = expert.reshape(-1)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        used = [e for e, c in enumerate(counts) if c]
        self.counts = counts
        self.single = used[0] if len(used) == 1 else None  # every token on one expert: no gather needed
        if self.single is None:
            self.order = torch.argsort(flat, stable=True)
            self.inverse = torch.empty_like(self.order)
            self.inverse[self.order] = torch.arange(flat.numel(), device=flat.device)

    def apply(self, fn: Callable[[int, torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x: (N, T, ...) -> fn per expert on its tokens, back in place: (N, T, ...)."""
        if tuple(x.shape[:2]) != self.shape:
            raise ValueError(f"routing of shape {self.shape} applied to a tensor of shape {tuple(x.shape)}")
        if self.single is not None:
            return fn(self.single, x)
        xs = _Permute.apply(x.reshape(-1, *x.shape[2:]), self.order, self.inverse)
        outs = [fn(e, part) for e, part in enumerate(xs.split(self.counts)) if self.counts[e]]
        y = _Permute.apply(torch.cat(outs), self.inverse, self.order)
        return y.view(*self.shape, *y.shape[1:])


class ExpertLinear(nn.Module):
    """E linear maps stacked: ``weight`` (E, out, in), ``bias`` (E, out) or None; ``forward(x, routing)``."""

    is_expert_linear = True

    def __init__(self, experts: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.experts, self.in_features, self.out_features = experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))
        nn.init.normal_(self.weight, std=in_features ** -0.5)
        self.bias = nn.Parameter(torch.zeros(experts, out_features)) if bias else None
        if self.bias is not None:
            self.bias._no_weight_decay = True  # type: ignore[attr-defined]  (2-D, but a bias: see omnibyte.optim)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[e], self.bias[e] if self.bias is not None else None)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return routing.apply(self.expert, x)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class ExpertRMSNorm(nn.Module):
    """E RMSNorm weights stacked: ``weight`` (E, dim)."""

    def __init__(self, experts: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(experts, dim))
        self.weight._no_weight_decay = True  # type: ignore[attr-defined]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight[e].to(x.dtype), self.eps)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return routing.apply(self.expert, x)


class ExpertSwiGLU(nn.Module):
    """E SwiGLU feed-forwards (``gate_up``, ``down`` stacked), as :class:`~.transformer.SwiGLU` per expert."""

    def __init__(self, experts: int, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_up = ExpertLinear(experts, dim, 2 * hidden, bias)
        self.down = ExpertLinear(experts, hidden, dim, bias)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up.expert(e, x).chunk(2, dim=-1)
        return self.down.expert(e, F.silu(gate) * up)


def norm_then(norm: ExpertRMSNorm, fn: Callable[[int, torch.Tensor], torch.Tensor]):
    """The per-expert function ``x -> fn(e, norm_e(x))`` (one dispatch for a norm and what follows it)."""
    return lambda e, x: fn(e, norm.expert(e, x))


def num_experts(config) -> int:
    """Experts of a block config with ``modality_experts`` (0: a dense block)."""
    groups = getattr(config, "modality_experts", ())
    return expert_table(groups)[1] if groups else 0


class ModalityAware:
    """Mixin of stage blocks with ``config.modality_experts``: the code -> expert table and routing."""

    def setup_experts(self, config) -> int:
        groups = getattr(config, "modality_experts", ())
        self.modality_aware = bool(groups)
        table, n = expert_table(groups) if groups else ([0] * (max(Modality) + 1), 1)
        self.num_experts = n
        self.register_buffer("expert_of_modality", torch.tensor(table, dtype=torch.long), persistent=False)
        return n if groups else 0

    def routing(self, modality: torch.Tensor | None, x: torch.Tensor) -> Routing | None:
        """The Routing of ``modality`` ((N, T) Modality codes of the input positions); None for dense blocks."""
        if not self.modality_aware:
            return None
        if modality is None:
            raise ValueError(f"{type(self).__name__} has modality_experts {list(self.config.modality_experts)}: "
                             f"it needs the modality of every input position (got none)")
        if tuple(modality.shape) != tuple(x.shape[:2]):
            raise ValueError(f"modality of shape {tuple(modality.shape)} for inputs of shape {tuple(x.shape[:2])}")
        table = self.expert_of_modality.to(modality.device)
        return Routing(table[modality.long()], self.num_experts)


def dense_equivalent_numel(module: nn.Module) -> int:
    """Matrix-multiply parameters one token uses: 2-D weights in full, stacked expert weights one expert each
    (what the FLOP count of a modality-aware block must use: FLOPs per byte equal the dense twin's)."""
    total = 0
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if getattr(m, "is_expert_linear", False) and name == "weight":
                total += p[0].numel()
            elif (p.dim() == 2 and not isinstance(m, (ExpertLinear, ExpertRMSNorm)) and name != "dt_bias"
                  and name != "aux_weight"):  # a pathway layer multiplies once, by W + lambda W'
                total += p.numel()
    return total


def expert_param_names(model: nn.Module) -> set[str]:
    """State-dict names of every stacked per-modality tensor (leading dimension: the experts)."""
    out = set()
    for name, mod in model.named_modules():
        stacked = isinstance(mod, (ExpertLinear, ExpertRMSNorm))
        for pname, _ in mod.named_parameters(recurse=False):
            if stacked or (pname == "dt_bias" and getattr(mod, "experts", 0)):
                out.add(f"{name}.{pname}" if name else pname)
    return out


def expand_dense_weights(model: nn.Module, weights: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights of a dense model for ``model`` with modality-aware blocks: each dense tensor whose name is a
    stacked per-modality tensor here, with exactly the shape of one expert, is copied into every expert (the
    model then computes what the dense one did, for any modality track, until training separates the copies).
    Returns the weights and the names copied; every other tensor is left as it is (and checked by the caller)."""
    names = expert_param_names(model)
    own = model.state_dict()
    out, copied = dict(weights), []
    for k, v in weights.items():
        if k in names and k in own and tuple(own[k].shape[1:]) == tuple(v.shape):
            out[k] = v.unsqueeze(0).expand(own[k].shape[0], *v.shape).clone()
            copied.append(k)
    return out, copied
