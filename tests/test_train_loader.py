"""The training stream: rank/worker split, exact resume of the position, packing policies, bad samples."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from omnibyte import vocab
from omnibyte.data import TrainLoader, concat_rows, eval_batches, pad_rows
from omnibyte.errors import DataError, SerializationError
from omnibyte.runconfig import DataConfig
from omnibyte.serializers.text import UTF8Serializer
from omnibyte.stream import ByteStream
from omnibyte.tasks.synthetic import SyntheticText


def _task(n=24, packing="pad", **kw):
    return SyntheticText(SyntheticText.Config(name="synthetic_text", samples={"train": n, "validation": 5},
                                              packing=packing, **kw))


def _ids(batches):
    return [i for b in batches for i in b.ids]


def test_ranks_and_workers_split_each_epoch_exactly():
    cfg = DataConfig(seq_len=512, batch_size=1, shuffle_buffer=8, workers=0)
    task, ser = _task(24), UTF8Serializer()
    seen = []
    for rank in range(2):
        loader = TrainLoader(cfg, task, ser, seed=3, rank=rank, world=2)
        seen += _ids(itertools.islice(iter(loader), 12))  # one epoch of this rank's 12 samples
    assert sorted(seen) == sorted(s["id"] for s in task.samples("train"))  # every sample once, no overlap
    # the next epoch is a different order of the same samples
    loader = TrainLoader(cfg, task, ser, seed=3, rank=0, world=2)
    ep = _ids(itertools.islice(iter(loader), 24))
    assert sorted(ep[:12]) == sorted(ep[12:]) and ep[:12] != ep[12:]


@pytest.mark.parametrize("workers,packing", [(0, "concat"), (2, "pad"), (2, "concat")])
def test_resume_position_continues_the_exact_stream(workers, packing):
    cfg = DataConfig(seq_len=96, batch_size=2, shuffle_buffer=4, workers=workers, overlong="crop")
    task, ser = _task(20, packing), UTF8Serializer()
    ref = [b.tokens for b in itertools.islice(iter(TrainLoader(cfg, task, ser, seed=1, rank=1, world=2)), 17)]
    first = TrainLoader(cfg, task, ser, seed=1, rank=1, world=2)
    got = [b.tokens for b in itertools.islice(iter(first), 7)]
    state = first.state_dict()
    second = TrainLoader(cfg, task, ser, seed=1, rank=1, world=2)
    second.load_state_dict(state)
    got += [b.tokens for b in itertools.islice(iter(second), 10)]
    assert all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True))
    wrong = TrainLoader(DataConfig(seq_len=96, batch_size=2, workers=workers + 3), task, ser, seed=1)
    with pytest.raises(DataError, match="data workers"):
        wrong.load_state_dict(state)


def _stream(n, id="s", eos=False):
    toks = np.arange(n, dtype=np.uint16) % 200
    if eos:
        toks[-1] = vocab.EOS
    return ByteStream(toks, np.ones(n, np.float32), np.ones(n, np.uint8), id=id)


def test_pad_policies():
    streams = [_stream(5, "a"), _stream(12, "long"), _stream(3, "b")]
    with pytest.raises(DataError, match="'long'.*12 tokens"):
        list(pad_rows(streams, 8, "error"))
    stats = {}
    assert [s.id for s in pad_rows(streams, 8, "skip", stats)] == ["a", "b"] and stats["overlong_skipped"] == 1
    stats = {}
    assert [len(s) for s in pad_rows(streams, 8, "crop", stats)] == [5, 8, 3] and stats == {"overlong_cropped": 1}
    stats = {}
    assert [s.id for s in pad_rows([_stream(0, "empty"), *streams[:1]], 8, "error", stats)] == ["a"]
    assert stats == {"empty_skipped": 1}  # a stream with no token is dropped, and counted like any skip


def test_concat_rows_with_separators():
    rows = list(concat_rows([_stream(5, "a"), _stream(6, "b", eos=True), _stream(4, "c")], 4, "eos", keep_tail=True))
    flat = np.concatenate([r.tokens for r in rows])
    assert [len(r) for r in rows] == [4, 4, 4, 4, 1]  # 5+1 sep, 6 (already ends in EOS), 4+1 sep = 17
    assert list(np.flatnonzero(flat == vocab.EOS)) == [5, 11, 16]
    assert [len(r) for r in concat_rows([_stream(5), _stream(6)], 4, "none")] == [4, 4]  # tail dropped


def test_bad_samples_fail_naming_them_or_are_skipped_and_counted():
    class Flaky(UTF8Serializer):
        def serialize(self, sample):
            if sample["id"].endswith("3"):
                raise SerializationError(sample["id"], "broken on purpose")
            return super().serialize(sample)

    cfg = DataConfig(seq_len=512, batch_size=2, workers=0)
    with pytest.raises(SerializationError, match="synthetic-train-000003"):
        list(itertools.islice(iter(TrainLoader(cfg, _task(8), Flaky(), seed=0)), 4))
    loader = TrainLoader(cfg, _task(8, on_bad_sample="skip"), Flaky(), seed=0)
    list(itertools.islice(iter(loader), 6))
    assert loader.stats["bad_samples"] >= 1


def test_too_little_data_for_the_shards_is_a_clear_error():
    cfg = DataConfig(seq_len=512, batch_size=4, workers=0)
    with pytest.raises(DataError, match="no full batch"):
        next(iter(TrainLoader(cfg, _task(6), UTF8Serializer(), seed=0, rank=0, world=2)))


def test_eval_batches_are_fixed_and_split_over_ranks():
    cfg = DataConfig(seq_len=512, batch_size=2)
    task, ser = _task(), UTF8Serializer()
    one = _ids(eval_batches(cfg, task, ser, "validation"))
    halves = [_ids(eval_batches(cfg, task, ser, "validation", rank=r, world=2)) for r in range(2)]
    assert one == [s["id"] for s in task.samples("validation")]
    assert sorted(halves[0] + halves[1]) == sorted(one)
    # a stream longer than seq_len is cropped (eval never fails on it) and counted, so a result can say so
    stats: dict = {}
    lengths = [len(ser(s)) for s in task.samples("validation")]
    short = DataConfig(seq_len=min(lengths) - 1, batch_size=2)
    assert _ids(eval_batches(short, task, ser, "validation", stats=stats)) == one
    assert stats == {"overlong_cropped": len(lengths)}
    whole: dict = {}
    eval_batches(cfg, task, ser, "validation", stats=whole)
    assert whole == {}


def _prepare(tmp_path, task, ser, max_count=5, splits=("train", "validation")):
    from omnibyte.data.h5store import write_streams
    from omnibyte.data.shards import write_shards

    for split in splits:
        write_shards(task.samples(split), tmp_path, split, max_count=max_count, progress=False, task=task.config)
        write_streams((ser(s) for s in task.samples(split)), tmp_path / f"{split}.h5", progress=False,
                      task_config=task.config, serializer_config=ser.config)


def test_shards_and_h5_sources_give_the_task_stream(tmp_path):
    task, ser = _task(12), UTF8Serializer()
    _prepare(tmp_path, task, ser)
    want = sorted(s["id"] for s in task.samples("train"))
    for source, path in (("task", ""), ("shards", str(tmp_path)), ("h5", str(tmp_path / "train.h5"))):
        cfg = DataConfig(source=source, path=path, seq_len=512, batch_size=1, workers=0)
        got = _ids(itertools.islice(iter(TrainLoader(cfg, task, ser, seed=0)), 12))
        assert sorted(got) == want, source
        assert _ids(eval_batches(cfg, task, ser, "validation")) == [s["id"] for s in task.samples("validation")]
    # files of 5, 5 and 2 samples over 3 ranks: whole files would give one rank 2 samples to cycle while the
    # others cycle 5 (its samples trained 2.5x as often), so every rank reads every file for its 4 samples
    cfg = DataConfig(source="shards", path=str(tmp_path), seq_len=512, batch_size=1, workers=0)
    parts = [_ids(itertools.islice(iter(TrainLoader(cfg, task, ser, seed=0, rank=r, world=3)), 4)) for r in range(3)]
    assert sorted(sum(parts, [])) == want and all(len(set(p)) == 4 for p in parts)
    # files of 4 samples each (3 over 3 ranks, 6 over 2): whole files, with equal shares
    _prepare(tmp_path / "even", task, ser, max_count=4, splits=("train",))
    cfg = DataConfig(source="shards", path=str(tmp_path / "even"), seq_len=512, batch_size=1, workers=0)
    parts = [_ids(itertools.islice(iter(TrainLoader(cfg, task, ser, seed=0, rank=r, world=3)), 4)) for r in range(3)]
    assert sorted(sum(parts, [])) == want
    assert all(len({int(i.rsplit("-", 1)[1]) // 4 for i in p}) == 1 for p in parts)  # one whole file per rank


def test_shard_files_are_owned_whole_only_where_every_data_shard_gets_as_many_samples(caplog):
    from omnibyte.data.sources import whole_files

    assert whole_files([8, 8, 8, 8], 2) and whole_files([8, 8, 8, 4], 2) is False
    assert whole_files([8, 8, 4, 4], 2) and whole_files([5, 5, 2], 3) is False and whole_files([8], 2) is False
    with caplog.at_level("WARNING", logger="omnibyte.data"):
        assert whole_files([8, 8, 8], 2) is False
    assert "[8, 16] samples each" in caplog.text


# --- exact resume for every source, with every counter ------------------------------------------------------


class Skippy(SyntheticText):
    """A task that skips every sixth sample (as a missing image or an undecodable book would be)."""

    def samples(self, split):
        for i, s in enumerate(super().samples(split)):
            if i % 6 == 2:
                self.skipped += 1
                continue
            yield s


class Flaky(UTF8Serializer):
    def serialize(self, sample):
        if sample["id"].endswith("5"):
            raise SerializationError(sample["id"], "broken on purpose")
        return super().serialize(sample)


def _skippy(n=24, packing="pad"):
    return Skippy(Skippy.Config(name="synthetic_text", samples={"train": n, "validation": 5}, packing=packing,
                                on_bad_sample="skip"))


def _tokens(loader, n):
    return [b.tokens for b in itertools.islice(iter(loader), n)]


@pytest.mark.parametrize("source,packing,workers,max_count", [
    ("shards", "pad", 0, 3),     # 8 files >= 2 data shards: whole files per data shard
    ("shards", "concat", 2, 3),  # 8 files >= 4 data shards
    ("shards", "pad", 2, 100),   # 1 file < 4 data shards: every 4th sample
    ("h5", "concat", 2, 5),
    ("h5", "pad", 0, 5),
    ("task", "pad", 2, 5),
    ("task", "concat", 0, 5),
])
def test_resume_is_exact_for_every_source_and_keeps_the_counts(tmp_path, source, packing, workers, max_count):
    task, ser = _skippy(30, packing), Flaky()
    _prepare(tmp_path, task, UTF8Serializer(), max_count=max_count, splits=("train",))
    path = {"task": "", "shards": str(tmp_path), "h5": str(tmp_path / "train.h5")}[source]
    cfg = DataConfig(source=source, path=path, seq_len=256 if packing == "pad" else 96, batch_size=2,
                     shuffle_buffer=4, workers=workers, overlong="skip")
    make = lambda: TrainLoader(cfg, task, ser, seed=1, rank=0, world=2)  # noqa: E731
    ref_loader = make()
    ref = _tokens(ref_loader, 17)
    for cut in (1, 6, 11):
        first = make()
        got = _tokens(first, cut)
        stats_at_cut = first.stats
        state = json.loads(json.dumps(first.state_dict(), default=str))  # as a checkpoint stores it
        second = make()
        second.load_state_dict(state)
        assert second.stats == stats_at_cut
        got += _tokens(second, 17 - cut)
        assert all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True)), (source, cut)
        assert second.stats == ref_loader.stats, cut
    if source == "task":  # task skips are counted in the stream's stats, next to the serializer's bad samples
        assert ref_loader.stats.get("task_skipped", 0) > 0
    if source != "h5":
        assert ref_loader.stats.get("bad_samples", 0) > 0


def test_every_skip_is_counted_once_per_pass():
    task, ser = _skippy(40), Flaky()
    cfg = DataConfig(seq_len=512, batch_size=1, shuffle=False, workers=0)  # counts come as samples are read
    kept = [s["id"] for s in task.samples("train")]
    totals: dict = {}
    for rank in range(2):
        loader = TrainLoader(cfg, task, ser, seed=0, rank=rank, world=2)
        rows = sum(1 for i, sid in enumerate(kept) if i % 2 == rank and not sid.endswith("5"))
        list(itertools.islice(iter(loader), rows))  # exactly this rank's rows of one epoch
        for k, v in loader.stats.items():
            totals[k] = totals.get(k, 0) + v
    assert totals == {"task_skipped": 7, "bad_samples": sum(1 for sid in kept if sid.endswith("5"))}  # 2, 8, .., 38


@pytest.mark.parametrize("packing", ["pad", "concat"])
def test_resume_reads_back_only_what_the_buffers_hold(tmp_path, packing):
    class Counting(UTF8Serializer):
        calls = 0

        def serialize(self, sample):
            Counting.calls += 1
            return super().serialize(sample)

    task = _task(400, packing)
    _prepare(tmp_path, task, UTF8Serializer(), max_count=10, splits=("train",))
    cfg = DataConfig(source="shards", path=str(tmp_path), seq_len=128, batch_size=2, shuffle_buffer=8, workers=0,
                     overlong="crop")
    first = TrainLoader(cfg, task, Counting(), seed=0)
    _tokens(first, 80)
    Counting.calls = 0
    second = TrainLoader(cfg, task, Counting(), seed=0)
    second.load_state_dict(first.state_dict())
    _tokens(second, 1)
    assert Counting.calls <= 4 * cfg.shuffle_buffer + cfg.batch_size  # not the epoch's first 160 samples again


def test_an_older_position_without_its_place_replays_the_epoch():
    cfg = DataConfig(seq_len=96, batch_size=2, shuffle_buffer=4, workers=0, overlong="crop")
    task, ser = _task(20, "concat"), UTF8Serializer()
    ref = _tokens(TrainLoader(cfg, task, ser, seed=1), 12)
    first = TrainLoader(cfg, task, ser, seed=1)
    got = _tokens(first, 5)
    st = first.state_dict()
    st["workers"] = {w: [v["epoch"], v["batches"], v["stats"]] for w, v in st["workers"].items()}
    second = TrainLoader(cfg, task, ser, seed=1)
    second.load_state_dict(st)
    got += _tokens(second, 7)
    assert all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True))


# --- shape-stable batches ------------------------------------------------------------------------------------


def test_bucketed_batches_take_few_shapes_and_resume_with_the_same_buckets():
    from omnibyte.data.buckets import choose_buckets

    task, ser = _task(64, "pad"), UTF8Serializer()
    lengths = [len(ser(s)) for s in task.samples("train")]
    cfg = DataConfig(seq_len=512, batch_size=3, shuffle_buffer=8, pad_to="buckets", buckets=(128, 256, 512))
    batches = list(itertools.islice(iter(TrainLoader(cfg, task, ser, seed=0, pad_multiple=8)), 60))
    assert {b.shape[1] for b in batches} <= {128, 256, 512}
    for b in batches:
        assert b.shape[1] == min(x for x in (128, 256, 512) if x >= int(b.lengths.max()))
    auto = DataConfig(seq_len=512, batch_size=3, shuffle_buffer=8, pad_to="buckets")
    loader = TrainLoader(auto, task, ser, seed=0, pad_multiple=8)
    shapes = {b.shape[1] for b in itertools.islice(iter(loader), 60)}
    assert loader.buckets == choose_buckets(lengths, 512, 8) and len(shapes) <= len(loader.buckets) <= 9
    assert all(x % 8 == 0 for x in loader.buckets) and loader.buckets[-1] == 512
    longest = DataConfig(seq_len=512, batch_size=3, shuffle_buffer=8, pad_to="longest")
    assert len({b.shape[1] for b in itertools.islice(iter(TrainLoader(longest, task, ser, seed=0, pad_multiple=8)),
                                                   60)}) > len(shapes)  # what buckets are for
    state = loader.state_dict()
    assert state["buckets"] == list(loader.buckets)
    resumed = TrainLoader(auto, task, ser, seed=0, pad_multiple=8)
    resumed.load_state_dict(state)
    assert resumed.buckets == loader.buckets
    other = TrainLoader(DataConfig(seq_len=512, batch_size=3, pad_to="buckets", buckets=(256, 512)), task, ser, seed=0)
    with pytest.raises(DataError, match="checkpoint's run used"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="patch product 8"):
        next(iter(TrainLoader(DataConfig(seq_len=512, pad_to="buckets", buckets=(100, 512)), task, ser, seed=0,
                              pad_multiple=8)))
    with pytest.raises(ValueError, match="hold data.seq_len"):
        DataConfig(seq_len=512, pad_to="buckets", buckets=(128, 256))


def test_the_warm_up_warms_only_the_buckets_the_sampled_rows_fall_into():
    """The seq_len bucket is there so any row fits; when no sampled row needs it, the shape warm-up skips it
    (one forward + backward, and a kernel specialisation, for a shape the run may never see)."""
    from omnibyte.data.buckets import in_use

    assert in_use([100, 120, 130, 900], (128, 256, 512), 512) == (128, 256, 512)  # 900 is cut to seq_len
    assert in_use([100, 120, 130], (128, 256, 512), 512) == (128, 256)
    task, ser = _task(64, "pad"), UTF8Serializer()
    lengths = [len(ser(s)) for s in task.samples("train")]
    assert max(lengths) < 448
    loader = TrainLoader(DataConfig(seq_len=512, batch_size=3, pad_to="buckets", buckets=(128, 448, 512)), task, ser,
                         seed=0, pad_multiple=8)
    assert 512 not in loader.warm_buckets() and set(loader.warm_buckets()) <= {128, 448}
    assert set(loader.warm_buckets()) == {next(b for b in (128, 448, 512) if b >= n) for n in lengths}
    longest = TrainLoader(DataConfig(seq_len=512, batch_size=3, pad_to="longest"), task, ser, seed=0)
    assert longest.warm_buckets() == ()


def test_bucketed_loss_equals_the_unbucketed_loss_on_the_same_rows():
    import torch

    from omnibyte import build_model
    from omnibyte.loss import compute_loss
    from omnibyte.stream import Batch

    torch.manual_seed(0)
    model = build_model({"stages": [
        {"length": 32, "width": 32, "layers": 1, "block": {"name": "transformer", "heads": 2}},
        {"length": 8, "width": 16, "layers": 1, "block": {"name": "transformer", "heads": 2}}]}).eval()
    task, ser = _task(12, "pad"), UTF8Serializer()
    cfg = DataConfig(seq_len=256, batch_size=4, shuffle_buffer=0, pad_to="buckets", buckets=(128, 256),
                     overlong="crop")
    for b in itertools.islice(iter(TrainLoader(cfg, task, ser, seed=0, pad_multiple=8)), 3):
        rows = [ByteStream(b.tokens[i, :n].numpy().astype(np.uint16), b.loss_mask[i, :n].numpy(),
                           b.modality[i, :n].numpy(), id=b.ids[i]) for i, n in enumerate(b.lengths.tolist())]
        tight = Batch.collate(rows, pad_to_multiple=8)
        assert tight.shape[1] < b.shape[1] or tight.shape == b.shape
        with torch.no_grad():
            a = compute_loss(model, b.tokens, b.loss_mask, b.modality)
            t = compute_loss(model, tight.tokens, tight.loss_mask, tight.modality)
        assert float(a.weight_sum) == float(t.weight_sum)
        assert abs(float(a.nats_sum) - float(t.nats_sum)) <= 1e-5 * abs(float(t.nats_sum))


def test_a_position_saved_under_the_other_shard_file_rule_is_refused(tmp_path):
    """Unequal shard files are no longer owned whole by data shards; a position saved when they were would name
    other samples on resume, so it is refused (a position records the rule now)."""
    task, ser = _task(12), UTF8Serializer()
    _prepare(tmp_path, task, ser, max_count=5, splits=("train",))  # files of 5, 5 and 2 samples
    cfg = DataConfig(source="shards", path=str(tmp_path), seq_len=512, batch_size=1, workers=2)
    state = TrainLoader(cfg, task, ser, seed=0).state_dict()
    assert state["whole_files"] is False  # 2 data shards would own 7 and 5 samples
    TrainLoader(cfg, task, ser, seed=0).load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "whole_files"}  # written when 3 files >= 2 meant whole files
    with pytest.raises(DataError, match="read whole shard files"):
        TrainLoader(cfg, task, ser, seed=0).load_state_dict(older)
    one = DataConfig(source="shards", path=str(tmp_path), seq_len=512, batch_size=1, workers=0)
    TrainLoader(one, task, ser, seed=0).load_state_dict({k: v for k, v in TrainLoader(one, task, ser, seed=0)
                                                        .state_dict().items() if k != "whole_files"})
