"""Every shipped config loads as a run config and builds its task, serializer and model at a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omnibyte.config import configs_dir, load_yaml, to_dict
from omnibyte.model.api import StreamModel
from omnibyte.registry import MODELS, SERIALIZERS, TASKS
from omnibyte.runconfig import load_run_config
from omnibyte.stream import Batch
from omnibyte.tasks.clevr import CLEVR_ANSWERS

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"
CONFIGS = sorted(p.stem for p in configs_dir().glob("*.yaml"))


def presets_of(name: str) -> list[str]:
    return ["full", *(load_yaml(name).get("presets") or {})]


CASES = [(name, preset) for name in CONFIGS for preset in presets_of(name)]


def tiny_overrides(name: str, preset: str = "full") -> list[str]:
    """Shrink a config's model (widths, depths) keeping its kind, stage count and block types."""
    cfg = load_run_config(name, [f"preset={preset}"])
    model = to_dict(cfg.model)
    if model["name"] == "clevr_cnn_lstm":  # answers: what a run fills in from the task's answer vocabulary
        return [f"preset={preset}", "model.trunk_stages=1", "model.embed_dim=8", "model.lstm_hidden=8",
                "model.mlp_hidden=8", f"model.answers={json.dumps(list(CLEVR_ANSWERS))}"]
    out = [f"preset={preset}"]
    for i, stage in enumerate(model.get("stages", [])):
        out += [f"model.stages.{i}.width=16", f"model.stages.{i}.layers=1"]
        block = stage.get("block") or {}
        if "heads" in block:
            out.append(f"model.stages.{i}.block.heads=2")
        if "headdim" in block:  # mamba2: 2 heads of 16 over the expanded width 32
            out += [f"model.stages.{i}.block.headdim=16", f"model.stages.{i}.block.d_state=8"]
    return out


def test_configs_exist():
    assert {"clevr_vqa_png", "clevr_vqa_jpeg", "clevr_vqa_pixels", "clevr_vqa_pixels_patch", "pg19_lm",
            "pg19_to_clevr_png", "clevr_to_pg19", "clevr_cnn_lstm"} <= set(CONFIGS)


@pytest.mark.parametrize("name,preset", CASES)
def test_config_loads_and_builds_tiny(name, preset):
    cfg = load_run_config(name, tiny_overrides(name, preset))
    assert cfg.preset == preset and cfg.run_name == (name if preset == "full" else f"{name}_{preset}")
    task = TASKS.build(cfg.task)  # lazy: no data is read (nor generated) here
    serializer = SERIALIZERS.build(cfg.serializer)
    model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert task.packing in ("pad", "concat") and serializer is not None


def _first_streams(name, n=2):
    cfg = load_run_config(name, [f"task.root={FIXTURE}"])
    task, ser = TASKS.build(cfg.task), SERIALIZERS.build(cfg.serializer)
    return cfg, [ser(s) for s, _ in zip(task.samples("train"), range(n))]


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.startswith("clevr_vqa") or c in
                                  ("pg19_to_clevr_png", "clevr_cnn_lstm")])
def test_clevr_configs_fit_their_rows_and_run_a_step(name):
    """A real CLEVR-layout sample serializes within data.seq_len, and the tiny model takes the batch."""
    cfg, streams = _first_streams(name)
    assert all(len(s) <= cfg.data.seq_len for s in streams)
    assert cfg.serializer.loss == "answer" and cfg.eval.split == "val"
    model = MODELS.build(load_run_config(name, tiny_overrides(name)).model)
    meta = model.stream_meta
    batch = Batch.collate(streams, pad_to_multiple=meta.patch_product)
    if isinstance(model, StreamModel):
        out = model.batch_loss(batch)
    else:  # an MBLM before it implements the contract
        from omnibyte.loss import compute_loss

        out = compute_loss(model, batch.tokens, batch.loss_mask, batch.modality)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_select_on_a_validation_split(name):
    """Checkpoints are selected and runs evaluated on a validation split; a test split only on request."""
    cfg = load_run_config(name)
    split = cfg.eval.split
    assert "test" not in split.lower() and split != cfg.data.train_split
    assert split in ("val", "validation")


