"""`torchrun --nproc-per-node 2 -m omnibyte train ...` on CPU (gloo): DDP and FSDP2 run, log and checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_train_run import write_config

from omnibyte.checkpoint import latest_checkpoint, read_state
from omnibyte.cli import main
from omnibyte.logging import read_metrics


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow),  # two processes: 5 s
                                      pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_torchrun_two_cpu_processes(tmp_path, strategy):
    cfg = write_config(tmp_path, strategy, train={"steps": 4, "log_every": 2, "eval_every": 4, "ckpt_every": 2},
                       data={"batch_size": 4}, parallel={"strategy": strategy})
    if strategy == "fsdp2":  # bf16 params through FSDP2's mixed-precision policy, as on GPU
        text = cfg.read_text().replace("progress: false", "progress: false\n  precision: bf16")
        cfg.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its stack
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "omnibyte", "train", str(cfg), "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "runs" / strategy
    records = read_metrics(run)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    assert any(r["split"] == "validation" for r in records)
    ckpt = latest_checkpoint(run / "checkpoints")
    state = read_state(ckpt)
    assert state["step"] == 4 and state["world"] == 2 and len(state["data"]) == 2
    # sharded: every rank wrote its own shards (torch.distributed.checkpoint), nothing gathered on rank 0
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert state["format"] == "sharded" and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert state["config"]["train"]["precision"] == ("bf16" if strategy == "fsdp2" else "auto")
    # the sharded checkpoint of a multi-process run loads in one CPU process
    assert main(["eval", str(run), "eval.per_token=false"]) == 0
    # and exports as one safetensors file, equal to the sharded weights
    from safetensors.torch import load_file

    from omnibyte.checkpoint import load_weights

    out = tmp_path / f"{strategy}.safetensors"
    assert main(["export", str(run), "--checkpoint", "latest", "--out", str(out)]) == 0
    exported, sharded = load_file(str(out)), load_weights(ckpt)
    assert exported.keys() == sharded.keys() and all(torch.equal(exported[k], sharded[k]) for k in exported)
    if strategy == "ddp":
        return
    # resuming under torchrun (each rank reloads its shards of weights and optimizer state)
    res = subprocess.run(cmd[:-1] + ["train.steps=6", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [2, 4, 6]


def _torchrun(cfg, *extra, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its stack
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "omnibyte", "train", str(cfg), "--quiet", *extra]
    return cmd, env


@pytest.mark.slow
def test_fsdp2_killed_run_resumes_on_the_uninterrupted_curve(tmp_path):
    """kill -9 of a 2-process FSDP2 run after a sharded checkpoint; the resumed run's losses equal an
    uninterrupted run's, and the run's weights load in one CPU process."""
    import signal
    import time

    def config(name):
        return write_config(tmp_path, name, train={"steps": 8, "log_every": 1, "eval_every": 0, "ckpt_every": 2},
                            data={"batch_size": 4}, parallel={"strategy": "fsdp2"})

    cmd, env = _torchrun(config("whole"))
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=240).returncode == 0
    cmd, env = _torchrun(config("killed"))
    run = tmp_path / "runs" / "killed"
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 200
    while not (run / "checkpoints" / "step_000004" / "state.json").is_file():
        assert p.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    whole = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "runs" / "whole") if r["split"] == "train"}
    resumed = {r["step"]: r["loss"] for r in read_metrics(run) if r["split"] == "train"}
    assert sorted(resumed) == list(range(1, 9))
    for k in whole:
        assert resumed[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k
    assert main(["eval", str(run), "eval.per_token=false", "--quiet"]) == 0


@pytest.mark.slow
def test_sigterm_stops_a_ddp_run_at_a_log_step_with_a_checkpoint_and_it_resumes(tmp_path):
    """SIGTERM to torchrun (which passes it to its workers, as a cluster's time limit does): the ranks agree to stop
    at the next log step, write one checkpoint there (ckpt_every is off) and exit; the same command resumes and
    the losses equal an uninterrupted run's."""
    import signal
    import time

    def config(name):
        return write_config(tmp_path, name, train={"steps": 60, "log_every": 3, "eval_every": 0, "ckpt_every": 0},
                            data={"batch_size": 4, "workers": 0}, parallel={"strategy": "ddp"})

    cmd, env = _torchrun(config("whole"))
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=240).returncode == 0
    cmd, env = _torchrun(config("stopped"))
    run = tmp_path / "runs" / "stopped"
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 200

    def logged():
        return [r["step"] for r in read_metrics(run) if r["split"] == "train"] if (run / "metrics.jsonl").is_file() else []
    while max(logged(), default=0) < 6:
        assert p.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert "SIGTERM received: stopping after the step in progress" in err, err[-3000:]
    stopped_at = max(logged())
    assert stopped_at % 3 == 0 and 6 <= stopped_at < 60, stopped_at
    assert f"stopped at step {stopped_at} of train.steps=60 (SIGTERM)" in err, err[-3000:]
    ckpts = sorted(x.name for x in (run / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{stopped_at:06d}"]
    assert read_state(run / "checkpoints" / ckpts[0])["world"] == 2
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    whole = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "runs" / "whole") if r["split"] == "train"}
    resumed = {r["step"]: r["loss"] for r in read_metrics(run) if r["split"] == "train"}
    assert sorted(resumed) == sorted(whole)
    for k in whole:
        assert resumed[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow
def test_ddp_run_with_cuda_graphs_on_follows_the_ddp_curve(tmp_path):
    """train.cuda_graphs is no longer refused under DDP: the graphs sit inside each block and DDP's all-reduce
    runs outside them (GPU: test_gpu_ddp_cuda_graphs_follow_the_ddp_eager_curve). On CPU there is no stage
    to graph, so the 2-process run's losses equal the run without the option."""
    curves = {}
    for name, graphs in (("plain", False), ("graphs", True)):
        cfg = write_config(tmp_path, name, train={"steps": 4, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
                                                  "cuda_graphs": graphs},
                           data={"batch_size": 4}, parallel={"strategy": "ddp"})
        cmd, env = _torchrun(cfg)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-4000:]
        curves[name] = [r["loss"] for r in read_metrics(tmp_path / "runs" / name) if r["split"] == "train"]
    assert len(curves["plain"]) == 4 and curves["graphs"] == curves["plain"]
    assert "CUDA graphs for 0 stage block(s)" in (tmp_path / "runs/graphs/train.log").read_text()
