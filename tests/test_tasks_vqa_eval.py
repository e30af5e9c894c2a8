"""VQA evaluation over evaluation items: metrics on hand-checked cases, generate / rank paths, results files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from omnibyte import vocab
from omnibyte.data.items import eval_items
from omnibyte.model.api import StreamMeta, StreamModel
from omnibyte.registry import SERIALIZERS, TASKS
from omnibyte.runconfig import DataConfig
from omnibyte.tasks.clevr import CLEVR_ANSWERS
from omnibyte.tasks.vqa_eval import OTHER, accuracy_by, confusion_matrix, decode_answer, vqa_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"


def test_accuracy_and_confusion_hand_checked():
    golds = ["yes", "no", "2", "red", "yes"]
    preds = ["yes", "yes", "2", "blue", "maybe"]
    qtypes = ["exist", "exist", "count", "query_attribute", "exist"]
    fams = [39, 39, 40, 89, 39]
    m = vqa_metrics(golds, preds, qtypes, fams, ["yes", "no", "2", "red", "blue"])
    assert m["accuracy"] == pytest.approx(2 / 5) and (m["correct"], m["total"]) == (2, 5)
    assert m["by_qtype"]["exist"] == {"accuracy": pytest.approx(1 / 3), "correct": 1, "total": 3, "answerable": 3,
                                      "correct_answerable": 1, "accuracy_answerable": pytest.approx(1 / 3)}
    assert m["by_qtype"]["count"]["accuracy"] == 1.0 and m["by_qtype"]["query_attribute"]["accuracy"] == 0.0
    assert list(m["by_family"]) == ["39", "40", "89"] and m["by_family"]["39"]["total"] == 3
    cm = m["confusion"]
    assert cm["labels"] == ["yes", "no", "2", "red", "blue", OTHER]
    rows = {g: dict(zip(cm["labels"], r)) for g, r in zip(cm["labels"], cm["matrix"])}
    assert rows["yes"]["yes"] == 1 and rows["yes"][OTHER] == 1 and rows["no"]["yes"] == 1
    assert rows["red"]["blue"] == 1 and rows["2"]["2"] == 1
    assert sum(map(sum, cm["matrix"])) == 5
    assert confusion_matrix(["zz"], ["yes"], ["yes"])["matrix"] == [[0, 0], [1, 0]]
    assert accuracy_by(["a"], ["a"], [10]) == {"10": {"accuracy": 1.0, "correct": 1, "total": 1}}


def test_answerable_accuracy_hand_checked():
    """Questions whose gold is outside the closed set count in accuracy but not in accuracy_answerable."""
    golds = ["yes", "teal", "2", "teal"]
    preds = ["yes", "blue", "3", "teal"]  # generate can still produce an answer outside the set
    m = vqa_metrics(golds, preds, ["exist", "query", "count", "query"], [1, 2, 3, 2], ["yes", "no", "2", "3", "blue"])
    assert m["accuracy"] == pytest.approx(2 / 4) and m["accuracy_answerable"] == pytest.approx(1 / 2)
    assert (m["answerable"], m["unanswerable"], m["correct_answerable"]) == (2, 2, 1)
    q = m["by_qtype"]["query"]
    assert (q["total"], q["answerable"], q["accuracy"]) == (2, 0, 0.5) and math.isnan(q["accuracy_answerable"])
    assert m["by_qtype"]["count"]["accuracy_answerable"] == 0.0


def test_decode_answer_stops_at_first_special():
    assert decode_answer([ord("y"), ord("e"), ord("s"), vocab.EOS, ord("x")]) == "yes"
    assert decode_answer([ord(" "), ord("2"), vocab.PAD]) == "2"
    assert decode_answer([vocab.EOS]) == "" and decode_answer([0xFF]) == "\ufffd"


def test_generate_answer_rule_is_pinned_and_owned_once():
    """The generate-mode rule (omnibyte/answers.py): bytes before the first special token, UTF-8 with errors
    replaced, surrounding whitespace stripped; nothing else. The evaluation and the analysis of its records use
    that one function (two copies once lived in tasks/vqa_eval.py and analysis/transfer.py)."""
    from omnibyte import answers
    from omnibyte.analysis import transfer
    from omnibyte.tasks import vqa_eval

    assert vqa_eval.normalize_answer is transfer.normalize_answer is answers.normalize_answer
    assert vqa_eval.decode_answer is answers.decode_answer
    norm = answers.normalize_answer
    assert norm(" yes ") == norm("yes\n") == norm("\tyes\r\n") == norm("yes\u3000") == "yes"  # any whitespace
    assert norm("Yes") == "Yes" and norm("light blue") == "light blue"  # case and inner whitespace kept
    assert norm("yes\x00") == "yes\x00" and norm("") == "" and norm(" \n ") == ""  # NUL is data, not padding
    toks = [*b" red\n", vocab.EOS, *b"junk"]
    assert decode_answer(toks) == "red" and decode_answer([*b"2", vocab.PAD, vocab.PAD]) == "2"
    assert decode_answer([*b"a", vocab.SOM_ANSWER, *b"b"]) == "a"  # any special ends the answer, not only EOS
    assert decode_answer([*"caf\u00e9".encode(), vocab.EOS]) == "caf\u00e9" and decode_answer([0xC3]) == "\ufffd"
    assert decode_answer(torch.tensor([*b" no ", vocab.EOS])) == "no"  # tensor rows as the model returns them


def items_of(task, ser, split, **kw):
    """Evaluation items of ``split`` from the task's own samples (the run's ``data.source: task``)."""
    return list(eval_items(DataConfig(), task, ser, split, **kw))


class Oracle(StreamModel):
    """A fake byte model that 'knows' answers by question text: generate and score follow a lookup."""

    def __init__(self, answers: dict[str, str], serializer):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.stream_meta = StreamMeta(vocab_size=vocab.VOCAB_SIZE)
        self.answers = answers
        self.ser = serializer
        self.generated_shapes = []
        self.prompts = []
        self.candidates = []

    def _answer(self, prompt_tokens) -> str:
        t = prompt_tokens.tolist()
        assert t[-1] == vocab.SOM_ANSWER and t.count(vocab.SOM_ANSWER) == 1  # the prompt stops after SOM_ANSWER
        self.prompts.append(t)
        q = self.ser.decode(_stream(prompt_tokens))["question"]
        return self.answers.get(q, "no")

    def generate(self, prompt, max_new_bytes, temperature=1.0, stop_tokens=(), **_):
        assert temperature == 0 and vocab.EOS in stop_tokens
        self.generated_shapes.append(tuple(prompt.shape))
        rows = [list(self._answer(p).encode()) + [vocab.EOS] for p in prompt]
        width = max(map(len, rows))
        return torch.tensor([r + [vocab.PAD] * (width - len(r)) for r in rows])[:, :max_new_bytes]

    def score(self, prefix, candidates):
        self.candidates.append([list(c) for c in candidates])
        target = self.ser.answer_tokens(self._answer(prefix))
        return torch.tensor([0.0 if list(c) == target else -5.0 - len(c) for c in candidates])


def _stream(tokens):
    import numpy as np

    from omnibyte.stream import ByteStream

    t = np.asarray(tokens.cpu(), dtype=np.uint16)
    return ByteStream(t, np.zeros(len(t), np.float32), np.zeros(len(t), np.uint8))


@pytest.mark.parametrize("order", [("image", "question", "answer"), ("question", "image", "question", "answer")])
def test_generate_and_rank_paths_and_results_files(tmp_path, order):
    task = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})
    ser = SERIALIZERS.build({"name": "qa", "image": {"name": "pixels", "size": [8, 6]}, "order": list(order)})
    golds = {s["question"]: s["answer"] for s in task.samples("val")}
    # right on everything except the compare_attribute question, where it answers "yes" (gold "no")
    answers = dict(golds)
    answers["Is the cylinder made of the same material as the sphere?"] = "yes"
    model = Oracle(answers, ser)
    items = items_of(task, ser, "val")
    res = task.evaluate(model, items, split="val", out_dir=tmp_path / "eval", progress=False, batch_size=3)
    assert res["modes"] == ["generate", "rank"] and res["num_samples"] == 4
    assert res["accuracy_generate"] == res["accuracy_rank"] == res["accuracy"] == pytest.approx(0.75)
    assert res["accuracy_answerable_rank"] == pytest.approx(0.75) and res["num_unanswerable"] == 0
    assert res["by_qtype_rank"] == {"compare_attribute": 0.0, "count": 1.0, "exist": 1.0, "query_attribute": 1.0}
    assert all(b <= 3 for b, _ in model.generated_shapes)  # batched by prompt length
    # the prompt is each stream up to and including SOM_ANSWER, whatever the order
    assert sorted(map(tuple, model.prompts)) == sorted(
        tuple(it.stream.tokens[: len(it.stream) - len(it.meta["answer"]) - 1].tolist()) for it in items
        for _ in range(2))
    assert model.candidates[0] == [[*a.encode(), vocab.EOS] for a in task.answer_vocab]
    saved = json.loads((tmp_path / "eval" / "vqa_val.json").read_text())
    assert saved["details"]["rank"]["by_family"]["28"]["accuracy"] == 0.0
    assert saved["answers"] == list(CLEVR_ANSWERS)
    preds = [json.loads(line) for line in (tmp_path / "eval" / "vqa_val_predictions.jsonl").read_text().splitlines()]
    assert [p["pred_generate"] for p in preds] == ["2", "yes", "yes", "red"]
    assert [p["id"] for p in preds] == [f"clevr/val/{i}" for i in range(4)]
    assert [p["question_index"] for p in preds] == [0, 1, 2, 3]
    one = task.evaluate(model, items[:2], split="val", mode="rank", progress=False)
    assert one["modes"] == ["rank"] and one["num_samples"] == 2 and one["accuracy"] == 1.0
    with pytest.raises(ValueError, match="mode must be one of"):
        task.evaluate(model, items, split="val", mode="classify", progress=False)


def test_items_are_checked(tmp_path):
    """Gold answers come from the items: none (a test split) and repeated ids are refused, naming them."""
    from omnibyte.data.items import EvalItem
    from omnibyte.errors import DataError

    task = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})
    ser = SERIALIZERS.build({"name": "qa", "image": {"name": "pixels", "size": [8, 6]}})
    model = Oracle({}, ser)
    items = items_of(task, ser, "val")
    with pytest.raises(DataError, match=r"items 0 and 2 have the same id 'clevr/val/0'"):
        task.evaluate(model, [items[0], items[1], items[0]], split="val", progress=False)
    test = [EvalItem({k: v for k, v in s.items() if k != "image"}, ser.prompt(s)) for s in task.samples("test")]
    with pytest.raises(DataError, match="'clevr/test/0' has no answer"):
        task.evaluate(model, test, split="test", progress=False)
    text = SERIALIZERS.build({"name": "utf8"})({"id": "t", "text": "hello"})
    with pytest.raises(DataError, match="'t'.*no SOM_ANSWER"):
        task.evaluate(model, [EvalItem({"id": "t", "answer": "yes"}, text)], split="val", progress=False)


def test_real_model_runs_both_modes():
    """The real (untrained, tiny) MBLM goes through generate() and score() without errors."""
    from omnibyte.model import build_model

    task = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})
    ser = SERIALIZERS.build({"name": "qa", "image": {"name": "png", "method": "reencode", "size": [8, 6]}})
    tiny = {"length": 4, "width": 16, "layers": 1, "block": {"name": "transformer", "heads": 2}}
    model = build_model({"name": "mblm", "stages": [{**tiny, "length": 64}, tiny]})
    res = task.evaluate(model, items_of(task, ser, "val", max_samples=2), split="val", progress=False)
    assert 0.0 <= res["accuracy_rank"] <= 1.0 and res["num_samples"] == 2


def test_generate_mode_strips_the_gold_answer_as_it_strips_the_decoded_one(tmp_path):
    """The decoded answer is stripped; a gold answer given with surrounding whitespace (which `qa` trains on as
    given) could never match it before."""
    task = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})
    ser = SERIALIZERS.build({"name": "qa", "image": {"name": "pixels", "size": [8, 6]}})
    items = items_of(task, ser, "val")
    items[1].meta["answer"] = items[1].meta["answer"] + " "
    model = Oracle({it.meta["question"]: it.meta["answer"] for it in items}, ser)  # generates "yes " + EOS
    res = task.evaluate(model, items, split="val", mode="generate", out_dir=tmp_path / "eval", progress=False)
    assert res["accuracy_generate"] == 1.0
    recs = [json.loads(x) for x in (tmp_path / "eval" / "vqa_val_predictions.jsonl").read_text().splitlines()]
    from omnibyte.analysis.transfer import _correct

    assert recs[1]["gold"].endswith(" ") and all(ok for _, ok, _ in _correct(recs, "generate").values())


@pytest.mark.parametrize("gold,generated,right", [("yes\n", "yes", True), ("\tyes ", " yes\n", True),
                                                  ("Yes", "yes", False), ("light blue", "light  blue", False)])
def test_evaluation_and_analysis_score_generate_mode_alike(tmp_path, gold, generated, right):
    """The accuracy the evaluation reports and the one the analysis computes from its per-question records
    agree, whitespace and case included (they once held two copies of the rule)."""
    from omnibyte.analysis.transfer import _correct

    task = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})
    ser = SERIALIZERS.build({"name": "qa", "image": {"name": "pixels", "size": [8, 6]}})
    items = items_of(task, ser, "val")[:1]
    items[0].meta["answer"] = gold
    model = Oracle({items[0].meta["question"]: generated}, ser)
    res = task.evaluate(model, items, split="val", mode="generate", out_dir=tmp_path / "eval", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "eval" / "vqa_val_predictions.jsonl").read_text().splitlines()]
    assert res["accuracy_generate"] == float(right)
    assert [ok for _, ok, _ in _correct(recs, "generate").values()] == [right]
