"""The optimizer and the learning-rate schedule of a run (``train.*``)."""

from __future__ import annotations

import math

import torch


def use_fused(t, params: list[torch.nn.Parameter], strategy: str = "none") -> bool:
    """``train.fused_optimizer``: true / false as given; auto: fused when every parameter is on a CUDA device and
    the run is not sharded with FSDP2 (its parameters are DTensors)."""
    if t.fused_optimizer is True and strategy == "fsdp2":
        from .config import ConfigError

        raise ConfigError("train.fused_optimizer=true under parallel.strategy=fsdp2: the fused AdamW is untested "
                          "on FSDP2's sharded (DTensor) parameters; use train.fused_optimizer=auto (off there)")
    if t.fused_optimizer != "auto":
        return bool(t.fused_optimizer)
    return strategy != "fsdp2" and bool(params) and all(p.device.type == "cuda" for p in params)


def build_optimizer(model: torch.nn.Module, t, strategy: str = "none") -> torch.optim.Optimizer:
    """AdamW; weight decay on tensors with >= 2 dims only (not on norms, biases, start vectors), nor on those
    marked ``_no_weight_decay`` (mamba-ssm's marker: the SSM parameters A_log, D and dt_bias -- Mamba-1's A_log is
    a matrix -- and the stacked, hence 2-D, per-modality biases and norms of modality-aware blocks). Fused
    (one kernel for every parameter, and a step skipped on the device: :mod:`omnibyte.nonfinite`) as
    :func:`use_fused` says."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = use_fused(t, decay + no_decay, strategy)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, **({"fused": True} if fused else {}))


def undecayed(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the trained parameters the optimizer does not decay (its weight_decay-0 group), sorted: what a
    checkpoint records, so that a resumed run keeps the grouping it began with."""
    ids = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def keep_grouping(model: torch.nn.Module, optimizer: torch.optim.Optimizer, recorded) -> list[str]:
    """Move parameters between :func:`build_optimizer`'s two groups (decayed, not decayed) so that exactly
    ``recorded`` (names) are not decayed, as in the checkpoint being resumed; returns the names moved. A rule
    changed since the run began (e.g. Mamba-1's A_log, decayed before 4e4bd53) must not change the run's
    training half-way: the run continues as it began."""
    recorded = set(recorded)
    decay, no_decay = optimizer.param_groups[0], optimizer.param_groups[1]
    in_decay = {id(p) for p in decay["params"]}
    in_no_decay = {id(p) for p in no_decay["params"]}
    moved = [(name, p) for name, p in model.named_parameters()
             if (name in recorded and id(p) in in_decay) or (name not in recorded and id(p) in in_no_decay)]
    going = {id(p) for _, p in moved}
    decay["params"], no_decay["params"] = (
        [q for q in decay["params"] if id(q) not in going] + [p for n, p in moved if n not in recorded],
        [q for q in no_decay["params"] if id(q) not in going] + [p for n, p in moved if n in recorded])
    return [name for name, _ in moved]


def lr_factor(step: int, t) -> float:
    """Multiplier of ``t.lr`` for optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    if t.warmup and step < t.warmup:
        return (step + 1) / t.warmup
    progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
    floor = t.min_lr / t.lr if t.lr else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))


def follow_config(optimizer: torch.optim.Optimizer, scheduler, t) -> list[str]:
    """After a resume: the optimizer's hyper-parameters and the schedule follow this run's ``train`` config (a
    checkpoint restores the ones it was written with: the old schedule's lr for the first step after raising
    ``train.steps``, another run's lr and weight decay for ``train.resume=<its checkpoint>``). Returns what
    changed, as ``name: old -> new`` lines."""
    step = scheduler.last_epoch  # the index of the next step's factor
    lr = t.lr * lr_factor(step, t)
    changed = []
    for i, g in enumerate(optimizer.param_groups):
        want = {"initial_lr": t.lr, "lr": lr, "betas": tuple(t.betas), "eps": t.eps,
                "weight_decay": t.weight_decay if i == 0 else 0.0}
        for k, v in want.items():
            old = tuple(g[k]) if k == "betas" else g.get(k)
            if old != v and not (isinstance(v, float) and old is not None and math.isclose(old, v, rel_tol=1e-9)):
                if i == 0 or k == "weight_decay":
                    changed.append(f"group {i} {k}: {old} -> {v}")
                g[k] = v
    scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changed