def test_cnn_lstm_needs_the_answer_vocabulary():
    cfg = load_run_config("clevr_cnn_lstm")
    assert tuple(cfg.model.answers) == () and tuple(cfg.task.answers) == ()  # filled by the run
    with pytest.raises(ValueError, match="model.answers is empty"):
        MODELS.build(cfg.model)


def test_pixel_lengths_match_the_documented_formula():
    for name, image_bytes in (("clevr_vqa_pixels", 62 * 41 * 3), ("clevr_vqa_pixels_patch", 64 * 48 * 3)):
        cfg, (s, _) = _first_streams(name)
        from omnibyte.vocab import Modality

        assert len(s.data_bytes(Modality.IMAGE)) == image_bytes
        assert cfg.data.seq_len % load_run_config(name).model.stages[1].length == 0


def test_transfer_pairs_share_the_model():
    clevr, pg19 = load_run_config("clevr_vqa_png", ["preset=full"]), load_run_config("pg19_lm")
    assert to_dict(clevr.model) == to_dict(pg19.model)
    a, b = load_run_config("pg19_to_clevr_png"), load_run_config("clevr_to_pg19")
    assert a.preset == "full"  # whatever the device: the model must match the run it starts from
    assert to_dict(a.model) == to_dict(pg19.model) and a.train.init_from.endswith("pg19_lm")
    assert to_dict(b.model) == to_dict(clevr.model) and b.train.init_from.endswith("clevr_vqa_png")
    assert a.task.name == "clevr_vqa" and b.task.name == "pg19"


@pytest.mark.parametrize("preset", ["full", "cpu"])
def test_cnn_lstm_baseline_matches_the_byte_models_setup(preset):
    base, cnn = load_run_config("clevr_vqa_base", [f"preset={preset}"]), load_run_config("clevr_cnn_lstm", [f"preset={preset}"])
    assert to_dict(cnn.task) == to_dict(base.task) and to_dict(cnn.eval) == to_dict(base.eval)
    assert to_dict(cnn.serializer) == to_dict(base.serializer)
    assert to_dict(cnn.model.image) == to_dict(cnn.serializer.image)
    assert (cnn.data.batch_size, cnn.train.steps, cnn.train.grad_accum) == (
        base.data.batch_size, base.train.steps, base.train.grad_accum)


def test_the_main_job_picks_its_preset_by_device_and_says_so():
    """Without CUDA the README's main command runs the small `cpu` preset; `preset=full` forces the GPU sizes."""
    auto = load_run_config("clevr_vqa_png", ["train.device=cpu"])
    full = load_run_config("clevr_vqa_png", ["preset=full"])
    assert auto.preset == "cpu" and auto.run_name == "clevr_vqa_png_cpu" and auto.eval.report
    assert full.preset == "full" and full.run_name == "clevr_vqa_png"
    n = lambda c: sum(p.numel() for p in MODELS.build(c.model).parameters())  # noqa: E731
    assert n(auto) < 1_000_000 < 10_000_000 < n(full)
    assert load_run_config("clevr_vqa_png", ["preset=cpu", "train.steps=7"]).train.steps == 7  # overrides win
    from omnibyte.config import ConfigError

    with pytest.raises(ConfigError, match="no such preset"):
        load_run_config("clevr_vqa_png", ["preset=tiny"])
    assert load_run_config("debug_tiny").preset == "full"  # no presets: the file as written


def test_the_gpu_sizes_say_how_to_pick_the_cpu_preset(caplog):
    """A device that resolves to CUDA runs the full sizes, and the log says so and names preset=cpu (it used to
    say nothing: only the CPU path was announced)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="omnibyte.config"):
        cfg = load_run_config("clevr_vqa_png", ["train.device=cuda"])
    assert cfg.preset == "full" and any("preset=cpu" in r.getMessage() for r in caplog.records)
