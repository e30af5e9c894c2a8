"""A CLEVR-layout set whose answers are not CLEVR's (other shape and colour names, like CLEVR-Humans or
Super-CLEVR): the closed set comes from the training split, ranking covers every answer seen in training,
no answerable question is ranked without its gold candidate, and unanswerable ones are counted apart."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnibyte import vocab
from omnibyte.data.items import eval_items
from omnibyte.model.api import StreamMeta, StreamModel
from omnibyte.registry import MODELS, SERIALIZERS, TASKS
from omnibyte.runconfig import DataConfig
from omnibyte.tasks.clevr import CLEVR_ANSWERS

# (split, image, question, answer, family, outermost function)
QUESTIONS = [
    ("train", 0, "What colour is the star?", "teal", 1, "query_color"),
    ("train", 0, "What shape is the teal thing?", "star", 2, "query_shape"),
    ("train", 1, "What colour is the octagon?", "ochre", 1, "query_color"),
    ("train", 1, "What shape is the ochre thing?", "octagon", 2, "query_shape"),
    ("train", 1, "Is there a star?", "no", 3, "exist"),
    ("train", 0, "Is there a star?", "yes", 3, "exist"),
    ("val", 0, "What colour is the star?", "teal", 1, "query_color"),
    ("val", 0, "What shape is the teal thing?", "star", 2, "query_shape"),
    ("val", 1, "What shape is the magenta thing?", "hexagon", 2, "query_shape"),  # never seen in training
    ("val", 1, "Is there an octagon?", "yes", 3, "exist"),
]


def make_layout(root: Path) -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        for i, colour in enumerate([(0, 128, 128, 255), (204, 119, 34, 255)]):
            buf = io.BytesIO()
            Image.new("RGBA", (12, 8), colour).save(buf, format="PNG")
            (root / "images" / split / f"CLEVR_{split}_{i:06d}.png").write_bytes(buf.getvalue())
        qs = [{"image_index": img, "image_filename": f"CLEVR_{split}_{img:06d}.png", "question_index": n,
               "question": q, "answer": a, "question_family_index": fam,
               "program": [{"function": "scene", "inputs": [], "value_inputs": []},
                           {"function": fn, "inputs": [0], "value_inputs": []}]}
              for n, (s, img, q, a, fam, fn) in enumerate(x for x in QUESTIONS if x[0] == split)]
        (root / "questions").mkdir(exist_ok=True)
        (root / "questions" / f"CLEVR_{split}_questions.json").write_text(json.dumps({"questions": qs}))
    return root


class Oracle(StreamModel):
    """Knows every gold answer; records the candidates it is asked to rank, per question."""

    def __init__(self, serializer):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.stream_meta = StreamMeta(vocab_size=vocab.VOCAB_SIZE)
        self.ser = serializer
        self.gold = {q: a for _, _, q, a, _, _ in QUESTIONS}
        self.ranked: dict[str, list[str]] = {}

    def _question(self, tokens) -> str:
        from omnibyte.stream import ByteStream

        t = np.asarray(tokens.cpu(), dtype=np.uint16)
        return self.ser.decode(ByteStream(t, np.zeros(len(t), np.float32), np.zeros(len(t), np.uint8)))["question"]

    def score(self, prefix, candidates):
        q = self._question(prefix)
        cands = [bytes(c[:-1]).decode() for c in candidates]
        assert all(c[-1] == vocab.EOS for c in candidates)
        self.ranked[q] = cands
        return torch.tensor([0.0 if c == self.gold[q] else -1.0 for c in cands])

    def generate(self, prompt, max_new_bytes, temperature=1.0, stop_tokens=(), **_):
        rows = [[*self.gold[self._question(p)].encode(), vocab.EOS] for p in prompt]
        width = max(map(len, rows))
        return torch.tensor([r + [vocab.PAD] * (width - len(r)) for r in rows])


def test_vocabulary_from_training_answers_and_answerable_accuracy(tmp_path):
    task = TASKS.build({"name": "clevr_vqa", "root": str(make_layout(tmp_path / "clevr"))})
    train_answers = {x[3] for x in QUESTIONS if x[0] == "train"}
    assert set(task.answers_of("train")) == train_answers == {"teal", "star", "ochre", "octagon", "no", "yes"}
    vocab_ = task.answer_vocab
    assert vocab_ == tuple(sorted(train_answers)) and vocab_ != CLEVR_ANSWERS
    ser = SERIALIZERS.build({"name": "qa", "image": {"name": "png"}})
    model = Oracle(ser)
    items = list(eval_items(DataConfig(), task, ser, "val"))
    res = task.evaluate(model, items, split="val", out_dir=tmp_path / "eval", progress=False)
    # ranking covered every answer seen in training, for every question
    assert len(model.ranked) == 4 and all(set(c) == train_answers for c in model.ranked.values())
    answerable = [it for it in items if it.meta["answer"] in train_answers]
    assert len(answerable) == 3
    for it in answerable:  # no answerable question was ranked without its gold candidate
        assert it.meta["answer"] in model.ranked[it.meta["question"]]
    assert res["num_answerable"] == 3 and res["num_unanswerable"] == 1
    assert res["accuracy_rank"] == pytest.approx(3 / 4) and res["accuracy_answerable_rank"] == 1.0
    assert res["accuracy_generate"] == 1.0  # exact match is not limited to the closed set
    assert res["unanswerable_by_qtype"] == {"exist": 0, "query_attribute": 1}
    assert res["by_qtype_answerable_rank"] == {"exist": 1.0, "query_attribute": 1.0}
    assert res["by_qtype_rank"]["query_attribute"] == pytest.approx(2 / 3)
    saved = json.loads((tmp_path / "eval" / "vqa_val.json").read_text())
    assert saved["answers"] == list(vocab_) and saved["details"]["rank"]["unanswerable"] == 1


def test_cnn_lstm_head_covers_the_training_answers(tmp_path):
    """The classifier built with the task's vocabulary scores every answerable gold finitely."""
    task = TASKS.build({"name": "clevr_vqa", "root": str(make_layout(tmp_path / "clevr"))})
    image = {"name": "pixels", "size": [12, 8]}
    ser = SERIALIZERS.build({"name": "qa", "image": image})
    model = MODELS.build({"name": "clevr_cnn_lstm", "image": image, "trunk_stages": 1, "embed_dim": 8,
                          "lstm_hidden": 8, "mlp_hidden": 8, "answers": list(task.answer_vocab)})
    assert set(model.answers) == set(task.answers_of("train"))
    from omnibyte.stream import Batch

    labels = model.labels(Batch.collate([ser(s) for s in task.samples("train")]).tokens)
    assert (labels >= 0).all()  # every training sample has a class: none is trained with weight 0
    for it in eval_items(DataConfig(), task, ser, "val"):
        prompt = it.stream[: len(it.stream) - len(it.meta["answer"]) - 1]
        score = model.score(torch.as_tensor(prompt.tokens.astype(np.int64)), [[*it.meta["answer"].encode(), vocab.EOS]])
        assert bool(torch.isfinite(score[0])) == (it.meta["answer"] in model.answers)
    res = task.evaluate(model, eval_items(DataConfig(), task, ser, "val"), split="val", progress=False)
    assert res["num_unanswerable"] == 1 and 0 <= res["accuracy_answerable"] <= 1


