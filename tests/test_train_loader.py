"""The training stream: rank/worker split, exact resume of the position, packing policies, bad samples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from omnibyte import vocab
from omnibyte.data import TrainLoader, concat_rows, eval_batches, pad_rows
from omnibyte.errors import DataError, SerializationError
from omnibyte.runconfig import DataConfig
from omnibyte.stream import ByteStream
from omnibyte.serializers.text import UTF8Serializer
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
    assert [len(s) for s in pad_rows(streams, 8, "crop")] == [5, 8, 3]


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


def test_shards_and_h5_sources_give_the_task_stream(tmp_path):
    from omnibyte.data.h5store import write_streams
    from omnibyte.data.shards import write_shards

    task, ser = _task(12), UTF8Serializer()
    for split in ("train", "validation"):
        write_shards(task.samples(split), tmp_path, split, max_count=5, progress=False)
        write_streams((ser(s) for s in task.samples(split)), tmp_path / f"{split}.h5", progress=False)
    want = sorted(s["id"] for s in task.samples("train"))
    for source, path in (("task", ""), ("shards", str(tmp_path)), ("h5", str(tmp_path / "train.h5"))):
        cfg = DataConfig(source=source, path=path, seq_len=512, batch_size=1, workers=0)
        got = _ids(itertools.islice(iter(TrainLoader(cfg, task, ser, seed=0)), 12))
        assert sorted(got) == want, source
        assert _ids(eval_batches(cfg, task, ser, "validation")) == [s["id"] for s in task.samples("validation")]
    # enough shard files for every rank: whole files per rank
    cfg = DataConfig(source="shards", path=str(tmp_path), seq_len=512, batch_size=1, workers=0)
    parts = [_ids(itertools.islice(iter(TrainLoader(cfg, task, ser, seed=0, rank=r, world=3)), 5 if r < 2 else 2))
             for r in range(3)]
    assert sorted(sum(parts, [])) == want
