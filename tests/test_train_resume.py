"""kill -9 mid-run, then `resume: auto`: the loss curve is the uninterrupted one, bit for bit (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from test_train_run import write_config

from omnibyte.cli import main
from omnibyte.logging import read_metrics


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def test_kill_and_resume_gives_the_same_curve(tmp_path):
    steps = 40
    train = {"steps": steps, "log_every": 3, "ckpt_every": 5, "eval_every": 0, "keep_last": 1}  # log windows straddle checkpoints
    data = {"workers": 0}  # the worker-split position is tested in test_train_loader.py
    ref_cfg = write_config(tmp_path, "ref", train=train, data=data)
    assert main(["train", str(ref_cfg), "--quiet"]) == 0
    ref = _losses(tmp_path / "runs/ref")

    cfg = write_config(tmp_path, "killed", train=train, data=data)
    run = tmp_path / "runs/killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "omnibyte", "train", str(cfg), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if max(_losses(run), default=0) >= 17:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run))
    assert 17 <= killed_at < steps

    assert main(["train", str(cfg), "--quiet"]) == 0  # resume: auto is the default
    got = _losses(run)
    assert sorted(got) == list(range(3, steps + 1, 3)) + [steps]
    assert got == ref  # exactly, every step (the checkpoint's position, weights, optimizer and RNG)
