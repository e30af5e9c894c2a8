"""pg19: the PG19 layout (pg19-mini and hand-made layouts), streaming, packing, bpb / word perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omnibyte.data.items import eval_items
from omnibyte.errors import DataError
from omnibyte.model.api import StreamMeta, StreamModel
from omnibyte.registry import SERIALIZERS, TASKS
from omnibyte.runconfig import DataConfig
from omnibyte.tasks.pg19 import bits_per_byte, count_words, item_words, score_stream, windows, word_perplexity
from omnibyte.vocab import EOS, VOCAB_SIZE

MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg19-mini"
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason="../shared/data/pg19-mini is absent")


def build(root, **kw):
    return TASKS.build({"name": "pg19", "root": str(root), **kw})


def make_layout(tmp_path: Path, books: dict[str, dict[str, bytes]], metadata: str | None = None) -> Path:
    for split, files in books.items():
        (tmp_path / split).mkdir(parents=True)
        for name, data in files.items():
            (tmp_path / split / f"{name}.txt").write_bytes(data)
    if metadata is not None:
        (tmp_path / "metadata.csv").write_text(metadata)
    return tmp_path


@needs_mini
def test_mini_layout_and_metadata():
    t = build(MINI)
    assert t.splits() == ["train", "validation", "test"]
    assert t.num_samples("train") == 11 and t.packing == "concat"
    ids = [p.stem for p in t.books("train")]
    assert ids == sorted(ids, key=int)
    book = next(t.samples("test"))
    assert book["id"] == "pg19/test/1661" and book["title"] == "The Adventures of Sherlock Holmes"
    assert book["year"] == 1892 and len(book["text"].split()) == count_words(book["text"]) > 100_000


@needs_mini
def test_streams_one_book_at_a_time(monkeypatch):
    reads = []
    orig = Path.read_bytes

    def spy(self):
        reads.append(self.name)
        return orig(self)

    monkeypatch.setattr(Path, "read_bytes", spy)
    it = build(MINI).samples("train")
    next(it)
    assert reads == ["5.txt"]  # lowest id first, and nothing else read yet
    next(it)
    assert reads == ["5.txt", "11.txt"] or reads == ["5.txt", "74.txt"]


@needs_mini
def test_max_bytes_cuts_on_a_character_boundary():
    t = build(MINI, max_bytes=1001, max_books=0)
    for s in t.samples("train"):
        assert len(s["text"].encode("utf-8")) in (998, 999, 1000, 1001)


def test_bad_data(tmp_path):
    root = make_layout(tmp_path, {"train": {"1": b"good text", "3": b"more"}},
                       metadata='1,"One",1900,http://x\n3,"Three",bad-year,http://y\n')
    (root / "train" / "2.txt").mkdir()  # unreadable as a book
    with pytest.raises(DataError, match=r"2\.txt"):
        list(build(root).samples("train"))
    t = build(root, on_bad_sample="skip")
    got = list(t.samples("train"))
    assert [s["book_id"] for s in got] == ["1", "3"] and t.skipped == 1
    assert got[0]["title"] == "One" and got[0]["year"] == 1900 and got[1]["year"] is None
    (root / "metadata.csv").write_text("1,only two\n")
    with pytest.raises(DataError, match="metadata.csv line 1: expected 4 fields"):
        list(build(root).samples("train"))
    with pytest.raises(DataError, match="no folder"):
        build(root).books("test")
    with pytest.raises(DataError, match="set task.root"):
        build("").splits()


def test_invalid_utf8_book_follows_the_serializer_errors_policy(tmp_path):
    """The task yields a non-UTF-8 book's raw bytes; utf8's errors=replace decodes them, errors=error raises."""
    from omnibyte.errors import SerializationError

    raw = b"bad \xff\xfe bytes"
    root = make_layout(tmp_path, {"train": {"1": b"good text", "2": raw}})
    books = list(build(root).samples("train"))
    assert books[0]["text"] == "good text" and books[1]["text"] == raw
    with pytest.raises(SerializationError, match=r"'pg19/train/2'.*invalid UTF-8 at byte 4"):
        SERIALIZERS.build({"name": "utf8", "errors": "error"})(books[1])
    stream = SERIALIZERS.build({"name": "utf8", "errors": "replace"})(books[1])
    assert stream.data_bytes() == raw.decode("utf-8", errors="replace").encode()
    assert "\ufffd" in stream.data_bytes().decode()
    # evaluation items: the word count comes from the stream when the text is bytes (not in meta)
    items = list(eval_items(DataConfig(), build(root), SERIALIZERS.build({"name": "utf8", "errors": "replace"}),
                            "train"))
    assert "text" not in items[1].meta and item_words(items[1]) == 3 and item_words(items[0]) == 2
    # and from meta["text"] only when it is what the stream holds (here the serializer cuts the text)
    cut = list(eval_items(DataConfig(), build(root), SERIALIZERS.build({"name": "utf8", "max_bytes": 4,
                                                                        "truncate": "head", "errors": "replace"}),
                            "train"))
    assert cut[0].meta["text"] == "good text" and item_words(cut[0]) == 1


def test_concat_packing_with_separators(tmp_path):
    from omnibyte.data.packing import concat_rows

    root = make_layout(tmp_path, {"train": {str(i): (f"book{i} " * 5).encode() for i in range(1, 4)}})
    ser = SERIALIZERS.build({"name": "utf8"})
    streams = [ser(s) for s in build(root).samples("train")]
    rows = list(concat_rows(streams, 16, "eos", keep_tail=True))
    flat = np.concatenate([r.tokens for r in rows])
    assert all(len(r) == 16 for r in rows[:-1])
    assert int((flat == EOS).sum()) == 3  # one separator after each book
    text = bytes(int(t) for t in flat if t < 256)
    assert text == b"".join((f"book{i} " * 5).encode() for i in range(1, 4))


# --- metrics on hand-checked cases ---------------------------------------------------------------------


def test_metric_formulas():
    assert count_words("  a b\tc\nd  ") == 4 and count_words("") == 0
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    assert word_perplexity(2 * math.log(10), 2) == pytest.approx(10.0)
    assert math.isnan(word_perplexity(1.0, 0))


@pytest.mark.parametrize("n,context,stride", [(10, 4, 4), (10, 4, 1), (10, 4, 3), (3, 8, 2), (17, 5, 2)])
def test_windows_score_every_token_once_with_enough_context(n, context, stride):
    scored = []
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin <= first <= end
        if first > 0:
            assert first - begin >= context - stride  # history of the first scored token
        scored.extend(range(first, end))
    assert scored == list(range(n))


class Uniform(StreamModel):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.stream_meta = StreamMeta(vocab_size=VOCAB_SIZE)

    def logits(self, tokens):
        return torch.zeros(*tokens.shape, VOCAB_SIZE) + 0 * self.p

    def nll(self, tokens, chunk_size=None):
        # position t scored from logits at t - 1; position 0 from the first logits (as per_token_nll does)
        lg = self.logits(tokens).float()
        lg = torch.cat([lg[:, :1], lg[:, :-1]], dim=1)
        return F.cross_entropy(lg.transpose(1, 2), tokens, reduction="none")


class PeekAfterFirst(Uniform):
    """Not causal on purpose: certain of every token except at a window's first position (uniform there)."""

    def nll(self, tokens, chunk_size=None):
        out = torch.zeros(tokens.shape)
        out[:, 0] = math.log(VOCAB_SIZE)
        return out


