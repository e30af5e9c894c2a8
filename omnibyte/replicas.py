"""DDP replicas stay one model: a check that every rank holds the same parameters.

Under DDP each rank keeps a full copy of the model and applies the same all-reduced gradients, so the copies are
identical after every step. If a rank's gradients ever miss the all-reduce (a stage replayed as a CUDA graph
whose parameters' hooks did not fire, ``train.cuda_graphs``; a ``no_sync`` left on), the copies drift apart
silently: each rank trains its own model, the logged loss is their average, and the checkpoint is rank 0's.
:func:`check` compares a fingerprint of every parameter across ranks (its float64 sum: two all-reduces, MIN and
MAX, of one number per parameter) and stops the run naming the first parameter that differs. The training loop
calls it at each log step under DDP, where the host already waits for the GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .errors import TrainingError

RTOL = 1e-7  # identical replicas give identical sums; drift from a missed all-reduce is orders of magnitude larger


def fingerprint(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """(parameter names, float64 sums of each parameter) on the parameters' device."""
    names, sums = [], []
    for name, p in model.named_parameters():
        names.append(name)
        sums.append(p.detach().sum(dtype=torch.float64))
    if not sums:
        return names, torch.zeros(0, dtype=torch.float64)
    return names, torch.stack(sums)


def check(model: nn.Module, step: int, group=None) -> None:
    """Raise TrainingError on every rank if any parameter differs between ranks (beyond RTOL of its sum)."""
    names, v = fingerprint(model)
    hi, lo = v.clone(), v.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    bad = (hi - lo).abs() > RTOL * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    if bool(bad.any()):  # every rank sees the same hi and lo: every rank stops here
        i = int(bad.nonzero()[0])
        raise TrainingError(
            f"DDP replicas differ after step {step}: parameter {names[i]!r} sums to {lo[i].item():.9g} on one rank "
            f"and {hi[i].item():.9g} on another ({int(bad.sum())} of {len(names)} parameters differ). Their "
            f"gradients were not all-reduced alike, so each rank was training its own model; stopped rather than "
            f"log their averaged loss and save rank 0's copy. With train.cuda_graphs under DDP, rerun without it "
            f"and report this.")
