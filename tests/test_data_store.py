"""Webdataset shards and the h5 stream store: round trips, determinism, errors; `omnibyte prepare`."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from omnibyte.data.h5store import H5Streams, write_streams
from omnibyte.data.shards import list_shards, num_samples, shard_samples, write_shards
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
    write_shards(t.samples("train"), tmp_path, "train", max_count=3, progress=False)
    shards = list_shards(tmp_path, "train")
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert num_samples(tmp_path, "train") == 8
    back = list(shard_samples(tmp_path, "train"))
    assert back == list(t.samples("train"))  # images are the same undecoded file bytes, all fields kept
    assert list(shard_samples(tmp_path, "train", shards=shards[1:2])) == back[3:6]
    first = digests(shards)
    write_shards(t.samples("train"), tmp_path, "train", max_count=3, progress=False)
    assert digests(list_shards(tmp_path, "train")) == first  # deterministic bytes


def test_shards_long_text_and_webdataset_reads_them(tmp_path):
    import webdataset as wds

    samples = [{"id": "b1", "text": "é" * 5000 + "\x00", "n": 1}, {"id": "b2", "text": "short", "blob": b"\x00\xff"}]
    write_shards(iter(samples), tmp_path, "test", progress=False)
    assert list(shard_samples(tmp_path, "test")) == samples
    got = list(wds.WebDataset([str(p) for p in list_shards(tmp_path, "test")], shardshuffle=False))
    assert sorted(k for k in got[0] if not k.startswith("__")) == ["json", "text.txt"]
    assert got[1]["blob.bin"] == b"\x00\xff" and json.loads(got[1]["json"])["text"] == "short"


def test_shards_errors(tmp_path):
    with pytest.raises(DataError, match="omnibyte prepare"):
        list_shards(tmp_path, "train")
    write_shards(clevr().samples("val"), tmp_path, "val", max_count=2, progress=False)
    with pytest.raises(DataError, match=r"prepared splits: val"):
        list(shard_samples(tmp_path, "train"))
    (tmp_path / "val-000001.tar").unlink()
    with pytest.raises(DataError, match="val-000001.tar: shard listed"):
        list_shards(tmp_path, "val")
    (tmp_path / "val-000000.tar").write_bytes(b"not a tar")
    with pytest.raises(DataError, match="unreadable shard"):
        list(shard_samples(tmp_path, "val", shards=[tmp_path / "val-000000.tar"]))
    with pytest.raises(DataError, match="cannot contain"):
        write_shards(iter([{"id": "x", "a.b": 1}]), tmp_path, "bad", progress=False)


def test_h5_round_trip_random_access(tmp_path):
    rng = np.random.default_rng(0)
    streams = []
    for i in range(7):
        n = int(rng.integers(1, 300))
        streams.append(ByteStream(rng.integers(0, 264, n).astype(np.uint16), rng.random(n).astype(np.float32),
                                  rng.integers(0, 5, n).astype(np.uint8), id=f"s{i}"))
    path = write_streams(iter(streams), tmp_path / "x.h5", serializer_config={"name": "qa", "loss": "answer"},
                         split="train", progress=False, extra={"task": {"name": "clevr_vqa"}})
    store = H5Streams(path)
    assert len(store) == 7 and store.split == "train"
    assert store.serializer_config == {"name": "qa", "loss": "answer"}
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
    assert list(shard_samples(out, "val")) == list(t.samples("val"))
    assert len(list_shards(out, "train")) == 2
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
