"""The end-of-training report (``eval.report``): VQA accuracy by question type beside the per-family answer
prior of the training split, and where the run's files are."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omnibyte.runconfig import load_run_config
from omnibyte.tasks.vqa_eval import answer_prior
from omnibyte.train import train

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"


def test_answer_prior_is_the_majority_training_answer_per_family():
    train_meta = [{"answer": "yes", "family": 1}, {"answer": "yes", "family": 1}, {"answer": "no", "family": 1},
                  {"answer": "3", "family": 2}, {"answer": "2", "family": 2}]  # family 2: a tie, "2" < "3"
    out = answer_prior(train_meta, golds=["yes", "no", "2", "red"], families=[1, 1, 2, 9],
                       qtypes=["exist", "exist", "count", "query_attribute"])
    assert out["by_qtype"] == {"count": 1.0, "exist": 0.5, "query_attribute": 0.0}  # family 9: overall "yes"
    assert out["accuracy"] == 0.5


def test_the_answer_prior_on_no_questions_is_not_a_measured_zero():
    out = answer_prior([{"answer": "yes", "family": 1}], golds=[], families=[], qtypes=[])
    assert math.isnan(out["accuracy"]) and out["by_qtype"] == {}


def test_the_prior_reads_the_same_training_meta_from_every_source(tmp_path):
    from omnibyte.data import eval_items
    from omnibyte.data.prepare import prepare
    from omnibyte.registry import SERIALIZERS, TASKS
    from omnibyte.run import training_meta

    out = tmp_path / "prepared"
    assert prepare("clevr_vqa_png", [f"task.root={FIXTURE}"], out=str(out), h5=True, splits="train", progress=False)
    val = [{"answer": "yes", "family": 1, "qtype": "exist"}, {"answer": "2", "family": 2, "qtype": "count"}]
    priors = {}
    for source, path in (("task", ""), ("shards", str(out)), ("h5", str(out / "train.h5"))):
        cfg = load_run_config("clevr_vqa_png", [f"task.root={FIXTURE}", f"data.source={source}", f"data.path={path}"])
        task, ser = TASKS.build(cfg.task), SERIALIZERS.build(cfg.serializer)
        meta = list(training_meta(cfg, task, ser))
        assert len(meta) == 8 and all("answer" in m and "family" in m for m in meta), source
        if source != "task":  # the metadata of the serialized items, without serializing them
            assert meta == [it.meta for it in eval_items(cfg.data, task, ser, cfg.data.train_split)], source
        priors[source] = answer_prior(meta, [v["answer"] for v in val], [v["family"] for v in val],
                                      [v["qtype"] for v in val])
    assert priors["task"] and priors["shards"] == priors["h5"] == priors["task"]


def test_training_ends_with_a_vqa_report(tmp_path, caplog):
    cfg = load_run_config("clevr_vqa_pixels", [
        f"task.root={FIXTURE}", "preset=cpu", f"out_dir={tmp_path / 'runs'}", "serializer.image.size=[8,6]",
        "model.stages.0.width=16", "model.stages.1.width=16", "train.steps=4", "train.warmup=1",
        "train.eval_every=2", "train.ckpt_every=2", "train.progress=false", "eval.max_samples=6",
        "data.batch_size=2"])
    assert cfg.eval.report
    with caplog.at_level(logging.INFO, logger="omnibyte.progress"):
        run_dir = train(cfg)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "omnibyte.progress")
    assert "VQA val (4 questions, rank" in text and "prior" in text  # the fixture holds 4 val questions
    assert "question type" in text and "exist" in text
    assert f"run directory {run_dir}" in text and "tensorboard --logdir" in text
    assert "curves plotted:" in text and (run_dir / "curves.png").is_file()
