"""Console output in batch jobs: no progress bar when stderr is not a terminal, plain loss lines instead, and
``--quiet`` keeps those lines while dropping the chatter."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_train_run import write_config


def _train(tmp_path, *extra):
    cfg = write_config(tmp_path, train={"steps": 20, "log_every": 5, "eval_every": 0, "ckpt_every": 0,
                                        "progress": True})
    return subprocess.run([sys.executable, "-m", "omnibyte", "train", str(cfg), *extra], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # a subprocess or a whole run: the README command's 2-minute budget (CI runs -m slow)
def test_no_bar_off_a_terminal_and_plain_loss_lines(tmp_path):
    res = _train(tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "\r" not in res.stderr  # no carriage-return bar updates in a log file
    progress = [ln for ln in res.stderr.splitlines() if "omnibyte.progress" in ln]
    lines = [ln for ln in progress if " step " in ln and "/20" in ln]  # the loss lines (the rest: the summary)
    assert [ln.split("step ")[1].split()[0] for ln in lines] == ["5/20", "10/20", "15/20", "20/20"]
    assert all(" loss " in ln and " bpb " in ln and "bytes/s" in ln for ln in lines)
    assert any("global batch:" in ln for ln in progress) and any("run directory:" in ln for ln in progress)


@pytest.mark.slow  # a subprocess or a whole run: the README command's 2-minute budget (CI runs -m slow)
def test_quiet_keeps_the_loss_lines(tmp_path):
    res = _train(tmp_path, "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    progress = [ln for ln in res.stderr.splitlines() if "omnibyte.progress" in ln]
    assert sum(" loss " in ln and " step " in ln for ln in progress) == 4
    assert any("global batch:" in ln for ln in progress)  # the start-up summary is kept too
    assert "omnibyte.train INFO" not in res.stderr  # the chatter is gone
