"""The CNN+LSTM baseline: parses qa streams by their markers, learns, and is scored by clevr_vqa."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnibyte.registry import MODELS, SERIALIZERS, TASKS
from omnibyte.stream import Batch
from omnibyte.vocab import Modality
from omnibyte.tasks.clevr import CLEVR_ANSWERS

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"
IMAGE = {"name": "pixels", "size": [24, 16]}
TINY = {"name": "clevr_cnn_lstm", "image": IMAGE, "trunk_stages": 1, "embed_dim": 8, "lstm_hidden": 16, "word_buckets": 256,
        "mlp_hidden": 32}


def setup(order=("image", "question", "answer"), **model_kw):
    torch.manual_seed(0)
    task = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})
    ser = SERIALIZERS.build({"name": "qa", "image": IMAGE, "order": list(order)})
    model = MODELS.build({**TINY, **model_kw})
    return task, ser, model


@pytest.mark.parametrize("order", [("image", "question", "answer"), ("question", "image", "question", "answer")])
def test_parses_image_question_and_label(order):
    task, ser, model = setup(order)
    samples = list(task.samples("train"))[:3]
    streams = [ser(s) for s in samples]
    x, q, lengths, labels = model.parse(Batch.collate(streams).tokens)
    assert x.shape == (3, 3, 16, 24) and 0 <= float(x.min()) and float(x.max()) <= 1
    expect = np.asarray(ser.image.decode_image(ser.image.encode_image(samples[1]["image"])), dtype=np.float32) / 255
    assert np.allclose(x[1].permute(1, 2, 0).numpy(), expect)
    assert lengths.tolist() == [len(s["question"].rstrip("?").split()) for s in samples]
    assert labels.tolist() == [CLEVR_ANSWERS.index(s["answer"]) for s in samples]
    # a prompt (no answer) and an answer outside the vocabulary give label -1 (weight 0)
    odd = ser({**samples[0], "answer": "maybe"})
    _, _, _, labels = model.parse(Batch.collate([ser.prompt(samples[0]), odd]).tokens)
    assert labels.tolist() == [-1, -1]


def test_learns_and_is_scored_by_the_task(tmp_path):
    task, ser, model = setup()
    batch = Batch.collate([ser(s) for s in task.samples("train")])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    golds = [s["answer"] for s in task.samples("train")]
    first = None
    for step in range(80):
        out = model.compute_batch_loss(batch)
        first = first if first is not None else float(out.loss.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 5 == 4 and model.predict_answers(batch) == golds:
            break
    assert model.predict_answers(batch) == golds  # memorised (train-mode BatchNorm statistics)
    assert float(out.loss.detach()) < 0.5 * first
    assert float(out.weight_sum) == 8 and int(Modality.ANSWER) in out.per_modality
    model.eval()
    expect = sum(p == g for p, g in zip(model.predict_answers(batch), golds)) / len(golds)
    model.train()
    res = task.evaluate(model, ser, "train", run_dir=tmp_path, progress=False)
    assert res["modes"] == ["classify"] and res["accuracy"] == pytest.approx(expect)
    assert model.training  # evaluate restores the mode
    assert (tmp_path / "eval" / "vqa_train.json").is_file()


def test_byte_questions_and_bad_rows():
    task, ser, model = setup(question_tokens="bytes")
    s = next(task.samples("train"))
    _, q, lengths, _ = model.parse(Batch.collate([ser(s)]).tokens)
    assert lengths.tolist() == [len(s["question"])] and q[0, 0] == s["question"].encode()[0] + 1
    batch = Batch.collate([ser(s), ser.prompt(s)])
    assert model(batch.tokens).shape == (2, len(CLEVR_ANSWERS))  # forward(tokens): DDP-wrappable
    calls = []
    out = model.compute_batch_loss(batch, forward=lambda t: calls.append(t.shape) or model(t))
    assert calls == [batch.tokens.shape] and float(out.weight_sum) == 1  # the prompt row has no label
    text = SERIALIZERS.build({"name": "utf8"})({"id": "t", "text": "hello"})
    with pytest.raises(ValueError, match="not a qa stream"):
        model.parse(Batch.collate([text]).tokens)
    with pytest.raises(ValueError, match="trunk_stages"):
        MODELS.build({**TINY, "trunk_stages": 5})
