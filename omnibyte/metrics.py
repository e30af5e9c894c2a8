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
    """Loss sums over the steps since the last log line. The sums stay on the device (no host sync per step); the
    host reads them at a log line (:meth:`summary`) or a checkpoint (:meth:`state`)."""

    CODES = tuple(int(m) for m in Modality)

    def __init__(self, saved: dict | None = None):
        self.tokens, self.steps = 0, 0
        self._start = [0.0] * (2 + 2 * len(self.CODES))  # nats, weight, then (nats, weight) per modality code
        self._carried = 0  # tokens of a saved window: trained by an earlier process, not in this one's bytes/s
        if saved:
            self.tokens, self.steps = saved["tokens"], saved["steps"]
            self._carried = saved["tokens"]
            mod = {int(c): v for c, v in saved["mod"].items()}
            self._start = [saved["nats"], saved["weight"], *(x for c in self.CODES for x in mod.get(c, (0.0, 0.0)))]
        self._sums: torch.Tensor | None = None
        self.t0 = time.perf_counter()

    def add(self, nats: torch.Tensor, weight: torch.Tensor, per_mod: dict, keep: torch.Tensor | None = None) -> None:
        """One step's sums (0-dim float64 tensors; ``per_mod``: {code: (nats, weight)}). ``keep``: a 0-dim bool
        tensor, the step counts only where it is true (a step skipped on the device)."""
        zero = nats.new_zeros(())
        parts = [nats, weight, *(x for c in self.CODES for x in per_mod.get(c, (zero, zero)))]
        vec = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=nats.device) for x in parts])
        if keep is not None:
            vec = torch.where(keep, vec, 0.0)
        if self._sums is None:  # the saved part of a window a checkpoint cut in two comes first, as on the host
            # (0 + x == x: a fresh window starts from this step's sums, with no host-to-device copy, which from
            # pageable memory would wait for the device)
            self._sums = vec if not any(self._start) else torch.tensor(self._start, dtype=torch.float64,
                                                                       device=nats.device) + vec
        else:
            self._sums = self._sums + vec
        self.steps += 1

    def _values(self, device: torch.device) -> torch.Tensor:
        if self._sums is None:
            return torch.tensor(self._start, dtype=torch.float64, device=device)
        return self._sums.to(device)

    def state(self) -> dict:
        v = self._values(torch.device("cpu")).tolist()
        mod = {c: [v[2 + 2 * i], v[3 + 2 * i]] for i, c in enumerate(self.CODES) if v[2 + 2 * i] or v[3 + 2 * i]}
        return {"nats": v[0], "weight": v[1], "tokens": self.tokens, "steps": self.steps, "mod": mod}

    def summary(self, info, device: torch.device) -> dict:
        """Loss, bpb (overall and per modality), bytes/s and ``tokens`` (this window's, all ranks)."""
        from .parallel import all_reduce_sum

        # every rank sends every modality: a same-shaped all-reduce
        flat = torch.cat((self._values(device), torch.tensor([float(self.tokens), float(self.tokens - self._carried)],
                                                             dtype=torch.float64, device=device)))
        sums = all_reduce_sum(flat, info).tolist()
        mod = {c: (sums[2 + 2 * i], sums[3 + 2 * i]) for i, c in enumerate(self.CODES)}
        out = summarize(sums[0], sums[1], mod)
        out.pop("weight")
        # the rate of this process: a resumed run's first line does not credit it with the tokens the saved part
        # of its window took in the process before (their time is not in this one's clock)
        out["bytes_per_s"] = sums[-1] / max(time.perf_counter() - self.t0, 1e-9)
        out["tokens"] = sums[-2]
        return out
