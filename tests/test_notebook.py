"""notebooks/cross_modal_transfer.ipynb runs top to bottom on two tiny CPU runs made here with the real
engine (a scratch CLEVR run and one started from a tiny PG19 pretrain), and renders its figures; the
committed notebook carries the outputs of the shipped study (results/transfer), current and free of machine
paths; every arm of that study has its own colour and the image loss maps share one colour scale."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from omnibyte import analysis as A
from omnibyte.analysis import notebook as NB

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "cross_modal_transfer.ipynb"
STUDY = REPO / "results" / "transfer"
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


def needs_jupyter():
    for mod in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(mod)


@pytest.mark.slow  # ~30 s on 2 cores: trains tiny runs first (the fast suite executes it on the shipped study)
def test_notebook_executes_and_renders_figures(tmp_path: Path):
    needs_jupyter()
    t0 = time.perf_counter()
    runs = make_runs(tmp_path)
    assert list((runs / "pixels_pg19" / "eval").glob("*.h5")) and list((runs / "pixels_pg19" / "eval").glob("vqa_val_*.json"))
    nb = NB.execute(NOTEBOOK, env={"OMNIBYTE_RUNS": str(runs), "OMNIBYTE_FIGURES": str(tmp_path / "figures")},
                    timeout=120)
    assert not NB.outputs(nb, "error")
    # pretraining, curves, steps to target, accuracy by question type, image loss maps
    pngs = NB.outputs(nb, "image/png")
    assert len(pngs) >= 5, f"{len(pngs)} figures rendered"
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} >= {
        f"transfer_{n}.png" for n in ("pg19_pretraining", "curves", "steps_to_target", "accuracy_by_qtype",
                                      "image_loss_maps")}
    text = "".join(NB.outputs(nb, "text"))
    assert "pixels/pg19" in text and "pixels/scratch" in text
    assert "| pixels/pg19 | rank |" in text  # VQA accuracy read from the eval results
    assert "| pixels | val/loss |" in text  # the steps-to-target table has its row
    assert "runs from runs\n" in text  # a run folder outside the repository prints as its name only
    assert not NB.machine_paths(text)
    assert time.perf_counter() - t0 < 120  # budget 60 s on an idle 2-core machine; slack for a busy one


@pytest.mark.slow  # a subprocess or a whole run: the README command's 2-minute budget (CI runs -m slow)
def test_committed_notebook_has_current_outputs_of_the_study(monkeypatch, tmp_path: Path):
    """The committed notebook shows the shipped study's results: figures and tables, no machine paths, small;
    executing it again on results/transfer gives the same text outputs (run
    `python -m omnibyte.analysis.notebook` after changing the notebook or the study)."""
    needs_jupyter()
    import nbformat

    raw = NOTEBOOK.read_text()
    assert not NB.machine_paths(raw), NB.machine_paths(raw)
    assert len(raw.encode()) < 1_500_000
    committed = nbformat.reads(raw, as_version=4)
    assert not NB.outputs(committed, "error")
    assert len(NB.outputs(committed, "image/png")) >= 5
    text = "".join(NB.outputs(committed, "text"))
    assert "runs from results/transfer" in text and "| pixels/pg19 | rank |" in text
    assert all("execution" not in c.metadata for c in committed.cells)
    monkeypatch.delenv("OMNIBYTE_RUNS", raising=False)
    fresh = NB.execute(NOTEBOOK, env={"OMNIBYTE_FIGURES": ""}, timeout=120)
    assert NB.outputs(fresh, "text") == NB.outputs(committed, "text")
    assert len(NB.outputs(fresh, "image/png")) == len(NB.outputs(committed, "image/png"))


def test_every_arm_of_the_study_has_its_own_colour():
    runs = A.load_runs(STUDY)
    arms = sorted({*A.group_runs(runs), *(row["arm"] for row in A.accuracy_table(runs, split="val"))})
    assert {"png+all/scratch", "jpeg+all/scratch", "pixels+all/scratch", "cnn_lstm/scratch", "png/pg19"} <= set(arms)
    colours = A.arm_colours(arms)
    assert set(colours) == set(arms)
    assert len(set(colours.values())) == len(arms), colours
    # stable: an arm keeps its colour whatever other arms are plotted beside it
    assert A.arm_colours(["png/pg19"])["png/pg19"] == colours["png/pg19"]
    # more arms than preferred shades (unknown kinds, extra inits) still never share a colour
    many = [*arms, "text/scratch", "audio/scratch", "png/wiki", "png/books", "png+weights/scratch"]
    assert len(set(A.arm_colours(many).values())) == len(many)


def test_image_loss_maps_share_one_colour_scale_and_one_colour_bar():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = A.group_runs(A.load_runs(STUDY))
    with_h5 = {n: next(r for r in rs if r.per_token_files) for n, rs in groups.items()
               if any(r.per_token_files for r in rs)}
    fig, axes, images = A.image_loss_maps(with_h5)
    try:
        assert len(images) >= 9 and axes.shape == (3, 3)  # {scratch, pg19, all} x {png, jpeg, pixels}
        clims = {im.get_clim() for im in images.values()}
        assert len(clims) == 1, clims
        vmin, vmax = clims.pop()
        data = np.concatenate([np.asarray(im.get_array(), dtype=float).ravel() for im in images.values()])
        data = data[np.isfinite(data)]
        assert vmin <= data.min() and vmax == pytest.approx(data.max())
        assert len(fig.axes) == axes.size + 1  # the map axes and one colour bar
    finally:
        plt.close(fig)
