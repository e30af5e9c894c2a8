"""notebooks/cross_modal_transfer.ipynb runs top to bottom on two tiny CPU runs made here with the real
engine (a scratch CLEVR run and one started from a tiny PG19 pretrain), and renders its figures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "cross_modal_transfer.ipynb"
CLEVR = Path(__file__).parent / "fixtures" / "clevr_mini"
STAGES = ("model.stages=[{length: 8, width: 16, layers: 1, block: {name: transformer, heads: 2}}, "
          "{length: 8, width: 16, layers: 1, block: {name: transformer, heads: 2}}]")
QUICK = ["train.progress=false", "train.warmup=1", "train.log_every=1", "train.eval_every=2", "train.keep_last=1"]


def tiny_pg19(root: Path) -> Path:
    """A PG19-layout folder of a few short 'books'."""
    text = "The quick brown fox asks how many red cubes are there. There are two. " * 40
    for split, n in (("train", 2), ("validation", 1), ("test", 1)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            (root / split / f"{split}{i}.txt").write_text(text)
    (root / "metadata.csv").write_text("".join(f"{s}{i},Book,1900,x\n" for s, n in
                                               (("train", 2), ("validation", 1), ("test", 1)) for i in range(n)))
    return root


def make_runs(tmp: Path) -> Path:
    from omnibyte.cli import main as cli
    from omnibyte.runconfig import load_run_config
    from omnibyte.train import train

    runs = tmp / "runs"
    common = [f"out_dir={runs}", STAGES, *QUICK]
    train(load_run_config("pg19_lm", [f"task.root={tiny_pg19(tmp / 'pg19')}", "run_name=pg19_tiny",
                                      "data.seq_len=64", "data.batch_size=2", "train.steps=3",
                                      "eval.split=validation", "eval.max_samples=1", *common]))
    clevr = [f"task.root={CLEVR}", "serializer.image.size=[8,6]", "data.batch_size=2", "train.steps=4",
             "eval.max_samples=2", *common]
    train(load_run_config("clevr_vqa_pixels", ["run_name=pixels_scratch", *clevr]))
    train(load_run_config("transfer_pg19_to_clevr_pixels", ["run_name=pixels_pg19",
                                                            f"train.init_from={runs / 'pg19_tiny'}", *clevr]))
    for name in ("pixels_scratch", "pixels_pg19"):  # VQA accuracy by question type + per-token h5
        assert cli(["eval", str(runs / name), "eval.max_samples=2"]) == 0
    return runs


def test_notebook_executes_and_renders_figures(tmp_path: Path, monkeypatch):
    t0 = time.perf_counter()
    runs = make_runs(tmp_path)
    assert list((runs / "pixels_pg19" / "eval").glob("*.h5")) and (runs / "pixels_pg19" / "eval" / "vqa_val.json").is_file()
    monkeypatch.setenv("OMNIBYTE_RUNS", str(runs))
    monkeypatch.setenv("OMNIBYTE_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # pretraining, curves, steps to target, accuracy by question type, image loss maps
    assert len(pngs) >= 5, f"{len(pngs)} figures rendered"
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} >= {
        f"transfer_{n}.png" for n in ("pg19_pretraining", "curves", "steps_to_target", "accuracy_by_qtype",
                                      "image_loss_maps")}
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "pixels/pg19" in text and "pixels/scratch" in text
    assert "| pixels/pg19 | rank |" in text  # VQA accuracy read from the eval results
    assert "| pixels | val/loss |" in text  # the steps-to-target table has its row
    assert time.perf_counter() - t0 < 120  # budget 60 s on an idle 2-core machine; slack for a busy one
