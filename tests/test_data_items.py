"""Evaluation items from the run's own data source: the same items from task, shards and h5; errors; skips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from omnibyte.data import eval_items
from omnibyte.data.prepare import prepare
from omnibyte.data.sources import subset_positions
from omnibyte.errors import DataError, SerializationError
from omnibyte.registry import SERIALIZERS, TASKS
from omnibyte.runconfig import DataConfig, load_run_config

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    assert prepare("clevr_vqa_png", [f"task.root={FIXTURE}"], out=str(out), h5=True, splits="train,val",
                   progress=False)
    cfg = load_run_config("clevr_vqa_png", [f"task.root={FIXTURE}"])
    return out, TASKS.build(cfg.task), SERIALIZERS.build(cfg.serializer)


def _sources(out):
    return {"task": DataConfig(), "shards": DataConfig(source="shards", path=str(out)),
            "h5": DataConfig(source="h5", path=str(out / "train.h5"))}


def test_every_source_gives_the_same_items_with_real_meta(prepared):
    out, task, ser = prepared
    want = list(task.samples("val"))
    for source, cfg in _sources(out).items():
        stats: dict = {}
        items = list(eval_items(cfg, task, ser, "val", stats=stats))
        assert [it.id for it in items] == [s["id"] for s in want], source
        for it, s in zip(items, want):
            assert it.meta == {k: v for k, v in s.items() if k != "image"}, source  # question, answer, qtype, ...
            assert np.array_equal(it.stream.tokens, ser(s).tokens), source
        assert stats == {}, source
        # max_samples: the same seeded positions spread over the split from every source, and the record says so
        subset: dict = {}
        got = [it.id for it in eval_items(cfg, task, ser, "val", max_samples=2, subset=subset)]
        assert got == [want[i]["id"] for i in subset_positions(len(want), 2)], source
        assert subset["rule"] == "spread" and (subset["n"], subset["of"]) == (2, len(want)), source
    assert "sample" not in items[0].extra  # h5 keeps no raw sample, only its meta


def test_a_split_the_source_lacks_names_the_option_that_adds_it(prepared, tmp_path):
    out, task, ser = prepared
    only_train = tmp_path / "t"
    only_train.mkdir()
    for f in out.glob("train*"):
        shutil.copy(f, only_train)
    with pytest.raises(DataError, match=r"omnibyte prepare <config> --splits val"):
        list(eval_items(DataConfig(source="shards", path=str(only_train)), task, ser, "val"))
    with pytest.raises(DataError, match=r"omnibyte prepare <config> --h5 --splits val"):
        list(eval_items(DataConfig(source="h5", path=str(only_train / "train.h5")), task, ser, "val"))
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, val"):
        list(eval_items(DataConfig(), task, ser, "dev"))


def test_bad_samples_follow_on_bad_sample_and_task_skips_are_counted(prepared, tmp_path):
    out, _, ser = prepared

    class Flaky:
        config = ser.config

        def __call__(self, sample):
            if sample["id"].endswith("/1"):
                raise SerializationError(sample["id"], "broken on purpose")
            return ser(sample)

    root = tmp_path / "clevr"
    shutil.copytree(FIXTURE, root)
    gone = root / "images" / "val" / "CLEVR_val_000001.png"
    gone.unlink()  # its two questions (2 and 3) are skipped by the task under on_bad_sample=skip
    fail = TASKS.build({"name": "clevr_vqa", "root": str(root)})
    with pytest.raises(DataError, match=gone.name):
        list(eval_items(DataConfig(), fail, ser, "val"))
    skip = TASKS.build({"name": "clevr_vqa", "root": str(root), "on_bad_sample": "skip"})
    stats: dict = {}
    items = list(eval_items(DataConfig(), skip, Flaky(), "val", stats=stats))
    assert stats == {"task_skipped": 2, "bad_samples": 1} and [it.id for it in items] == ["clevr/val/0"]
    shards_fail = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})
    with pytest.raises(SerializationError, match="clevr/val/1"):
        list(eval_items(DataConfig(source="shards", path=str(out)), shards_fail, Flaky(), "val"))
    shards_skip = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE), "on_bad_sample": "skip"})
    stats = {}
    items = list(eval_items(DataConfig(source="shards", path=str(out)), shards_skip, Flaky(), "val", stats=stats))
    assert stats == {"bad_samples": 1} and "clevr/val/1" not in [it.id for it in items]


def test_an_h5_file_of_another_split_is_refused(prepared, tmp_path):
    """data.path=out/val.h5 trained on the validation split, and evaluated on that same file."""
    from omnibyte.data.sources import open_h5

    out, task, ser = prepared
    cfg = DataConfig(source="h5", path=str(out / "val.h5"))
    with pytest.raises(DataError, match=r"val.h5 holds split 'val', read as split 'train' for training"):
        open_h5(cfg, task, ser, "train", training=True)
    renamed = tmp_path / "mine.h5"
    shutil.copy(out / "train.h5", renamed)
    assert open_h5(DataConfig(source="h5", path=str(renamed)), task, ser, "train", training=True).split == "train"
    with pytest.raises(DataError, match=r"holds split 'val', read as split 'train'"):
        shutil.copy(out / "val.h5", tmp_path / "train.h5")  # a val store under a train name
        open_h5(DataConfig(source="h5", path=str(tmp_path / "train.h5")), task, ser, "train", training=True)
    from omnibyte.data.h5store import write_streams
    from omnibyte.stream import ByteStream
    from omnibyte.vocab import Modality

    anon = write_streams([ByteStream.from_bytes(b"ab", Modality.TEXT, id="a")], tmp_path / "z.h5", progress=False)
    with pytest.raises(DataError, match=r"z.h5 records no split and is not named train.h5"):
        open_h5(DataConfig(source="h5", path=str(anon)), task, ser, "train", training=True)


def test_the_default_samples_at_counts_skips_of_the_chosen_samples_only():
    """A task without an index: one pass over samples(); a skip made on the way to sample i belongs to i."""
    from omnibyte.tasks.base import Task

    class Some(Task):
        def samples(self, split):
            for i in range(6):
                if i in (1, 4):
                    self.skipped += 1  # a bad sample skipped just before sample i
                yield {"id": str(i)}

    t = Some()
    assert [i for i, _ in t.samples_at("x", [0, 2, 4])] == [0, 2, 4] and t.skipped == 1
    t = Some()
    assert [s["id"] for _, s in t.samples_at("x", [1, 5])] == ["1", "5"] and t.skipped == 1
