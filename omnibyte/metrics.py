"""Loss sums -> the numbers a run reports: bits per byte overall and per modality.

Bits per byte is ``sum(w * nll) / sum(w) / ln 2`` over loss-weighted tokens (``w`` = the stream's
``loss_mask``), from nats summed across every batch and rank -- never an average of batch averages.
:class:`LogWindow` accumulates them over the training steps between two log lines (kept in checkpoints, so a
resumed run logs the same numbers as an uninterrupted one).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .vocab import Modality, modality_name

LN2 = math.log(2.0)


def summarize(nats: float, weight: float, per_modality: dict[int, tuple[float, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"loss": nats / weight if weight else float("nan"), "weight": weight}
    out["bpb"] = out["loss"] / LN2
    for code, (n, w) in sorted(per_modality.items()):
        if w > 0:
            out[f"bpb/{modality_name(code)}"] = n / w / LN2
    return out


class LogWindow:
    """Loss sums over the steps since the last log line."""

    def __init__(self, saved: dict | None = None):
        self.nats, self.weight, self.tokens, self.steps = 0.0, 0.0, 0, 0
        self.mod: dict[int, list[float]] = {}
        if saved:
            self.nats, self.weight, self.tokens, self.steps = (saved[k] for k in ("nats", "weight", "tokens", "steps"))
            self.mod = {int(c): list(v) for c, v in saved["mod"].items()}
        self.t0 = time.perf_counter()

    def add(self, nats: float, weight: float, per_mod: dict) -> None:
        self.nats += nats
        self.weight += weight
        for code, (n, w) in per_mod.items():
            acc = self.mod.setdefault(code, [0.0, 0.0])
            acc[0] += float(n)
            acc[1] += float(w)
        self.steps += 1

    def state(self) -> dict:
        return {"nats": self.nats, "weight": self.weight, "tokens": self.tokens, "steps": self.steps, "mod": self.mod}

    def summary(self, info, device: torch.device) -> dict:
        """Loss, bpb (overall and per modality), bytes/s and ``tokens`` (this window's, all ranks)."""
        from .parallel import all_reduce_sum

        codes = [int(m) for m in Modality]  # every rank sends every modality: same-shaped all-reduce
        flat = [self.nats, self.weight, float(self.tokens)]
        for c in codes:
            flat += self.mod.get(c, [0.0, 0.0])
        sums = all_reduce_sum(torch.tensor(flat, dtype=torch.float64, device=device), info).tolist()
        mod = {c: (sums[3 + 2 * i], sums[4 + 2 * i]) for i, c in enumerate(codes)}
        out = summarize(sums[0], sums[1], mod)
        out.pop("weight")
        out["bytes_per_s"] = sums[2] / max(time.perf_counter() - self.t0, 1e-9)
        out["tokens"] = sums[2]
        return out