def test_a_trained_run_records_and_ranks_the_answers_of_its_own_training_split(tmp_path, capsys):
    """End to end through the CLI on the non-CLEVR set above: `omnibyte train` records the training split's
    answers (sorted) in the run's record and its checkpoints, and `omnibyte eval` ranks every question against
    exactly that set; the answer never seen in training is counted as unanswerable, not scored as a miss."""
    import yaml

    from omnibyte.checkpoint import latest_checkpoint, read_state
    from omnibyte.cli import main

    root = make_layout(tmp_path / "clevr_other")
    runs = tmp_path / "runs"
    tiny = [f"model.stages.{i}.{k}={v}" for i in (0, 1) for k, v in (("width", 16), ("layers", 1))] + [
        "model.stages.0.block.headdim=16", "model.stages.0.block.d_state=8", "model.stages.1.block.heads=2"]
    assert main(["train", "clevr_vqa_png", f"task.root={root}", "preset=full", "serializer.image.size=[12,8]",
                 "model.stages.0.length=64", "data.seq_len=512", "data.batch_size=2", "train.steps=2",
                 "train.warmup=1", "train.eval_every=0", "train.ckpt_every=2", "eval.report=false",
                 "task.eval_mode=rank", *tiny, f"out_dir={runs}", "--quiet"]) == 0
    run = runs / "clevr_vqa_png"
    trained = sorted({answer for split, _img, _q, answer, _fam, _fn in QUESTIONS if split == "train"})
    record = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert record["task"]["answers"] == trained
    assert read_state(latest_checkpoint(run / "checkpoints"))["config"]["task"]["answers"] == trained
    capsys.readouterr()
    assert main(["eval", str(run), "eval.per_token=false"]) == 0
    out = capsys.readouterr().out
    task = json.loads(out[out.index("{"):])["task"]
    assert task["num_samples"] == 4 and task["num_unanswerable"] == 1  # "hexagon" is not a training answer
    step = task["step"]  # the evaluated checkpoint's step, in the results and their file names
    assert task["checkpoint"].endswith(f"step_{step:06d}") and (run / "eval" / f"vqa_val_{step}.json").is_file()
    preds = [json.loads(line) for line in (run / "eval" / f"vqa_val_{step}_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and {p["pred_rank"] for p in preds} <= set(trained)  # ranked among the training answers
    assert [p["answerable"] for p in preds] == [p["gold"] in trained for p in preds] == [True, True, False, True]
