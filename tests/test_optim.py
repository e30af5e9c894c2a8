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
