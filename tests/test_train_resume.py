"""kill -9 mid-run, then `resume: auto`: the loss curve is the uninterrupted one, bit for bit (CPU); a resume
reads the run's metrics.jsonl and each checkpoint file once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
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


def test_a_resume_reads_its_metrics_and_checkpoint_files_once(tmp_path, monkeypatch):
    """A resume parses metrics.jsonl once (is the run finished, is an evaluation pending, evaluations since the
    best and the lines the logger keeps all come from that one read) and torch.loads each checkpoint file once:
    it read metrics.jsonl up to four times and rng.pt twice, slow for a long run, and two reads could disagree."""
    import omnibyte.train as T

    cfg = write_config(tmp_path, train={"steps": 4, "eval_every": 4, "ckpt_every": 0, "log_every": 1},
                       eval={"report": False})  # the final report (plot) reads the records after training
    real_eval = T.evaluate_bpb

    def boom(*a, **k):
        raise RuntimeError("eval exploded")

    monkeypatch.setattr(T, "evaluate_bpb", boom)  # step 4's checkpoint is written, its evaluation is due
    with pytest.raises(RuntimeError, match="eval exploded"):
        main(["train", str(cfg), "--quiet"])
    monkeypatch.setattr(T, "evaluate_bpb", real_eval)

    reads: Counter = Counter()
    read_text, load = Path.read_text, torch.load

    def counting_read_text(self, *a, **k):
        reads[self.name] += 1
        return read_text(self, *a, **k)

    def counting_load(f, *a, **k):
        reads[Path(f).name] += 1
        return load(f, *a, **k)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    monkeypatch.setattr(torch, "load", counting_load)
    run = tmp_path / "runs" / "tiny"
    # finished, but its evaluation was due: every reader of the records runs (finished?, pending?, since best, logger)
    assert main(["train", str(cfg), "--quiet"]) == 0
    assert (reads["metrics.jsonl"], reads["optimizer.pt"], reads["rng.pt"]) == (1, 1, 1), reads
    assert any(r["split"] == "validation" and r["step"] == 4 for r in read_metrics(run))
    reads.clear()
    assert main(["train", str(cfg), "train.steps=6", "--quiet"]) == 0  # trains on from step 4
    assert (reads["metrics.jsonl"], reads["optimizer.pt"], reads["rng.pt"]) == (1, 1, 1), reads
    assert max(_losses(run)) == 6