class Classifier(Uniform):
    def __init__(self):
        super().__init__()
        self.stream_meta = StreamMeta(vocab_size=VOCAB_SIZE, per_token_losses=False)


def test_score_stream_sliding_windows():
    ser = SERIALIZERS.build({"name": "utf8", "bos": True, "eos": True})
    stream = ser({"id": "b", "text": "x" * 20})  # BOS + 20 bytes + EOS: markers not counted
    nats, n = score_stream(Uniform(), stream, context=8, stride=3)
    assert n == 20 and nats == pytest.approx(20 * math.log(VOCAB_SIZE), rel=1e-5)
    # disjoint windows: each of the ceil(22/8) = 3 windows pays its first position (the first one is BOS)
    nats, _ = score_stream(PeekAfterFirst(), stream, context=8, stride=8)
    assert nats == pytest.approx(2 * math.log(VOCAB_SIZE), rel=1e-5)
    # overlapping windows give every scored token history: only the book's first token pays (BOS, not counted)
    nats, _ = score_stream(PeekAfterFirst(), stream, context=8, stride=4, batch_size=2)
    assert nats == pytest.approx(0.0, abs=1e-3)


def items(root, split, ser=None, **task_kw):
    ser = ser or SERIALIZERS.build({"name": "utf8"})
    return list(eval_items(DataConfig(), build(root, **task_kw), ser, split))


