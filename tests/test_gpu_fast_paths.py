"""GPU: the training fast paths (torch.compile per layer, CUDA graphs of the Mamba stage, the fused AdamW with
its device-side skip) follow the eager, unfused loop's loss curve within bf16 tolerance over 20 steps of
``omnibyte train`` -- the same data, seed and schedule."""

from __future__ import annotations

import pytest
import torch
from model_helpers import M2K
from test_train_run import write_config

from omnibyte.cli import main
from omnibyte.logging import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = {"name": "mblm", "stages": [
    {"length": 16, "width": 64, "layers": 2, "block": dict(M2K, d_state=32, headdim=16, chunk_size=16)},
    {"length": 4, "width": 64, "layers": 1, "block": {"name": "transformer", "heads": 2}}]}


def _curve(tmp_path, name, **train):
    cfg = write_config(tmp_path, name, model=MODEL, train={
        "steps": 20, "log_every": 1, "eval_every": 0, "ckpt_every": 0, "device": "cuda", "warmup": 2, **train})
    assert main(["train", str(cfg), "--quiet"]) == 0
    return [r["loss"] for r in read_metrics(tmp_path / "runs" / name) if r["split"] == "train"]


def test_gpu_fast_paths_follow_the_eager_curve(tmp_path):
    from omnibyte.model.blocks.mamba2 import load_mamba_kernels

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not loadable")
    eager = _curve(tmp_path, "eager", fused_optimizer=False)
    fused = _curve(tmp_path, "fused", fused_optimizer=True)
    fast = _curve(tmp_path, "fast", fused_optimizer=True, compile=True, cuda_graphs=True)
    assert len(eager) == 20 and eager[-1] < eager[0]  # it learns
    assert "fused (non-finite steps skipped on the device)" in (tmp_path / "runs/fast/train.log").read_text()
    assert fused == pytest.approx(eager, rel=2e-2)
    assert fast == pytest.approx(eager, rel=2e-2)
    nan = _curve(tmp_path, "nan", fused_optimizer=True, inject_nan_at=[5, 6])  # skipped on the device
    assert nan[4] is None and nan[5] is None and nan[6] is not None


def test_gpu_ddp_cuda_graphs_follow_the_ddp_eager_curve(tmp_path):
    """Two DDP processes (NCCL on two GPUs; on one GPU both ranks share it over gloo): the Mamba stage replayed
    as CUDA graphs gives the eager DDP run's loss curve, so the all-reduce (outside the graphs, from DDP's hooks)
    reduces each step's gradients once."""
    import subprocess

    from test_train_torchrun import _torchrun

    from omnibyte.model.blocks.mamba2 import load_mamba_kernels

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not loadable")
    two = torch.cuda.device_count() >= 2
    curves = {}
    # graphs alone (no compile, the unfused optimizer): what differs between the two runs is the capture under DDP
    for name, fast in (("ddp_eager", {}), ("ddp_graphs", {"cuda_graphs": True})):
        cfg = write_config(tmp_path, name, model=MODEL, parallel={"strategy": "ddp", "backend": "auto" if two else "gloo"},
                           train={"steps": 20, "log_every": 1, "eval_every": 0, "ckpt_every": 0, "warmup": 2,
                                  "device": "cuda" if two else "cuda:0", "fused_optimizer": False, **fast})
        cmd, env = _torchrun(cfg)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stderr[-4000:]
        curves[name] = [r["loss"] for r in read_metrics(tmp_path / "runs" / name) if r["split"] == "train"]
    log = (tmp_path / "runs/ddp_graphs/train.log").read_text()
    assert "CUDA graphs for 1 stage block(s)" in log and "CUDA graphs captured" in log
    eager = curves["ddp_eager"]
    assert len(eager) == 20 and eager[-1] < eager[0]
    assert curves["ddp_graphs"] == pytest.approx(eager, rel=2e-2)
