"""Stopping early without losing the run: SIGTERM, Ctrl-C (SIGINT to the process group, DataLoader workers
included) and ``train.stop_after_minutes`` checkpoint the step reached; the same command resumes and follows the
uninterrupted curve exactly (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_train_run import write_config

from omnibyte.cli import main
from omnibyte.logging import read_metrics

STEPS = 30
TRAIN = {"steps": STEPS, "log_every": 1, "ckpt_every": 0, "eval_every": 0, "keep_last": 1}


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def _ckpt_steps(run_dir):
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp, "ref", train=TRAIN, data={"workers": 0})
    assert main(["train", str(cfg), "--quiet"]) == 0
    return _losses(tmp / "runs/ref")


@pytest.mark.parametrize("how", ["SIGTERM",
                                 pytest.param("SIGINT to the process group, with a DataLoader worker",
                                              marks=pytest.mark.slow),  # 5.5 s: the README command's budget
                                 pytest.param("SIGTERM to the process group, with a DataLoader worker",
                                              marks=pytest.mark.slow)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_run_resumes_exactly(tmp_path, reference, how):
    workers = 1 if "worker" in how else 0
    # with a worker: 8 micro-batches per step, fetched one at a time, so the signal lands mid-step and the step
    # still needs batches from a worker that got it too
    train = {**TRAIN, "grad_accum": 8} if workers else TRAIN
    cfg = write_config(tmp_path, "stopped", train=train, data={"workers": workers, "prefetch": 1})
    run = tmp_path / "runs/stopped"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "omnibyte", "train", str(cfg), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and max(_losses(run), default=0) < 5:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal: " + proc.stderr.read().decode()[-2000:]
    name = "SIGINT" if "SIGINT" in how else "SIGTERM"
    if workers:  # Ctrl-C in a terminal; a cluster's time limit (every process of the job)
        os.killpg(proc.pid, getattr(signal, name))
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    err = err.decode()
    assert proc.returncode == 0, err[-3000:]
    # said once, by the training process: the workers ignore the signal (they neither die of it nor act on it)
    assert err.count(f"{name} received: stopping after the step in progress") == 1, err[-3000:]
    stopped_at = max(_losses(run))
    assert 5 <= stopped_at < STEPS
    assert f"stopped at step {stopped_at} of train.steps={STEPS} ({name})" in err
    assert _ckpt_steps(run) == [stopped_at]  # ckpt_every=0: this checkpoint exists only because of the stop
    assert "Traceback" not in err

    assert main(["train", str(cfg), "--quiet"]) == 0  # the same command goes on
    if not workers:
        assert _losses(run) == reference  # exactly, every step
    assert _ckpt_steps(run) == [STEPS]


def test_stop_after_minutes_ends_each_invocation_and_the_run_still_follows_the_curve(tmp_path, reference, caplog):
    # 0.0001 minutes: every invocation stops after its first step
    cfg = write_config(tmp_path, "chunks", train={**TRAIN, "stop_after_minutes": 0.0001, "steps": 4},
                       data={"workers": 0})
    run = tmp_path / "runs/chunks"
    for invocation in range(1, 5):
        assert main(["train", str(cfg), "--quiet"]) == 0
        assert max(_losses(run)) == invocation
        assert _ckpt_steps(run) == [invocation]
    assert "stopped at step 3 of train.steps=4 (train.stop_after_minutes=0.0001)" in caplog.text
    assert "stopped at step 4" not in caplog.text  # the last step finishes the run, it does not stop it
    # a stopped run got no final report (the finished one did, once)
    assert caplog.text.count("best checkpoint: step") <= 1
    assert {s: reference[s] for s in range(1, 5)} == _losses(run)


def test_an_unfinished_run_gets_no_final_report(tmp_path, monkeypatch):
    import omnibyte.train as train_mod

    called = []
    monkeypatch.setattr(train_mod, "final_report", lambda *a, **k: called.append(a))
    cfg = write_config(tmp_path, "unfinished", train={**TRAIN, "stop_after_minutes": 0.0001},
                       eval={"report": True}, data={"workers": 0})
    assert main(["train", str(cfg), "--quiet"]) == 0
    assert called == []
    state = json.loads((tmp_path / "runs/unfinished/checkpoints/step_000001/state.json").read_text())
    assert state["step"] == 1


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_stop_after_minutes_must_be_a_finite_non_negative_number(tmp_path, bad, capsys):
    cfg = write_config(tmp_path, "bad", train={**TRAIN, "stop_after_minutes": bad})
    assert main(["train", str(cfg), "--quiet"]) != 0
    assert "train.stop_after_minutes must be a finite number >= 0" in capsys.readouterr().err
