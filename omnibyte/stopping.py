"""Stopping a run early without losing it: SIGTERM / SIGINT, and ``train.stop_after_minutes``.

A cluster's time limit (SLURM sends SIGTERM before it kills), a device with a per-command limit, or Ctrl-C should
end a run with a checkpoint at the step it reached, not at the last ``ckpt_every`` step. :class:`StopRequests`
turns the first SIGTERM or SIGINT into a request that the training loop honours after the step in progress
(checkpoint, then stop; the same command resumes). A second signal of the same kind is not caught: it stops the
process at once, as usual.

``train.stop_after_minutes`` asks for the same once this process has trained that long (measured from the start of
the loop, so start-up and shape warm-up are not counted; evaluations are). It limits one invocation, not the
run: run the command again and the run goes on from its checkpoint.

One process reads its flag after every step (host only: no device sync). Under DDP / FSDP2 the ranks must stop
at the same step (the checkpoint is collective), so they agree at log steps only, where the loop already reads
the device: a request waits at most ``train.log_every`` steps there.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch

from . import parallel

log = logging.getLogger("omnibyte.train")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """:meth:`install` before the loop, :meth:`restore` after it (in a ``finally``); :meth:`due` after each step
    says why to stop, or None."""

    def __init__(self, minutes: float, info: parallel.DistInfo, log_every: int):
        self.seconds = float(minutes) * 60.0
        self.info, self.log_every = info, log_every
        self.signal_name: str | None = None
        self.start = time.monotonic()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch the first SIGTERM / SIGINT from here on; the time limit counts from here."""
        self.start = time.monotonic()
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        """The handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.signal_name = name
        # the next one of this kind stops the process at once (the handler that was there before)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        log.warning("%s received: stopping after the step in progress, with a checkpoint (send it again to "
                    "stop at once, losing the steps since the last checkpoint)", name)

    def _local_reason(self) -> str | None:
        if self.signal_name:
            return self.signal_name
        if self.seconds > 0 and time.monotonic() - self.start >= self.seconds:
            return f"train.stop_after_minutes={self.seconds / 60:g}"
        return None

    def due(self, step: int) -> str | None:
        """Why the loop should stop after ``step`` (every rank gets the same answer), or None."""
        if self.info.world == 1:
            return self._local_reason()
        if step % self.log_every:
            return None
        mine = self._local_reason()
        flag = torch.tensor(0.0 if mine is None else 1.0, device=self.info.device)
        if float(parallel.all_reduce_sum(flag, self.info)) == 0:
            return None
        return mine or "another rank's stop request"


__all__ = ["StopRequests"]
