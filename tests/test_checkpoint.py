"""Atomic checkpoints: an interrupted write leaves the previous one whole; pruning keeps the best."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from omnibyte import checkpoint as ck


def _save(d, step, value, **kw):
    model = {"blocks.0.w": torch.full((2, 2), float(value)), "head.weight": torch.ones(3)}
    model["tied"] = model["head.weight"]  # shared storage is written as separate tensors
    return ck.save_checkpoint(d, step, model_state=model, optim_state={"state": {}, "lr": 0.1},
                              rng=[ck.rng_state()], state={"data": [{"consumed": step}]}, **kw)


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    _save(d, 1, 1.0)
    real_save = torch.save

    def crash(obj, f, *a, **k):  # dies half-way through the second checkpoint (after the weights)
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(d, 2, 2.0)
    monkeypatch.undo()
    # a crash that left its temp folder behind (kill -9 skips the cleanup)
    (d / ".tmp-step_000003-999").mkdir()
    (d / ".tmp-step_000003-999" / "model.safetensors").write_bytes(b"partial")
    latest = ck.latest_checkpoint(d)
    assert latest.name == "step_000001" and not (d / "step_000002").exists()
    assert ck.read_state(latest)["step"] == 1
    assert torch.equal(ck.load_weights(latest)["blocks.0.w"], torch.ones(2, 2))
    optim, rng = ck.load_training_state(latest)
    assert optim["lr"] == 0.1 and len(rng) == 1
    _save(d, 4, 4.0)  # the next save clears the leftovers
    assert not list(d.glob(".tmp-*")) and ck.latest_checkpoint(d).name == "step_000004"


def test_latest_pointer_falls_back_to_newest_complete(tmp_path):
    d = tmp_path / "checkpoints"
    _save(d, 1, 1.0)
    _save(d, 2, 2.0)
    (d / "latest").write_text("step_000009\n")  # points at nothing
    assert ck.latest_checkpoint(d).name == "step_000002"


def test_keep_last_and_best(tmp_path):
    d = tmp_path / "checkpoints"
    _save(d, 1, 1.0, keep_last=2, best={"step": 1, "metric": "bpb", "value": 0.5})
    for s in (2, 3, 4):
        _save(d, s, s, keep_last=2, best={"step": 1, "metric": "bpb", "value": 0.5})
    assert sorted(p.name for p in d.glob("step_*")) == ["step_000001", "step_000003", "step_000004"]
    assert ck.resolve_checkpoint(tmp_path, "best").name == "step_000001"
    assert ck.resolve_checkpoint(tmp_path).name == "step_000004"


def test_weights_are_plain_safetensors_with_contract(tmp_path):
    p = _save(tmp_path, 5, 5.0)
    w = load_file(str(p / "model.safetensors"))
    assert torch.equal(w["tied"], w["head.weight"])
    state = json.loads((p / "state.json").read_text())
    state["contract_version"] = 99
    (p / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="token contract version 99"):
        ck.read_state(p)


def test_rng_round_trip():
    import random

    import numpy as np

    s = ck.rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    ck.set_rng_state(s)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_select_stages():
    w = {"blocks.0.a": 1, "start.0": 2, "patch_embed.0.0.weight": 3, "to_next.0.weight": 4, "blocks.1.a": 5,
         "start.1": 6, "embed.weight": 7, "head.weight": 8}
    assert set(ck.select_stages(w, (0,))) == {"blocks.0.a", "start.0", "patch_embed.0.0.weight", "to_next.0.weight"}
    assert set(ck.select_stages(w, (-1,))) == {"blocks.1.a", "start.1", "embed.weight", "head.weight"}
    assert ck.select_stages(w, ()) == w
    with pytest.raises(ValueError, match="has stages 0..1"):
        ck.select_stages(w, (5,))
