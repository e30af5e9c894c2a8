"""The optimizer's parameter groups: which tensors get weight decay."""

from __future__ import annotations

import pytest

from omnibyte.model import build_model
from omnibyte.optim import build_optimizer
from omnibyte.runconfig import TrainConfig


@pytest.mark.parametrize("block", [{"name": "mamba1", "d_state": 4}, {"name": "mamba2", "d_state": 8, "headdim": 8}])
def test_ssm_parameters_are_never_decayed(block):
    """mamba-ssm marks A_log, D (and dt_bias) _no_weight_decay; Mamba-1's A_log is a matrix, and a rule of
    'matrices decay' alone pulled it towards 0 (A towards -1) at every step."""
    model = build_model({"name": "mblm", "stages": [
        {"length": 8, "width": 32, "layers": 1, "block": block},
        {"length": 4, "width": 16, "layers": 1, "block": {"name": "transformer", "heads": 2}}]})
    decay_group, rest = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    decayed = {id(p) for p in decay_group["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    ssm = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")]
    assert ssm and not [n for n in ssm if id(dict(model.named_parameters())[n]) in decayed]
    assert rest["weight_decay"] == 0.0 and decay_group["weight_decay"] == 0.1
    # matrices of projections still decay; norms and biases do not
    assert any(names[i].endswith("in_proj.weight") for i in decayed)
    assert not any(names[i].endswith(".bias") or "norm" in names[i] for i in decayed)


def _old_rule(model, t, strategy="none"):
    """build_optimizer before 4e4bd53: every matrix decayed (Mamba-1's A_log included)."""
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=t.lr, betas=t.betas, eps=t.eps)


def test_a_run_begun_under_another_decay_rule_goes_on_as_it_began(tmp_path, monkeypatch, caplog):
    """A Mamba-1 run checkpointed under the old rule (A_log decayed) and resumed by today's omnibyte keeps decaying
    A_log, says so, and its losses equal an uninterrupted run's under the old rule; the checkpoint records the
    grouping it was written with."""
    import json
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_train_run import write_config

    import omnibyte.train as T
    from omnibyte.cli import main
    from omnibyte.logging import read_metrics

    model = {"stages": [{"length": 8, "width": 32, "layers": 1, "block": {"name": "mamba1", "d_state": 4}},
                        {"length": 8, "width": 16, "layers": 1, "block": {"name": "transformer", "heads": 2}}]}
    train = {"steps": 6, "ckpt_every": 3, "eval_every": 0, "log_every": 1, "weight_decay": 0.5}

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(run) if r["split"] == "train"}

    monkeypatch.setattr(T, "build_optimizer", _old_rule)
    assert main(["train", str(write_config(tmp_path, "whole", model=model, train=train)), "--quiet"]) == 0
    cfg = write_config(tmp_path, "resumed", model=model, train={**train, "steps": 3})
    assert main(["train", str(cfg), "--quiet"]) == 0
    state = json.loads((tmp_path / "runs/resumed/checkpoints/step_000003/state.json").read_text())
    assert "blocks.0.layers.0.mixer.A_log" not in state["no_weight_decay"]  # recorded: decayed
    assert "blocks.0.norm.weight" in state["no_weight_decay"]
    monkeypatch.undo()  # today's rule from here on
    assert main(["train", str(cfg), "train.steps=6", "--quiet"]) == 0
    assert "this run began under another weight-decay rule for 1 parameter(s): blocks.0.layers.0.mixer.A_log " \
           "(decayed in the run so far)" in caplog.text
    assert losses(tmp_path / "runs/resumed") == losses(tmp_path / "runs/whole")  # exactly


def test_a_checkpoint_without_the_record_is_read_from_its_optimizer_groups(tmp_path, monkeypatch, caplog):
    """Checkpoints written before the record existed: the saved optimizer's own groups give the grouping."""
    import json
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_train_run import write_config

    import omnibyte.train as T
    from omnibyte.cli import main

    model = {"stages": [{"length": 8, "width": 32, "layers": 1, "block": {"name": "mamba1", "d_state": 4}},
                        {"length": 8, "width": 16, "layers": 1, "block": {"name": "transformer", "heads": 2}}]}
    cfg = write_config(tmp_path, "old", model=model, train={"steps": 2, "ckpt_every": 2, "eval_every": 0})
    monkeypatch.setattr(T, "build_optimizer", _old_rule)
    assert main(["train", str(cfg), "--quiet"]) == 0
    monkeypatch.undo()
    path = tmp_path / "runs/old/checkpoints/step_000002/state.json"
    state = json.loads(path.read_text())
    del state["no_weight_decay"]
    path.write_text(json.dumps(state))
    assert main(["train", str(cfg), "train.steps=3", "--quiet"]) == 0  # state.json holds the checksums, not one
    assert "blocks.0.layers.0.mixer.A_log (decayed in the run so far)" in caplog.text
