"""The CNN+LSTM baseline: parses qa streams by their markers, learns, implements the model contract (score,
generate, batch_loss) and is scored by clevr_vqa like any model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from omnibyte import vocab
from omnibyte.data.items import eval_items
from omnibyte.model.api import StreamModel
from omnibyte.registry import MODELS, SERIALIZERS, TASKS
from omnibyte.runconfig import DataConfig
from omnibyte.stream import Batch
from omnibyte.tasks.clevr import CLEVR_ANSWERS
from omnibyte.vocab import Modality

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"
IMAGE = {"name": "pixels", "size": [24, 16]}
TINY = {"name": "clevr_cnn_lstm", "image": IMAGE, "trunk_stages": 1, "embed_dim": 8, "lstm_hidden": 16, "word_buckets": 256,
        "mlp_hidden": 32}


def setup(order=("image", "question", "answer"), **model_kw):
    torch.manual_seed(0)
    task = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})
    ser = SERIALIZERS.build({"name": "qa", "image": IMAGE, "order": list(order)})
    model = MODELS.build({**TINY, "answers": list(task.answer_vocab), **model_kw})
    return task, ser, model


def test_answers_come_from_the_run_not_a_default():
    with pytest.raises(ValueError, match="model.answers is empty: a run fills it from the task's answer vocabulary"):
        MODELS.build(TINY)
    with pytest.raises(ValueError, match="at least two distinct"):
        MODELS.build({**TINY, "answers": ["a", "a"]})
    model = MODELS.build({**TINY, "answers": ["teal", "ochre", "3"]})
    assert isinstance(model, StreamModel) and model.answers == ("teal", "ochre", "3")
    assert model.stream_meta.per_token_losses is False
    with pytest.raises(NotImplementedError, match="no per-token losses"):
        model.nll(torch.zeros(1, 4, dtype=torch.long))


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
    assert model.answers == CLEVR_ANSWERS  # the fixture's answers are all CLEVR's
    assert labels.tolist() == [CLEVR_ANSWERS.index(s["answer"]) for s in samples]
    # a prompt (no answer) and an answer outside the vocabulary give label -1 (weight 0)
    odd = ser({**samples[0], "answer": "maybe"})
    _, _, _, labels = model.parse(Batch.collate([ser.prompt(samples[0]), odd]).tokens)
    assert labels.tolist() == [-1, -1]


def test_score_and_generate_follow_the_class_distribution():
    task, ser, model = setup()
    s = next(task.samples("train"))
    prompt = torch.as_tensor(ser.prompt(s).tokens.astype(np.int64))
    cands = [[*a.encode(), vocab.EOS] for a in model.answers]
    model.train()
    scores = model.score(prompt, cands + [list(b"maybe") + [vocab.EOS], list(b"yes")])
    assert model.training  # restored
    model.eval()
    logp = torch.log_softmax(model(prompt[None])[0].float(), dim=-1)
    assert torch.allclose(scores[: len(cands)], logp, atol=1e-5)
    assert float(torch.logsumexp(scores[: len(cands)], 0)) == pytest.approx(0.0, abs=1e-5)
    assert scores[-2] == -math.inf and scores[-1] == -math.inf  # outside the set; no EOS
    best = model.answers[int(logp.argmax())]
    two = torch.stack([prompt, prompt])
    out = model.generate(two, max_new_bytes=16, temperature=0.0, stop_tokens=(vocab.EOS,))
    assert out.tolist() == [[*best.encode(), vocab.EOS]] * 2
    assert model.generate(prompt, max_new_bytes=1, temperature=0.0).tolist() == [[best.encode()[0]]]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = model.generate(two, 16, temperature=1.0, generator=g1)
    assert torch.equal(a, model.generate(two, 16, temperature=1.0, generator=g2))  # seeded
    assert all(row[-1] == vocab.EOS or vocab.PAD in row for row in a.tolist())
    with pytest.raises(ValueError, match="top_k / top_p are not supported"):
        model.generate(prompt, 16, top_k=3)


def test_score_batch_equals_score_row_by_row():
    task, ser, model = setup()
    prompts = [torch.as_tensor(ser.prompt(s).tokens.astype(np.int64)) for s in list(task.samples("train"))[:4]]
    assert len({len(p) for p in prompts}) > 1  # prefixes of different lengths: padded in one batch
    cands = [[*a.encode(), vocab.EOS] for a in reversed(model.answers)] + [list(b"maybe") + [vocab.EOS], list(b"yes")]
    model.train()
    batched = model.score_batch(prompts, cands)
    assert model.training  # restored
    rows = torch.stack([model.score(p, cands) for p in prompts])
    assert batched.shape == (4, len(cands))
    assert torch.equal(torch.isinf(batched), torch.isinf(rows)) and bool((batched[:, -2:] == -math.inf).all())
    assert torch.allclose(batched[:, :-2], rows[:, :-2], atol=1e-5)
    assert model.score_batch([], cands).shape == (0, len(cands))


def test_learns_and_is_scored_by_the_task(tmp_path):
    task, ser, model = setup()
    batch = Batch.collate([ser(s) for s in task.samples("train")])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    golds = [s["answer"] for s in task.samples("train")]

    def predicted():
        return [model.answers[i] for i in model(batch.tokens).argmax(dim=1).tolist()]

    first = None
    for step in range(80):
        out = model.batch_loss(batch)
        first = first if first is not None else float(out.loss.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 5 == 4 and predicted() == golds:
            break
    assert predicted() == golds  # memorised (train-mode BatchNorm statistics)
    assert float(out.loss.detach()) < 0.5 * first
    assert float(out.weight_sum) == 8 and int(Modality.ANSWER) in out.per_modality
    model.eval()
    with torch.no_grad():
        expect = sum(p == g for p, g in zip(predicted(), golds)) / len(golds)
    model.train()
    items = list(eval_items(DataConfig(), task, ser, "train"))
    res = task.evaluate(model, items, split="train", out_dir=tmp_path, progress=False)
    assert res["modes"] == ["generate", "rank"]  # auto: both, through the contract like a byte model
    assert res["accuracy_rank"] == res["accuracy_generate"] == pytest.approx(expect)
    assert res["accuracy_answerable_rank"] == pytest.approx(expect) and res["num_unanswerable"] == 0
    assert model.training  # evaluate restores the mode
    assert (tmp_path / "vqa_train.json").is_file()


def test_byte_questions_and_bad_rows():
    task, ser, model = setup(question_tokens="bytes")
    s = next(task.samples("train"))
    _, q, lengths, _ = model.parse(Batch.collate([ser(s)]).tokens)
    assert lengths.tolist() == [len(s["question"])] and q[0, 0] == s["question"].encode()[0] + 1
    batch = Batch.collate([ser(s), ser.prompt(s)])
    assert model(batch.tokens).shape == (2, len(CLEVR_ANSWERS))  # forward(tokens): DDP-wrappable
    out = model.batch_loss(batch)
    assert float(out.weight_sum) == 1  # the prompt row has no label
    text = SERIALIZERS.build({"name": "utf8"})({"id": "t", "text": "hello"})
    with pytest.raises(ValueError, match="not a qa stream"):
        model.parse(Batch.collate([text]).tokens)
    with pytest.raises(ValueError, match="trunk_stages"):
        MODELS.build({**TINY, "answers": ["a", "b"], "trunk_stages": 5})
