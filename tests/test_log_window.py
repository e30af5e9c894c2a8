"""omnibyte.metrics.LogWindow: the sums between two log lines, carried through a checkpoint."""

from __future__ import annotations

import math

import torch

from omnibyte.metrics import LN2, LogWindow
from omnibyte.parallel import DistInfo
from omnibyte.vocab import Modality


def _step(w: LogWindow, nats: float, weight: float, tokens: int) -> None:
    n, m = torch.tensor(nats, dtype=torch.float64), torch.tensor(weight, dtype=torch.float64)
    w.add(n, m, {int(Modality.TEXT): (n, m)})
    w.tokens += tokens


def test_a_window_cut_by_a_checkpoint_sums_as_one_and_rates_only_this_process():
    info, cpu = DistInfo(), torch.device("cpu")
    whole = LogWindow()
    for nats, weight in ((3.0, 2.0), (5.0, 4.0), (1.0, 1.0)):
        _step(whole, nats, weight, 100)
    first = LogWindow()
    _step(first, 3.0, 2.0, 100)
    _step(first, 5.0, 4.0, 100)
    resumed = LogWindow(first.state())  # the state a checkpoint keeps, read back by the next process
    _step(resumed, 1.0, 1.0, 100)
    a, b = whole.summary(info, cpu), resumed.summary(info, cpu)
    assert a["bpb"] == b["bpb"] == 9.0 / 7.0 / LN2 and a["bpb/text"] == b["bpb/text"]
    assert a["tokens"] == b["tokens"] == 300 and resumed.steps == 3
    # bytes/s: 100 tokens in this process's time, not 300 (200 were trained, and timed, by the process before)
    resumed.t0 -= 10.0
    assert math.isclose(resumed.summary(info, cpu)["bytes_per_s"], 10.0, rel_tol=0.01)
