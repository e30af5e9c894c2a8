"""Skipped non-finite steps on the device path (fused AdamW's found_inf): weights, moments and step counts stay as
they were, a resumed fused run follows the uninterrupted one exactly, and the host path agrees step for step."""

from __future__ import annotations

import pytest
import torch
from test_train_run import write_config

from omnibyte.cli import main
from omnibyte.errors import TrainingError
from omnibyte.logging import read_metrics
from omnibyte.nonfinite import NonFiniteSteps


def _opt(fused):
    p = torch.nn.Parameter(torch.ones(4))
    return p, torch.optim.AdamW([p], lr=0.1, fused=fused)


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_step_changes_nothing(fused):
    p, opt = _opt(fused)
    guard = NonFiniteSteps(opt, max_in_row=2)
    assert guard.on_device == fused
    p.grad = torch.ones(4)
    guard.step(torch.tensor(True), 1)
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((4,), float("nan"))
    guard.step(torch.tensor(False), 2)
    guard.check(2)
    assert torch.equal(p.detach(), before[0]) and guard.total == 1
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())  # step count and moments too
    p.grad = torch.full((4,), float("nan"))
    with pytest.raises(TrainingError, match=r"2 non-finite steps in a row \(train.max_bad_steps=2\) at step 3"):
        guard.step(torch.tensor(False), 3)
        guard.check(3)


def test_device_path_counts_runs_across_checks():
    p, opt = _opt(True)
    guard = NonFiniteSteps(opt, max_in_row=3)
    for step, ok in enumerate([True, False, False], start=1):
        p.grad = torch.ones(4) if ok else torch.full((4,), float("nan"))
        guard.step(torch.tensor(ok), step)
    guard.check(3)  # 2 in a row so far: no stop, but counted
    assert guard.total == 2
    p.grad = torch.full((4,), float("nan"))
    guard.step(torch.tensor(False), 4)  # the third in a row, across the check
    with pytest.raises(TrainingError, match="at step 4"):
        guard.check(4)


def test_a_fused_run_resumes_on_the_uninterrupted_curve(tmp_path):
    train = {"steps": 8, "log_every": 1, "eval_every": 0, "ckpt_every": 0, "fused_optimizer": True,
             "inject_nan_at": [3]}
    assert main(["train", str(write_config(tmp_path, "ref", train=train)), "--quiet"]) == 0
    cfg = write_config(tmp_path, "cut", train={**train, "ckpt_every": 4})
    assert main(["train", str(cfg), "train.steps=4", "--quiet"]) == 0
    assert main(["train", str(cfg), "--quiet"]) == 0

    def curve(name):
        return {r["step"]: (r["loss"], r["bad_steps"]) for r in read_metrics(tmp_path / "runs" / name)
                if r["split"] == "train"}

    assert curve("cut") == curve("ref")


def test_fused_optimizer_choice():
    from omnibyte.config import ConfigError
    from omnibyte.optim import use_fused
    from omnibyte.runconfig import TrainConfig

    cpu = [torch.nn.Parameter(torch.ones(2))]
    assert use_fused(TrainConfig(), cpu) is False  # auto: CUDA only
    assert use_fused(TrainConfig(fused_optimizer=True), cpu) is True
    assert use_fused(TrainConfig(fused_optimizer=False), cpu) is False
    with pytest.raises(ConfigError, match="fsdp2"):
        use_fused(TrainConfig(fused_optimizer=True), cpu, "fsdp2")