def test_evaluate_reports_bpb_and_word_perplexity(tmp_path):
    text1, text2 = "one two three\nfour", "five six"  # 18 + 8 bytes, 4 + 2 words
    root = make_layout(tmp_path / "pg", {"test": {"1": text1.encode(), "2": text2.encode()}})
    res = build(root).evaluate(Uniform(), items(root, "test"), split="test", out_dir=tmp_path / "run" / "eval",
                               context=8, stride=4)
    lnv = math.log(VOCAB_SIZE)
    assert res["num_bytes"] == 26 and res["num_words"] == 6 and res["num_books"] == 2
    assert (res["context"], res["stride"]) == (8, 4)
    assert res["bpb"] == pytest.approx(math.log2(VOCAB_SIZE), rel=1e-5)
    assert res["word_ppl"] == pytest.approx(math.exp(26 * lnv / 6), rel=1e-4)
    saved = json.loads((tmp_path / "run" / "eval" / "pg19_test.json").read_text())
    assert saved["num_words"] == 6 and [b["id"] for b in saved["books"]] == ["pg19/test/1", "pg19/test/2"]
    assert build(root).evaluate(Uniform(), items(root, "test")[:1], split="test", context=8)["num_books"] == 1


def test_evaluate_window_and_model_checks(tmp_path):
    root = make_layout(tmp_path / "pg", {"validation": {"1": b"one two three four five"}})
    its = items(root, "validation")
    # task.eval_context / eval_stride win over the run's context; the stride defaults to the window
    res = build(root, eval_context=8).evaluate(Uniform(), its, split="validation", context=1024)
    assert (res["context"], res["stride"]) == (8, 8)
    res = build(root, eval_stride=2).evaluate(Uniform(), its, split="validation", context=8, stride=4)
    assert (res["context"], res["stride"]) == (8, 2)
    with pytest.raises(ValueError, match="needs a window"):
        build(root).evaluate(Uniform(), its, split="validation")
    with pytest.raises(ValueError, match="stride must be in 1..context"):
        build(root).evaluate(Uniform(), its, split="validation", context=4, stride=8)
    with pytest.raises(ValueError, match="needs per-token losses"):
        build(root).evaluate(Classifier(), its, split="validation", context=8)


TINY_STAGES = ("model.stages=[{length: 8, width: 16, layers: 1, block: {name: transformer, heads: 2}}, "
               "{length: 8, width: 16, layers: 1, block: {name: transformer, heads: 2}}]")


def untrained_run(tmp_path, root, *overrides):
    """A Run of a tiny untrained pg19 model (no training: evaluate_run only needs the components)."""
    from omnibyte.run import Run, build_components
    from omnibyte.runconfig import load_run_config

    cfg = load_run_config("pg19_lm", [f"task.root={root}", TINY_STAGES, "data.seq_len=64", "data.batch_size=2",
                                      f"out_dir={tmp_path / 'runs'}", "eval.split=validation", *overrides])
    task, ser, model = build_components(cfg)
    return Run(tmp_path / "runs" / "r", cfg, task, ser, model.eval(), tmp_path / "ckpt", 0, "latest", {})


def test_eval_record_says_what_each_bpb_counts(tmp_path):
    """The run-level bpb of a PG19 eval counts the EOS between books (concat packing) in its nats and its weight;
    the task's bpb is over the text bytes only, word perplexity over the text's words; the record and the report
    say which is which (it said neither, and the report printed only the run-level figure)."""
    from omnibyte.run import evaluate_run, report_lines

    texts = {"1": "one two three four " * 5, "2": "five six seven " * 6}
    root = make_layout(tmp_path / "pg", {"validation": {k: v.encode() for k, v in texts.items()}})
    run = untrained_run(tmp_path, root)
    res = evaluate_run(run, per_token=False, progress=False, out_dir=tmp_path / "eval")
    assert res["bpb_special_weight"] == 2.0  # one EOS separator per book, scored in the run-level bpb
    assert "specials" in res["bpb_scope"] and "bpb/special" in res
    task = res["task"]
    assert task["num_bytes"] == sum(len(t) for t in texts.values())  # text bytes only: no EOS
    assert task["num_words"] == sum(len(t.split()) for t in texts.values())
    assert "neither in the nats nor in the byte count" in task["bpb_rule"]
    lines = report_lines(run, res)
    assert "special tokens" in lines[0]
    assert any(f"text bits per byte {task['bpb']:.4f} over {task['num_bytes']} UTF-8 bytes" in x for x in lines)
