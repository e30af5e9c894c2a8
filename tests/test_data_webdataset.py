"""Runs that read their data through webdataset: shards served over HTTP, and stores made for another run."""

from __future__ import annotations

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from omnibyte.data.prepare import prepare
from omnibyte.errors import DataError
from omnibyte.logging import read_metrics
from omnibyte.runconfig import load_run_config
from omnibyte.train import train

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"
TINY_MODEL = {"name": "mblm", "stages": [
    {"length": 16, "width": 32, "layers": 1, "block": {"name": "transformer", "heads": 2}},
    {"length": 4, "width": 16, "layers": 1, "block": {"name": "transformer", "heads": 2}}]}
TINY = {
    "seed": 0,
    "task": {"name": "synthetic_text", "samples": {"train": 96, "validation": 8}},
    "serializer": {"name": "utf8", "eos": True},
    "model": TINY_MODEL,
    "data": {"seq_len": 64, "batch_size": 4, "shuffle_buffer": 16},
    "train": {"steps": 6, "lr": 3e-3, "warmup": 1, "log_every": 1, "eval_every": 3, "ckpt_every": 3,
              "progress": False, "device": "cpu"},
    "eval": {"max_samples": 8},
}


def _config(tmp_path, name, **sections):
    cfg = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    cfg["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def http_dir(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (a thread); yields (folder, base URL, list of requested paths)."""
    folder = tmp_path / "served"
    folder.mkdir()
    requested: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requested.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


def _losses(run: Path, split: str = "train"):
    """(step, loss) of the training records, or (step, bpb) of the eval records of ``split``."""
    if split == "train":
        return [(r["step"], r["loss"]) for r in read_metrics(run) if "lr" in r]
    return [(r["step"], r["bpb"]) for r in read_metrics(run) if r["split"] == split and "lr" not in r]


def test_a_run_trains_from_shards_served_over_http(tmp_path, http_dir):
    folder, url, requested = http_dir
    base = _config(tmp_path, "base")
    assert prepare(str(base), out=str(folder), shard_samples=16, progress=False)
    assert len(list(folder.glob("train-*.tar"))) == 6
    local = {w: train(load_run_config(base, [f"run_name=local{w}", "data.source=shards", f"data.path={folder}",
                                              f"data.workers={w}"])) for w in (0, 2)}
    remote = train(load_run_config(base, ["run_name=http", "data.source=shards", f"data.path={url}", "data.workers=2"]))
    assert _losses(remote) == _losses(local[2]) and _losses(remote, "validation") == _losses(local[2], "validation")
    assert "/train.shards.json" in requested and "/validation.shards.json" in requested
    assert {f"/train-{i:06d}.tar" for i in range(6)} <= set(requested)
    # a brace-list spec over HTTP reads the same stream; a split the server lacks names the command that adds it
    spec = f"{url}/{{split}}-{{000000..000005}}.tar"
    braced = train(load_run_config(base, ["run_name=spec", "data.source=shards", f"data.path={spec}",
                                          "eval.split=train"]))  # a spec lists one split's shards
    assert _losses(braced) == _losses(local[0])
    with pytest.raises(DataError, match=r"dev.shards.json: cannot read the shard index .*--splits dev"):
        train(load_run_config(base, ["run_name=missing", "data.source=shards", f"data.path={url}",
                                     "eval.split=dev", "train.steps=1"]))


def test_resume_from_http_shards_continues_the_exact_stream(tmp_path, http_dir):
    folder, url, _ = http_dir
    base = _config(tmp_path, "base", train={"steps": 6})
    prepare(str(base), out=str(folder), shard_samples=16, progress=False)
    over = ["data.source=shards", f"data.path={url}", "data.workers=2"]
    ref = train(load_run_config(base, ["run_name=ref", *over]))
    step3 = ref / "checkpoints" / "step_000003"
    resumed = train(load_run_config(base, ["run_name=resumed", *over, f"train.resume={step3}"]))
    assert _losses(resumed) == [x for x in _losses(ref) if x[0] > 3]  # the position inside the HTTP shards


def test_training_on_an_h5_store_of_another_serializer_refuses(tmp_path):
    out = tmp_path / "png"
    tiny = [f"task.root={FIXTURE}", "model.stages=" + json.dumps(TINY_MODEL["stages"]), "data.seq_len=8192",
            "data.batch_size=2", "train.steps=1", "train.progress=false", "train.device=cpu", f"out_dir={tmp_path}"]
    assert prepare("clevr_vqa_png", tiny, out=str(out), h5=True, shards=False, progress=False,
                   splits="train,val")
    jpeg = load_run_config("clevr_vqa_jpeg", [*tiny, "data.source=h5", f"data.path={out / 'train.h5'}"])
    with pytest.raises(DataError, match=r"data.path=.*train.h5.*: store made with serializer \{.*\"name\":\"png\".*\}, "
                                        r"this run's serializer is \{.*\"name\":\"jpeg\".*\}"):
        train(jpeg)
    png = load_run_config("clevr_vqa_png", [*tiny, "data.source=h5", f"data.path={out / 'train.h5'}",
                                            "eval.max_samples=2", "run_name=png_ok"])
    assert (train(png) / "checkpoints" / "step_000001").is_dir()  # its own serializer trains
