"""Webdataset shards and the h5 stream store: round trips, determinism, errors; `omnibyte prepare`."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from omnibyte.data.h5store import H5Streams, write_streams
from omnibyte.data.shards import ShardSet, write_shards
from omnibyte.errors import DataError
from omnibyte.registry import TASKS
from omnibyte.stream import ByteStream
from omnibyte.vocab import Modality

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"


def clevr():
    return TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})


def digests(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_shards_round_trip_raw_samples(tmp_path):
    t = clevr()
    write_shards(t.samples("train"), tmp_path, "train", max_count=3, progress=False, task=t.config)
    shards = ShardSet(tmp_path, "train")
    assert [Path(u).name for u in shards.urls] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert shards.counts == [3, 3, 2] and len(ShardSet(tmp_path, "train")) == 8
    back = list(ShardSet(tmp_path, "train").read())
    assert back == list(t.samples("train"))  # images are the same undecoded file bytes, all fields kept
    assert list(shards.read([1])) == back[3:6]
    assert list(shards.read([2, 0], start=1)) == back[7:8] + back[0:3]  # seeks over whole shards by their counts
    assert list(shards.read(start=4)) == back[4:]
    first = digests(map(Path, shards.urls))
    write_shards(t.samples("train"), tmp_path, "train", max_count=3, progress=False, task=t.config)
    assert digests(map(Path, ShardSet(tmp_path, "train").urls)) == first  # deterministic bytes
    index = ShardSet(tmp_path, "train").index
    assert index["task"]["name"] == "clevr_vqa" and index["contract_version"] == 1
    assert index["answers"] == sorted({s["answer"] for s in back})


def test_shards_long_text_and_webdataset_reads_them(tmp_path):
    import webdataset as wds

    samples = [{"id": "b1", "text": "é" * 5000 + "\x00", "n": 1}, {"id": "b2", "text": "short", "blob": b"\x00\xff"}]
    write_shards(iter(samples), tmp_path, "test", progress=False)
    assert list(ShardSet(tmp_path, "test").read()) == samples
    got = list(wds.WebDataset(ShardSet(tmp_path, "test").urls, shardshuffle=False))
    assert sorted(k for k in got[0] if not k.startswith("__")) == ["json", "text.txt"]
    assert got[1]["blob.bin"] == b"\x00\xff" and json.loads(got[1]["json"])["text"] == "short"
    assert ShardSet(tmp_path, "test").index["answers"] is None  # no sample has an answer


def test_shards_errors(tmp_path):
    with pytest.raises(DataError, match="omnibyte prepare <config> --splits train"):
        ShardSet(tmp_path, "train")
    write_shards(clevr().samples("val"), tmp_path, "val", max_count=2, progress=False, task=clevr().config)
    with pytest.raises(DataError, match=r"prepared splits: val"):
        list(ShardSet(tmp_path, "train").read())
    (tmp_path / "val-000001.tar").unlink()
    with pytest.raises(DataError, match="val-000001.tar: shard listed"):
        ShardSet(tmp_path, "val")
    size0 = (tmp_path / "val-000000.tar").stat().st_size
    (tmp_path / "val-000000.tar").write_bytes(b"not a tar".ljust(size0, b"\x01"))  # same size, not a tar
    write_shards(clevr().samples("val"), tmp_path / "other", "val", max_count=1, progress=False)
    (tmp_path / "val-000001.tar").write_bytes((tmp_path / "other" / "val-000000.tar").read_bytes())
    shards = ShardSet(tmp_path, "val")  # the replacement has the same (padded) size
    with pytest.raises(DataError, match="val-000000.tar: unreadable shard"):
        list(shards.read([0]))
    with pytest.raises(DataError, match="val-000001.tar: 1 samples, its index entry says 2"):
        list(shards.read([1]))  # a shard replaced by a shorter one is caught by its count
    (tmp_path / "val-000001.tar").write_bytes((tmp_path / "val-000001.tar").read_bytes()[:-512])
    with pytest.raises(DataError, match=r"val-000001.tar: \d+ bytes, its index entry in val.shards.json says"):
        ShardSet(tmp_path, "val")  # a truncated shard is caught by its size before any read
    with pytest.raises(DataError, match="cannot contain"):
        write_shards(iter([{"id": "x", "a.b": 1}]), tmp_path, "bad", progress=False)
    with pytest.raises(DataError, match="starts with '__'"):
        write_shards(iter([{"id": "x", "__extra": b"\x00"}]), tmp_path, "bad", progress=False)
    with pytest.raises(DataError, match="lower-case"):
        write_shards(iter([{"id": "x", "Image": b"\x89PNG"}]), tmp_path, "bad", progress=False)
    index = tmp_path / "val.shards.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "format": 1}))
    with pytest.raises(DataError, match="shard format 1"):
        ShardSet(tmp_path, "val")


def test_a_shard_cut_between_two_members_of_a_sample_is_refused(tmp_path):
    """tarfile reads a tar cut on a member boundary as a clean, shorter archive: the last sample loses its image
    and the sample count can still match; the size recorded in the index catches it."""
    write_shards(clevr().samples("val"), tmp_path, "val", progress=False, task=clevr().config)
    tar = tmp_path / "val-000000.tar"
    import tarfile

    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]  # the last sample's last member
    tar.write_bytes(tar.read_bytes()[:last.offset])
    with pytest.raises(DataError, match=r"val-000000.tar: \d+ bytes, its index entry .* says"):
        ShardSet(tmp_path, "val")


def test_preparing_a_split_keeps_the_shards_of_a_split_whose_name_extends_it(tmp_path):
    write_shards(clevr().samples("val"), tmp_path, "val-hard", max_count=2, progress=False)
    write_shards(clevr().samples("val"), tmp_path, "val", max_count=2, progress=False)
    write_shards(clevr().samples("val"), tmp_path, "val", max_count=4, progress=False)  # re-prepared: fewer shards
    assert len(list(ShardSet(tmp_path, "val-hard").read())) == len(list(ShardSet(tmp_path, "val").read()))
    assert sorted(p.name for p in tmp_path.glob("val-0*.tar")) == ["val-000000.tar"]  # its old shards went


def test_shard_specs_with_split_placeholder(tmp_path):
    t = clevr()
    write_shards(t.samples("train"), tmp_path, "train", max_count=3, progress=False, task=t.config)
    want = list(t.samples("train"))
    for spec in (f"{tmp_path}/{{split}}-{{000000..000002}}.tar", f"{tmp_path}/{{split}}-*.tar",
                 f"file://{tmp_path}/{{split}}-{{000000..000002}}.tar",
                 f"pipe:cat {tmp_path}/{{split}}-{{000000..000002}}.tar"):
        assert list(ShardSet(spec, "train").read()) == want, spec
    part = ShardSet(f"{tmp_path}/{{split}}-{{000001..000002}}.tar", "train")  # a subset of the split's shards
    assert part.counts == [3, 2] and list(part.read()) == want[3:]
    with pytest.raises(DataError, match="needs? .*{split}|must be a shard spec"):
        ShardSet(f"pipe:cat {tmp_path}/train-000000.tar", "train")
    with pytest.raises(DataError, match="not listed"):
        ShardSet(f"{tmp_path}/{{split}}-{{000000..000003}}.tar", "train")
    with pytest.raises(DataError, match="no file matches"):
        ShardSet(f"{tmp_path}/{{split}}-9*.tar", "train")
    with pytest.raises(DataError, match="cannot read the shard index"):
        ShardSet(f"pipe:cat {tmp_path}/{{split}}-000000.tar", "val")


def test_shards_refuse_another_task_or_token_contract(tmp_path):
    t = clevr()
    write_shards(t.samples("val"), tmp_path, "val", progress=False, task=t.config)
    assert ShardSet(tmp_path, "val").check("clevr_vqa")
    with pytest.raises(DataError, match="made for task 'clevr_vqa', this run's task is 'pg19'"):
        ShardSet(tmp_path, "val").check("pg19")
    index = tmp_path / "val.shards.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "contract_version": 999}))
    with pytest.raises(DataError, match="token contract version 999"):
        ShardSet(tmp_path, "val").check("clevr_vqa")
    write_shards(t.samples("val"), tmp_path, "val", progress=False)
    with pytest.raises(DataError, match="records no task"):
        ShardSet(tmp_path, "val").check("clevr_vqa")


def test_h5_round_trip_random_access(tmp_path):
    rng = np.random.default_rng(0)
    streams = []
    for i in range(7):
        n = int(rng.integers(1, 300))
        streams.append(ByteStream(rng.integers(0, 264, n).astype(np.uint16), rng.random(n).astype(np.float32),
                                  rng.integers(0, 5, n).astype(np.uint8), id=f"s{i}"))
    metas = [{"id": s.id, "answer": "yes" if i % 2 else "2", "family": i} for i, s in enumerate(streams)]
    path = write_streams(zip(streams, metas), tmp_path / "x.h5", serializer_config={"name": "qa", "loss": "answer"},
                         task_config={"name": "clevr_vqa"}, split="train", progress=False, extra={"task_skipped": 3})
    store = H5Streams(path)
    assert len(store) == 7 and store.split == "train"
    assert store.serializer_config == {"name": "qa", "loss": "answer"}
    assert [store.meta(i) for i in range(7)] == metas and store.answers == ("2", "yes")
    assert store.attrs["task_skipped"] == 3 and store.lengths().tolist() == [len(s) for s in streams]
    for i in (3, 0, 6, -1):
        a, b = store[i], streams[i]
        assert a.id == b.id and np.array_equal(a.tokens, b.tokens) and np.array_equal(a.modality, b.modality)
        assert np.array_equal(a.loss_mask, b.loss_mask) and a.tokens.dtype == np.uint16  # fractions exact
    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers reopen the file
    assert np.array_equal(clone[5].tokens, streams[5].tokens)
    with pytest.raises(IndexError):
        store[7]


def test_h5_refuses_other_contract_and_missing_file(tmp_path):
    import h5py

    path = write_streams([ByteStream.from_bytes(b"ab", Modality.TEXT, id="a")], tmp_path / "y.h5", progress=False)
    assert H5Streams(path).meta(0) == {"id": "a"} and H5Streams(path).answers is None
    with pytest.raises(DataError, match="records no task"):
        H5Streams(path).check("synthetic_text", {"name": "utf8"})
    with h5py.File(path, "a") as f:
        f.attrs["format"] = 1
    with pytest.raises(DataError, match="format 1"):
        H5Streams(path)
    with h5py.File(path, "a") as f:
        f.attrs["contract_version"] = 999
    with pytest.raises(DataError, match="token contract version 999"):
        H5Streams(path)
    with pytest.raises(DataError, match="omnibyte prepare"):
        H5Streams(tmp_path / "nope.h5")


def test_prepare_command_writes_shards_and_h5(tmp_path, capsys):
    from omnibyte.cli import main

    out = tmp_path / "prepared"
    rc = main(["prepare", "clevr_vqa_png", f"task.root={FIXTURE}", "--out", str(out), "--h5", "--no-progress",
               "--splits", "train,val", "--shard-samples", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "data.source=shards" in printed and "data.source=h5" in printed
    t = clevr()
    assert list(ShardSet(out, "val").read()) == list(t.samples("val"))
    assert len(ShardSet(out, "train").urls) == 2
    from omnibyte.registry import SERIALIZERS
    from omnibyte.runconfig import load_run_config

    cfg = load_run_config("clevr_vqa_png", [f"task.root={FIXTURE}"])
    ser = SERIALIZERS.build(cfg.serializer)
    store = H5Streams(out / "train.h5")
    assert len(store) == 8 and store.serializer_config["image"]["name"] == "png"
    first = ser(next(t.samples("train")))
    assert np.array_equal(store[0].tokens, first.tokens) and np.array_equal(store[0].loss_mask, first.loss_mask)
    assert main(["prepare", "clevr_vqa_png", f"task.root={FIXTURE}", "--out", str(out), "--splits", "dev",
                 "--no-progress"]) == 2  # unknown split: a clear error, exit 2
    assert "no split 'dev'" in capsys.readouterr().err


def test_h5_refuses_an_id_with_a_nul_at_once_naming_it(tmp_path):
    streams = [ByteStream.from_bytes(b"ab", Modality.TEXT, id="ok"), ByteStream.from_bytes(b"c", Modality.TEXT,
                                                                                          id="bad\x00id")]
    with pytest.raises(DataError, match=r"sample 'bad\\x00id': its id contains a NUL"):
        write_streams(streams, tmp_path / "n.h5", progress=False)


def test_h5_refuses_another_serializer_config(tmp_path):
    from omnibyte.registry import SERIALIZERS

    png = SERIALIZERS.build({"name": "utf8", "eos": True})
    path = write_streams([png({"id": "a", "text": "hi"})], tmp_path / "z.h5", progress=False,
                         serializer_config=png.config, task_config={"name": "synthetic_text"})
    store = H5Streams(path)
    assert store.check("synthetic_text", SERIALIZERS.build({"name": "utf8", "eos": True}).config) is store
    assert len(store.attrs["serializer_sha256"]) == 64
    with pytest.raises(DataError, match=r'store made with serializer \{.*"eos":true.*\}, this run\'s serializer is '
                                        r'\{.*"eos":false'):
        store.check("synthetic_text", SERIALIZERS.build({"name": "utf8", "eos": False}).config)
    with pytest.raises(DataError, match="made for task 'synthetic_text', this run's task is 'pg19'"):
        store.check("pg19", png.config)


def test_prepare_records_metadata_answers_and_skips(tmp_path, capsys):
    from omnibyte.cli import main
    from omnibyte.data import recorded_answers
    from omnibyte.runconfig import DataConfig

    root = tmp_path / "clevr"
    import shutil

    shutil.copytree(FIXTURE, root)
    (root / "images" / "train" / sorted(p.name for p in (root / "images" / "train").iterdir())[0]).unlink()
    out = tmp_path / "prepared"
    assert main(["prepare", "clevr_vqa_png", f"task.root={root}", "task.on_bad_sample=skip", "--out", str(out),
                 "--h5", "--no-progress", "--splits", "train"]) == 0
    printed = capsys.readouterr().out
    assert "task skipped" in printed
    index = ShardSet(out, "train").index
    store = H5Streams(out / "train.h5")
    assert index["task_skipped"] == store.attrs["task_skipped"] > 0
    assert index["num_samples"] == len(store) == 8 - index["task_skipped"]
    kept = list(ShardSet(out, "train").read())
    assert [store.meta(i) for i in range(len(store))] == [{k: v for k, v in s.items() if k != "image"} for s in kept]
    answers = tuple(sorted({s["answer"] for s in kept}))
    for source, path in (("shards", str(out)), ("h5", str(out / "train.h5"))):
        assert recorded_answers(DataConfig(source=source, path=path), "train") == answers
    assert recorded_answers(DataConfig(), "train") is None


def test_prepare_arguments_and_generators(tmp_path, capsys):
    from omnibyte.cli import main
    from omnibyte.data.prepare import generators

    assert generators()["clevr-synth"] == "omnibyte.tasks.clevr_synth:main"
    for args, msg in ((["--max-samples", "-1"], "--max-samples must be >= 0"),
                      (["--shard-samples", "0"], "--shard-samples must be >= 1"),
                      (["--shard-mb", "0"], "--shard-mb must be >= 1")):
        assert main(["prepare", "debug_tiny", *args, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"omnibyte prepare: error: {err[0].split('error: ')[1]}"] and msg in err[0]
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0 and "--shard-samples" in capsys.readouterr().out  # options shown with no config
    with pytest.raises(SystemExit) as e:
        main(["prepare", "clevr-synth", "--help"])
    assert e.value.code == 0 and "--questions-per-image" in capsys.readouterr().out  # the generator's own help
    assert main(["prepare", "--no-progress", "debug_tiny", "task.samples={train: 6, validation: 2}",
                 "--out", str(tmp_path / "t"), "--shard-samples", "4"]) == 0  # options before and after
    assert len(ShardSet(tmp_path / "t", "train").urls) == 2 and len(ShardSet(tmp_path / "t", "validation")) == 2


def test_prepare_reads_each_split_once_for_shards_and_h5(tmp_path, monkeypatch):
    from omnibyte.data.prepare import prepare

    cls = type(clevr())
    reads: list[str] = []
    original = cls.samples

    def samples(self, split):
        reads.append(split)
        return original(self, split)

    monkeypatch.setattr(cls, "samples", samples)
    lines = prepare("clevr_vqa_png", [f"task.root={FIXTURE}"], out=str(tmp_path), splits="train,val", h5=True,
                    progress=False)
    assert reads == ["train", "val"]  # one pass feeds both writers
    assert lines[0].startswith("train: 8 samples") and len(H5Streams(tmp_path / "train.h5")) == 8
    assert list(ShardSet(tmp_path, "val").read()) == list(clevr().samples("val"))


def test_prepare_options_before_the_config_are_kept_and_checked(tmp_path, capsys):
    from omnibyte.cli import main

    out = tmp_path / "t"
    assert main(["prepare", "--shard-samples", "4", "--splits", "train", "debug_tiny",
                 "task.samples={train: 6, validation: 2}", "--out", str(out), "--no-progress"]) == 0
    assert ShardSet(out, "train").counts == [4, 2] and not (out / "validation.shards.json").exists()
    assert main(["prepare", "--shard-samples", "2", "debug_tiny", "task.samples={train: 6, validation: 2}",
                 "--out", str(out), "--no-progress", "--shard-samples", "3", "--splits", "train"]) == 0
    assert ShardSet(out, "train").counts == [3, 3]  # given twice: the one after the config wins
    capsys.readouterr()
    assert main(["prepare", "--shard-mb", "0", "debug_tiny", "--out", str(out), "--no-progress"]) == 2
    assert "--shard-mb must be >= 1" in capsys.readouterr().err


def test_a_store_prepared_under_other_task_settings_is_refused_naming_them(tmp_path, caplog):
    """A store holds the samples of the task settings it was prepared with: read by a run whose task config
    shapes its samples otherwise (here task.max_questions: a subset), it used to be taken as that run's data
    without a word. Settings that only evaluation reads (task.eval_mode) and the source folder may differ."""
    from omnibyte.cli import main
    from omnibyte.data.loader import eval_streams
    from omnibyte.registry import SERIALIZERS
    from omnibyte.runconfig import load_run_config

    out = tmp_path / "prepared"
    assert main(["prepare", "clevr_vqa_png", f"task.root={FIXTURE}", "task.max_questions=3", "--out", str(out),
                 "--h5", "--no-progress", "--splits", "val"]) == 0

    def streams(source, *extra):
        cfg = load_run_config("clevr_vqa_png", [f"task.root={FIXTURE}", f"data.source={source}",
                                                f"data.path={out}", *extra])
        return list(eval_streams(cfg.data, TASKS.build(cfg.task), SERIALIZERS.build(cfg.serializer), "val"))

    for source in ("h5", "shards"):
        with pytest.raises(DataError, match=r"other task settings.*task\.max_questions: 3 -> 0"):
            streams(source)
        assert len(streams(source, "task.max_questions=3", "task.eval_mode=rank")) == 3
    moved = tmp_path / "moved"
    moved.symlink_to(FIXTURE)
    cfg = load_run_config("clevr_vqa_png", [f"task.root={moved}", "task.max_questions=3", "data.source=h5",
                                            f"data.path={out}"])
    with caplog.at_level("WARNING", logger="omnibyte.data"):
        assert len(list(eval_streams(cfg.data, TASKS.build(cfg.task), SERIALIZERS.build(cfg.serializer), "val"))) == 3
    assert "is not read" in caplog.text and str(moved) in caplog.text
