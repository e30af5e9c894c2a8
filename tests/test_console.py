"""Console output in batch jobs: no progress bar when stderr is not a terminal, plain loss lines instead, and
``--quiet`` keeps those lines while dropping the chatter."""

from __future__ import annotations

import subprocess
import sys

from test_train_run import write_config


def _train(tmp_path, *extra):
    cfg = write_config(tmp_path, train={"steps": 20, "log_every": 5, "eval_every": 0, "ckpt_every": 0,
                                        "progress": True})
    return subprocess.run([sys.executable, "-m", "omnibyte", "train", str(cfg), *extra], capture_output=True,
                          text=True, timeout=300)


def test_no_bar_off_a_terminal_and_plain_loss_lines(tmp_path):
    res = _train(tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "\r" not in res.stderr  # no carriage-return bar updates in a log file
    lines = [ln for ln in res.stderr.splitlines() if "omnibyte.progress" in ln]
    assert [ln.split("step ")[1].split()[0] for ln in lines] == ["5/20", "10/20", "15/20", "20/20"]
    assert all(" loss " in ln and " bpb " in ln and "bytes/s" in ln for ln in lines)


def test_quiet_keeps_the_loss_lines(tmp_path):
    res = _train(tmp_path, "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sum("omnibyte.progress" in ln for ln in res.stderr.splitlines()) == 4
    assert "omnibyte.train INFO" not in res.stderr  # the chatter is gone
