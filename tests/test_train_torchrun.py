"""`torchrun --nproc-per-node 2 -m omnibyte train ...` on CPU (gloo): DDP and FSDP2 run, log and checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_train_run import write_config

from omnibyte.checkpoint import latest_checkpoint, read_state
from omnibyte.cli import main
from omnibyte.logging import read_metrics


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_two_cpu_processes(tmp_path, strategy):
    cfg = write_config(tmp_path, strategy, train={"steps": 4, "log_every": 2, "eval_every": 4, "ckpt_every": 2},
                       data={"batch_size": 4}, parallel={"strategy": strategy})
    if strategy == "fsdp2":  # bf16 params through FSDP2's mixed-precision policy, as on GPU
        text = cfg.read_text().replace("progress: false", "progress: false\n  precision: bf16")
        cfg.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "omnibyte", "train", str(cfg), "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "runs" / strategy
    records = read_metrics(run)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    assert any(r["split"] == "validation" for r in records)
    state = read_state(latest_checkpoint(run / "checkpoints"))
    assert state["step"] == 4 and state["world"] == 2 and len(state["data"]) == 2
    assert state["config"]["train"]["precision"] == ("bf16" if strategy == "fsdp2" else "auto")
    # the (unsharded) checkpoint of a multi-process run loads in one process
    assert main(["eval", str(run), "eval.per_token=false"]) == 0
    if strategy == "ddp":
        return
    # resuming under torchrun (sharded weights and optimizer reloaded from the full checkpoint)
    res = subprocess.run(cmd[:-1] + ["train.steps=6", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [2, 4, 6]
