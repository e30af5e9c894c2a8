"""train.tracker=wandb, in W&B's offline mode (no network): the run is recorded under <run>/wandb/ with the id
kept in <run>/wandb_id, and a resumed run continues the same W&B run."""

from __future__ import annotations

import pytest
from test_train_run import write_config

from omnibyte.cli import main


@pytest.mark.slow  # wandb starts its service process: ~10 s
def test_wandb_offline_run_is_recorded_and_resumed(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = write_config(tmp_path, train={"steps": 2, "eval_every": 0, "ckpt_every": 2, "tracker": "wandb"})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    run_id = (run / "wandb_id").read_text().strip()
    files = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    # W&B names a segment's directory by the second it starts; this resume may start in the same second as the first
    # segment, which the tracker then waits out rather than write into (and replace) that segment's log.
    assert main(["train", str(cfg), "train.steps=4", "--quiet"]) == 0
    assert (run / "wandb_id").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))) == 2
