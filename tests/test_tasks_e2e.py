"""prepare -> train -> eval end to end on CPU through the CLI (tiny models, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_overrides import QUICK, TINY_MBLM

from omnibyte.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"
MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg19-mini"


def _eval(run_dir: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run_dir), *extra]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_clevr_prepare_train_eval(tmp_path, capsys):
    data, runs = tmp_path / "data", tmp_path / "runs"
    common = [f"task.root={FIXTURE}", "serializer.image.size=[16,12]", "model.stages.0.length=128",
              "data.seq_len=1024"]
    assert main(["prepare", "clevr_vqa_png", *common, "--out", str(data), "--no-progress"]) == 0
    assert main(["train", "clevr_vqa_png", *common, *TINY_MBLM, *QUICK, "data.source=shards",
                 f"data.path={data}", f"out_dir={runs}", "--quiet"]) == 0
    res = _eval(runs / "clevr_vqa_png", capsys, "eval.max_samples=4")
    task = res["task"]
    assert task["num_samples"] == 4 and set(task["modes"]) == {"generate", "rank"}
    assert set(task["by_qtype_rank"]) == {"count", "exist", "compare_attribute", "query_attribute"}
    assert list((runs / "clevr_vqa_png" / "eval").glob("vqa_val_*.json"))
    assert "bpb/answer" in res


def test_cnn_lstm_baseline_trains_and_evaluates(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "clevr_cnn_lstm", f"task.root={FIXTURE}", "serializer.image.size=[16,12]",
                 "model.image.size=[16,12]", "model.trunk_stages=1", "model.embed_dim=8", "model.lstm_hidden=8",
                 "model.mlp_hidden=8", *QUICK, f"out_dir={runs}", "--quiet"]) == 0
    task = _eval(runs / "clevr_cnn_lstm", capsys, "eval.max_samples=4")["task"]
    # ranked and generated through the model contract like a byte model; the head's classes are the answers
    # of the training split (filled in by the run)
    assert task["modes"] == ["generate", "rank"] and task["num_samples"] == 4 and 0 <= task["accuracy"] <= 1
    assert task["num_unanswerable"] == 0


@pytest.mark.skipif(not MINI.is_dir(), reason="../shared/data/pg19-mini is absent")
def test_pg19_train_eval_reports_bpb_and_word_ppl(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "pg19_lm", f"task.root={MINI}", "task.max_bytes=2000", *TINY_MBLM, *QUICK,
                 "data.seq_len=128", f"out_dir={runs}", "--quiet"]) == 0
    task = _eval(runs / "pg19_lm", capsys, "eval.max_samples=1", "task.eval_stride=64")["task"]
    assert task["split"] == "validation" and task["num_books"] == 1 and task["num_bytes"] == 2000
    assert task["context"] == 128 and task["stride"] == 64 and task["num_words"] > 300
    assert 0 < task["bpb"] < 10 and task["word_ppl"] > 1
    # transfer: the CLEVR config starts from this PG19 run (same model)
    assert main(["train", "pg19_to_clevr_png", f"task.root={FIXTURE}", "serializer.image.size=[16,12]",
                 f"train.init_from={runs / 'pg19_lm'}", *TINY_MBLM, *QUICK, "train.steps=1", f"out_dir={runs}",
                 "eval.max_samples=2", "--quiet"]) == 0


def test_a_run_trained_from_shards_evaluates_on_its_shards_alone(tmp_path, capsys, monkeypatch):
    """With data.source=shards and no task.root, `omnibyte eval` used to render the default generated CLEVR set
    and report VQA accuracy on it beside bpb from the shards: two datasets in one report. Now every number
    comes from the shards, and no default set is made."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OMNIBYTE_CACHE", str(cache))
    data, runs = tmp_path / "data", tmp_path / "runs"
    common = ["serializer.image.size=[16,12]", "model.stages.0.length=128", "data.seq_len=1024"]
    assert main(["prepare", "clevr_vqa_png", f"task.root={FIXTURE}", *common, "--out", str(data),
                 "--no-progress"]) == 0
    assert main(["train", "clevr_vqa_png", *common, *TINY_MBLM, *QUICK, "data.source=shards", f"data.path={data}",
                 f"out_dir={runs}", "--quiet"]) == 0
    res = _eval(runs / "clevr_vqa_png", capsys)
    val = json.loads((FIXTURE / "questions" / "CLEVR_val_questions.json").read_text())["questions"]
    assert res["data_source"] == "shards" and res["task"]["num_samples"] == len(val)
    preds = (runs / "clevr_vqa_png" / "eval").glob("*pred*")
    ids = {json.loads(line)["id"] for p in preds for line in p.read_text().splitlines() if line.strip()}
    assert ids and all("val" in i for i in ids)
    assert not list(cache.glob("clevr-synth-*"))  # no default set was rendered
