"""Non-finite training steps: skipped, counted, and the run stopped after ``train.max_bad_steps`` in a row.

A step whose loss or gradient norm is not finite (on any rank) changes no weight and no optimizer moment. How
the loop learns of it depends on the optimizer:

* **fused AdamW** (``train.fused_optimizer``; on CUDA by default): the decision stays on the device. The
  optimizer gets ``found_inf`` (PyTorch's fused AdamW then leaves parameters, moments and its step count as they
  were, as under a ``GradScaler``), and the counts live in device tensors. The host reads them only at
  :meth:`NonFiniteSteps.check` -- each log line, before each checkpoint, at the end -- so a training step has no
  host sync; a run that reached ``max_bad_steps`` in a row stops at the next check, naming the step where it did,
  and never writes a checkpoint after it.
* **any other optimizer**: the host asks every step (one sync) and warns and stops at once, as before.

Either way the same steps are skipped and the same error ends a diverged run.
"""

from __future__ import annotations

import logging

import torch

from .errors import TrainingError

log = logging.getLogger("omnibyte.train")


def _stop(in_row: int, limit: int, step: int) -> TrainingError:
    return TrainingError(f"{in_row} non-finite steps in a row (train.max_bad_steps={limit}) at step {step}; lower "
                         f"train.lr, check the data, or use precision fp32")


class NonFiniteSteps:
    def __init__(self, optimizer: torch.optim.Optimizer, max_in_row: int, total: int = 0):
        self.optimizer, self.limit, self.total = optimizer, max_in_row, total
        # the param groups decide (a resumed optimizer takes its groups' options from the checkpoint)
        self.on_device = all(g.get("fused") for g in optimizer.param_groups)
        self.in_row = 0  # host path
        self._dev: torch.Tensor | None = None  # device path: [in_row, skipped, first skipped step, stop step]

    def step(self, finite: torch.Tensor, step: int) -> torch.Tensor | bool:
        """Take optimizer step ``step`` (1-based) unless ``finite`` (a 0-dim bool tensor, agreed by every rank) is
        false. Returns whether the step counted: a device tensor on the device path, else a bool."""
        if self.on_device:
            bad = ~finite
            self.optimizer.found_inf = bad.to(torch.float32)
            self.optimizer.step()
            if self._dev is None:
                self._dev = torch.zeros(4, dtype=torch.long, device=finite.device)
            d, b = self._dev, bad.long()
            in_row = (d[0] + 1) * b
            first = torch.where((d[2] == 0) & bad, step, d[2])
            stop = torch.where((d[3] == 0) & (in_row >= self.limit), step, d[3])
            self._dev = torch.stack((in_row, d[1] + b, first, stop))
            return finite
        if bool(finite):
            self.optimizer.step()
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        log.warning("step %d: non-finite loss or gradient; skipped (%d in a row, %d in all)", step, self.in_row,
                    self.total)
        if self.in_row >= self.limit:
            raise _stop(self.in_row, self.limit, step)
        return False

    def check(self, step: int) -> None:
        """Device path: read the counts since the last check (one host sync), warn about skipped steps, and
        raise if ``max_bad_steps`` in a row were reached. The host path has nothing pending."""
        if self._dev is None:
            return
        in_row, skipped, first, stop = self._dev.tolist()
        self._dev = torch.stack((self._dev[0], *self._dev.new_zeros(3)))
        if skipped:
            self.total += skipped
            log.warning("non-finite loss or gradient: %d step(s) skipped of those up to step %d, the first at step "
                        "%d (%d in all)", skipped, step, first, self.total)
        if stop:
            raise _stop(self.limit, self.limit, stop)
