"""omnibyte.analysis on hand-made run directories: loading, curves, steps-to-target, seed aggregates,
transfer table, VQA accuracy, per-token maps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from omnibyte import analysis as A
from omnibyte.vocab import Modality


def make_run(root: Path, name: str, *, image: str = "png", init: str = "", seed: int = 0,
             val: list[tuple[int, float]] = (), train: list[dict] = (), vqa: dict | None = None,
             loss: str = "answer", model: str = "mblm") -> Path:
    d = root / name
    (d / "eval").mkdir(parents=True)
    cfg = {"run_name": name, "seed": seed, "task": {"name": "clevr_vqa"},
           "serializer": {"name": "qa", "loss": loss, "image": {"name": image, "size": [4, 3], "mode": "RGB"}},
           "model": {"name": model}, "train": {"init_from": init}}
    (d / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    lines = [{"step": s, "split": "train", **r} for s, r in ((r["step"], {k: v for k, v in r.items() if k != "step"})
                                                              for r in train)]
    lines += [{"step": s, "split": "val", "loss": v, "bpb": v / math.log(2)} for s, v in val]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9, "spl')
    if vqa is not None:
        (d / "eval" / "vqa_val.json").write_text(json.dumps(vqa))
    return d


def vqa_result(acc: float, by: dict[str, float], mode: str = "rank") -> dict:
    return {"split": "val", "num_samples": 10, "modes": [mode], "accuracy": acc, "main_mode": mode,
            f"accuracy_{mode}": acc, f"by_qtype_{mode}": by}


# --- curves and steps to target ---------------------------------------------------------------------------


def test_steps_to_target_interpolates_and_handles_edges():
    steps, vals = [10, 20, 30, 40], [4.0, 3.0, 2.0, 1.0]
    assert A.steps_to_target(steps, vals, 2.5) == pytest.approx(25.0)
    assert A.steps_to_target(steps, vals, 2.0) == pytest.approx(30.0)
    assert A.steps_to_target(steps, vals, 5.0) == 10.0  # already there at the first point
    assert A.steps_to_target(steps, vals, 0.5) is None  # never
    assert A.steps_to_target([], [], 1.0) is None
    # higher-is-better metrics (accuracy)
    assert A.steps_to_target(steps, [0.1, 0.2, 0.4, 0.5], 0.3, lower_is_better=False) == pytest.approx(25.0)
    # smoothing delays a single lucky dip
    noisy = [4.0, 1.0, 4.0, 4.0, 1.0, 1.0]
    assert A.steps_to_target(range(6), noisy, 2.0) == pytest.approx(2 / 3)
    assert A.steps_to_target(range(6), noisy, 2.0, window=3) == pytest.approx(5.0)  # means 4 2.5 3 3 3 2


def test_smooth_mean_and_ema():
    v = [1.0, 2.0, 3.0, 4.0]
    assert A.smooth(v, 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert A.smooth(v, 1).tolist() == v
    ema = A.smooth(v, 3, "ema")  # alpha 0.5
    assert ema.tolist() == [1.0, 1.5, 2.25, 3.125]
    with pytest.raises(ValueError):
        A.smooth(v, 2, "median")


def test_aggregate_and_curves():
    a = A.aggregate([1.0, 2.0, 3.0, None, float("nan")])
    assert a["mean"] == 2.0 and a["std"] == pytest.approx(1.0) and a["n"] == 3 and a["missing"] == 2
    assert a["stderr"] == pytest.approx(1 / math.sqrt(3))
    assert A.aggregate([5.0])["std"] == 0.0
    assert math.isnan(A.aggregate([])["mean"])
    c1 = (np.array([0, 10, 20]), np.array([3.0, 2.0, 1.0]))
    c2 = (np.array([0, 10, 20, 30]), np.array([5.0, 4.0, 3.0, 2.0]))
    s, m, sd, se = A.aggregate_curves([c1, c2])
    assert s.tolist() == [0, 10, 20] and m.tolist() == [4.0, 3.0, 2.0]
    assert sd.tolist() == pytest.approx([math.sqrt(2)] * 3)
    s, m, _, _ = A.aggregate_curves([c1, c2], steps=[5, 30])
    assert m[0] == pytest.approx(3.5) and m[1] == pytest.approx(2.0)  # c1 has no step 30: one curve's value


# --- run directories ---------------------------------------------------------------------------------------


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    pre = root / "pg19_lm"
    for seed in (0, 1, 2):
        # scratch reaches its final loss late; pretrained gets there earlier
        make_run(root, f"png_scratch_s{seed}", seed=seed, val=[(10, 3.0), (20, 2.0), (30, 1.5 + 0.1 * seed)],
                 train=[{"step": 10, "loss": 3.0, "bpb/answer": 4.0}, {"step": 20, "loss": 2.0, "bpb/answer": 3.0}],
                 vqa=vqa_result(0.4 + 0.01 * seed, {"count": 0.2, "exist": 0.6}))
        make_run(root, f"png_pg19_s{seed}", seed=seed, init=str(pre),
                 val=[(10, 2.0), (20, 1.5 + 0.1 * seed), (30, 1.2)],
                 vqa=vqa_result(0.5, {"count": 0.3, "exist": 0.7}))
        make_run(root, f"cnn_s{seed}", seed=seed, image="pixels", model="clevr_cnn_lstm",
                 vqa=vqa_result(0.45, {"count": 0.25}, mode="classify"))
    make_run(root, "jpeg_scratch_s0", image="jpeg", val=[(10, 2.0)])  # no pretrained twin: no table row
    return root


def test_load_runs_groups_and_tables(experiment: Path, tmp_path: Path):
    runs = A.load_runs(experiment)
    assert len(runs) == 10
    assert A.load_runs(f"{experiment / 'png_scratch_s0'}{os.pathsep}{experiment / 'cnn_s0'}")[1].name == "cnn_s0"
    r = next(x for x in runs if x.name == "png_scratch_s1")
    assert r.seed == 1 and r.get("serializer.image.name") == "png" and r.get("nope.x", 7) == 7
    assert len(r.metrics) == 5  # the cut last line (a kill -9) is skipped
    assert A.splits_of(r) == ["train", "val"]
    assert A.metrics_table(r, "train", ["loss"]) == [{"step": 10, "split": "train", "loss": 3.0},
                                                     {"step": 20, "split": "train", "loss": 2.0}]
    s, v = A.curve(r, "loss", "val")
    assert s.tolist() == [10, 20, 30] and v[-1] == pytest.approx(1.6)
    assert list(A.modality_curves(r)) == ["answer"]
    assert A.final_value(r, "loss", "val", window=2) == pytest.approx(1.8)
    groups = A.group_runs(runs)
    assert set(groups) == {"png/scratch", "png/pg19", "cnn_lstm/scratch", "jpeg/scratch"}
    assert [x.seed for x in groups["png/pg19"]] == [0, 1, 2]
    with pytest.raises(FileNotFoundError):
        A.load_run(tmp_path)


def test_transfer_table(experiment: Path):
    rows = A.transfer_table(A.load_runs(experiment))
    assert [r["kind"] for r in rows] == ["png"]
    row = rows[0]
    # seed 0: target 1.5; scratch reaches it at 30 (interpolated 20->30: 2.0 -> 1.5), pretrained at 20
    # seed 1: target 1.6; scratch at 30, pretrained (1.6 at 20) at 20; seed 2: target 1.7, scratch 30,
    # pretrained 1.7 at 20
    assert row["scratch_steps"]["mean"] == pytest.approx(30.0)
    assert row["pretrained_steps"]["mean"] == pytest.approx(20.0)
    assert row["reached"] == "3/3"
    assert row["speedup"]["mean"] == pytest.approx(1.5)
    assert row["reduction"] == pytest.approx(1 / 3)
    unpaired = A.transfer_table(A.load_runs(experiment), paired=False)[0]
    assert unpaired["target"]["mean"] == pytest.approx(1.6)
    assert "png" in A.markdown_table(rows, ["kind", "scratch_steps", "reached"])
    assert A.fmt(row["speedup"]).startswith("1.5 ± 0")


def test_vqa_accuracy_and_table(experiment: Path):
    runs = A.load_runs(experiment)
    r = next(x for x in runs if x.name == "png_pg19_s0")
    acc = A.vqa_accuracy(r)
    assert acc["accuracy"] == 0.5 and acc["mode"] == "rank" and acc["by_qtype"] == {"count": 0.3, "exist": 0.7}
    assert A.vqa_accuracy(r, split="test") is None
    # `omnibyte eval` results: the task part of eval/<split>_<step>.json, latest step wins
    d = r.path / "eval"
    (d / "vqa_val.json").unlink()
    (d / "val_10.json").write_text(json.dumps({"step": 10, "split": "val", "task": vqa_result(0.1, {"count": 0.1})}))
    (d / "val_30.json").write_text(json.dumps({"step": 30, "split": "val", "task": {
        "split": "val", "accuracy": 0.9, "main_mode": "rank", "modes": ["generate", "rank"],
        "accuracy_generate": 0.8, "accuracy_rank": 0.9, "by_qtype_rank": {"count": 0.9},
        "by_qtype_generate": {"count": 0.8}}}))
    r2 = A.load_run(r.path)
    assert A.vqa_accuracy(r2)["accuracy"] == 0.9
    assert A.vqa_accuracy(r2, mode="generate")["by_qtype"] == {"count": 0.8}
    table = {row["arm"]: row for row in A.accuracy_table(runs)}
    assert table["png/scratch"]["accuracy"]["mean"] == pytest.approx(0.41)
    assert table["png/scratch"]["by_qtype"]["exist"]["mean"] == pytest.approx(0.6)
    assert table["cnn_lstm/scratch"]["mode"] == "classify"
    assert "jpeg/scratch" not in table


# --- per-token losses and maps ------------------------------------------------------------------------------


def write_h5(path: Path, rows: list[tuple[np.ndarray, np.ndarray]]):
    import h5py

    L = max(len(t) for t, _ in rows)
    with h5py.File(path, "w") as f:
        tok = np.full((len(rows), L), 256, np.uint16)
        nll = np.zeros((len(rows), L), np.float32)
        mod = np.zeros((len(rows), L), np.uint8)
        for i, (t, m) in enumerate(rows):
            tok[i, :len(t)] = t
            nll[i, :len(t)] = np.arange(len(t), dtype=np.float32)
            mod[i, :len(t)] = m
        f["tokens"], f["nll"], f["modality"] = tok, nll, mod
        f["loss_mask"] = (mod == Modality.ANSWER).astype(np.float32)
        f["lengths"] = np.array([len(t) for t, _ in rows], np.int64)
        f["ids"] = np.array([f"s{i}" for i in range(len(rows))], dtype=h5py.string_dtype())


def test_per_token_losses_and_image_maps(tmp_path: Path):
    # BOS SOM_IMAGE <36 image bytes> EOM SOM_ANSWER a EOS : pixels 4x3 RGB
    img = int(Modality.IMAGE)
    mods = np.array([0, 0] + [img] * 36 + [0, 0, int(Modality.ANSWER), 0], np.uint8)
    toks = np.arange(len(mods), dtype=np.uint16)
    d = make_run(tmp_path, "pix", image="pixels")
    write_h5(d / "eval" / "val_5.h5", [(toks, mods), (toks[:10], mods[:10])])
    write_h5(d / "eval" / "val_50.h5", [(toks, mods)])
    run = A.load_run(d)
    assert [p.name for p in run.per_token_files] == ["val_5.h5", "val_50.h5"]
    rows = A.per_token_losses(run, which=0)
    assert [len(r["tokens"]) for r in rows] == [42, 10] and rows[0]["id"] == "s0"
    assert len(A.per_token_losses(run, which=0, max_rows=1)) == 1
    seg = A.image_segment(rows[0])
    assert seg.tolist() == list(range(2, 38))
    m = A.image_loss_map(rows[0], run.config)  # whole run config accepted
    assert m.shape == (3, 4)
    assert m[0, 0] == pytest.approx(np.mean([2, 3, 4]))  # first pixel: channels averaged
    assert m[2, 3] == pytest.approx(np.mean([35, 36, 37]))
    assert A.image_loss_map(rows[0], run.get("serializer.image"), reduce_channels="none").shape == (3, 4, 3)
    # patch order (2x2 tiles over a 4x3 image padded to 4x4): undone back to the picture
    pix = np.arange(4 * 3 * 3, dtype=np.float32).reshape(3, 4, 3)
    padded = np.zeros((4, 4, 3), np.float32)
    padded[:3] = pix
    tiles = padded.reshape(2, 2, 2, 2, 3).transpose(0, 2, 1, 3, 4).reshape(-1)
    cfg = {"name": "pixels", "size": [4, 3], "mode": "RGB", "order": "patch", "patch": 2}
    assert np.allclose(A.image_loss_map(tiles, cfg, reduce_channels="none"), pix)
    # PNG/JPEG: a strip of the stream, NaN-padded
    strip = A.image_loss_map(rows[0], {"name": "png"}, strip_width=10)
    assert strip.shape == (4, 10) and np.isnan(strip[-1, -4:]).all() and strip[0, 0] == 2
    split = A.answer_loss_split(rows)
    assert split["first_byte"]["mean"] == 40 and split["first_byte"]["n"] == 1  # row 2 has no answer
    assert split["other_bytes"]["n"] == 0 and split["eos"]["mean"] == 41
    bpb = A.modality_bpb(rows)
    assert set(bpb) == {"special", "image", "answer"}
    assert A.modality_bpb(rows, weighted=True).keys() == {"answer"}
    with pytest.raises(FileNotFoundError):
        A.per_token_losses(A.load_run(make_run(tmp_path, "empty")))


def test_arm_names():
    def run(**cfg):
        return A.Run(path=Path("x"), config=cfg, metrics=[])

    assert A.arm(run(serializer={"name": "qa", "image": {"name": "pixels", "order": "patch"}})) == "pixels_patch/scratch"
    assert A.arm(run(serializer={"name": "qa", "loss": "all", "image": {"name": "jpeg"}})) == "jpeg+all/scratch"
    assert A.arm(run(serializer={"name": "utf8"}, train={"init_from": "runs/clevr_vqa_png"})) == "utf8/clevr_vqa_png"
    assert A.init_kind(run(train={"init_from": "runs/pg19_lm/checkpoints/step_000100"})) == "pg19"
    # pathway and modality-aware runs are arms of their own, never pooled with scratch
    mom = {"stages": [{"block": {"name": "mamba2", "modality_experts": ["image"]}}, {"block": {"name": "transformer"}}]}
    assert A.init_kind(run(train={"pathway_from": "runs/pg19_lm"})) == "pathway-pg19"
    assert A.init_kind(run(model=mom)) == "mom"
    assert A.init_kind(run(model=mom, train={"init_from": "runs/pg19_lm"})) == "mom+pg19"
    assert A.init_kind(run(model={"stages": [{"block": {"name": "mamba2", "modality_experts": []}}]})) == "scratch"


def test_merged_runs_are_skipped_by_load_runs(tmp_path):
    """`omnibyte merge` writes a run without curves whose weights another run already stands for."""
    make_run(tmp_path, "trained")
    merged = make_run(tmp_path, "trained_merged")
    (merged / "provenance.jsonl").write_text(json.dumps({"merged_from": str(tmp_path / "trained")}) + "\n")
    assert [r.name for r in A.load_runs(tmp_path)] == ["trained"]
    assert A.load_run(merged).merged_from == str(tmp_path / "trained")


def _predictions(run_dir: Path, answers: list[tuple[str, str, str]]) -> None:
    """(qtype, gold, prediction) per question, as the VQA task writes them."""
    recs = [{"id": f"clevr/val/{i}", "qtype": q, "gold": g, "pred_rank": p} for i, (q, g, p) in enumerate(answers)]
    (run_dir / "eval" / "vqa_val_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_binomial_accuracy_and_the_paired_difference_on_the_same_questions(tmp_path: Path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", init="runs/pg19_lm")
    qs = [("exist", "yes", "yes"), ("exist", "no", "yes"), ("count", "2", "2"), ("count", "3", "1")]
    _predictions(a, qs)
    _predictions(b, [(q, g, g) for q, g, _ in qs[:3]] + [qs[3]])  # b also gets the second exist question
    ra, rb = A.load_run(a), A.load_run(b)
    acc = A.binomial_accuracy(ra)
    assert acc["all"]["mean"] == 0.5 and acc["all"]["n"] == 4
    assert acc["all"]["stderr"] == pytest.approx(math.sqrt(0.25 / 4))
    assert acc["exist"]["mean"] == 0.5 and acc["count"]["n"] == 2
    d = A.paired_difference(rb, ra)
    assert d["all"]["mean"] == pytest.approx(0.25) and d["exist"]["mean"] == pytest.approx(0.5)
    assert d["count"] == {"mean": 0.0, "stderr": 0.0, "n": 2}
    diffs = np.array([0, 1, 0, 0])
    assert d["all"]["stderr"] == pytest.approx(diffs.std(ddof=1) / 2)
    _predictions(b, qs[:3])  # scored on other questions: no comparison
    with pytest.raises(ValueError, match=r"\(val\) .*on different questions \(3 and 4; 1 not in both\)"):
        A.paired_difference(A.load_run(b), ra)
    recs = [{"id": i, "qtype": "exist", "gold": "yes", "pred_rank": p} for i, p in enumerate(["yes", "no", "no"])]
    clean = [dict(r, pred_rank="yes") for r in recs]  # the same questions answered clean: all right
    assert A.paired_records(recs, clean)["exist"] == pytest.approx({"mean": -2 / 3, "stderr": math.sqrt(1 / 3 / 3),
                                                                    "n": 3})
    with pytest.raises(ValueError, match="no per-question records"):
        A.paired_difference(A.load_run(make_run(tmp_path, "c")), ra)


def test_per_question_records_are_those_of_the_step_whose_accuracy_is_reported(tmp_path: Path):
    """An evaluation writes vqa_<split>_<step>_predictions.jsonl; the per-question tables read the step the
    accuracy table reports. With the step-less name, evaluating a second checkpoint replaced the first's records
    and the tables beside the accuracy described the other checkpoint."""
    a = make_run(tmp_path, "a")
    for step, acc, preds in ((4, 1.0, ["yes", "no"]), (2, 0.5, ["yes", "yes"])):  # step 2 evaluated last
        (a / "eval" / f"vqa_val_{step}.json").write_text(json.dumps({**vqa_result(acc, {"exist": acc}), "step": step}))
        recs = [{"id": f"q{i}", "qtype": "exist", "gold": g, "pred_rank": p}
                for i, (g, p) in enumerate(zip(["yes", "no"], preds))]
        (a / "eval" / f"vqa_val_{step}_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ra = A.load_run(a)
    assert A.vqa_accuracy(ra)["step"] == 4 and A.accuracy_table([ra])[0]["accuracy"]["mean"] == 1.0
    assert A.binomial_accuracy(ra)["all"]["mean"] == 1.0  # step 4's records, as the accuracy table
    assert [r["pred_rank"] for r in A.vqa_predictions(ra, step=2)] == ["yes", "yes"]
    (a / "eval" / "vqa_val_4_predictions.jsonl").unlink()
    with pytest.raises(ValueError, match=r"at steps \[2\], none at step 4"):
        A.vqa_predictions(A.load_run(a))


def test_seeds_scored_in_different_modes_are_not_averaged_under_one(tmp_path: Path):
    runs = [A.load_run(make_run(tmp_path, f"s{seed}", seed=seed, vqa=vqa_result(0.4 + seed / 10, {}, mode=m)))
            for seed, m in ((0, "rank"), (1, "generate"))]
    with pytest.raises(ValueError, match="different modes .*s0: rank, s1: generate"):
        A.accuracy_table(runs)


def test_the_answer_loss_split_reads_one_per_token_file_per_run(tmp_path: Path):
    """A run evaluated at two checkpoints (and on two splits) has several eval/*.h5: pooling them counted each
    question once per file."""
    from omnibyte.analysis.token_losses import per_token_file

    a = make_run(tmp_path, "a")
    for name in ("val_2.h5", "val_4.h5", "test_6.h5"):
        (a / "eval" / name).write_bytes(b"")
    ra = A.load_run(a)
    assert per_token_file(ra, "val").name == "val_4.h5" and per_token_file(ra, "val", 2).name == "val_2.h5"
    with pytest.raises(FileNotFoundError, match=r"split 'val' at step 3 \(steps: \[2, 4\]\)"):
        per_token_file(ra, "val", 3)
    with pytest.raises(FileNotFoundError, match="no per-token file of split 'validation'"):
        per_token_file(ra, "validation")


def test_a_mode_the_run_was_not_scored_in_is_refused_not_counted_wrong(tmp_path: Path):
    a = make_run(tmp_path, "a", vqa=vqa_result(0.5, {"exist": 0.5}, mode="rank"))
    _predictions(a, [("exist", "yes", "yes"), ("exist", "no", "yes")])
    ra = A.load_run(a)
    assert A.binomial_accuracy(ra, mode="rank")["all"]["mean"] == 0.5
    with pytest.raises(ValueError, match=r"2 of 2 records have no pred_generate .*modes present: \['rank'\]"):
        A.binomial_accuracy(ra, mode="generate")  # was: accuracy 0.0 with stderr 0
    with pytest.raises(ValueError, match="no pred_generate"):
        A.paired_difference(ra, ra, mode="generate")
    assert A.vqa_accuracy(ra)["accuracy"] == A.vqa_accuracy(ra, mode="rank")["accuracy"] == 0.5
    with pytest.raises(ValueError, match="no mode 'generate'"):
        A.vqa_accuracy(ra, mode="generate")  # was: the rank accuracy, labelled generate


def test_runs_of_one_arm_must_be_seeds_of_one_setup(tmp_path: Path):
    """Two pixels runs at different image sizes, or twice the same seed, are not seeds of one arm: the tables
    refuse to pool them (one was read as the other's seed; with equal seeds one vanished)."""
    vqa = vqa_result(0.5, {"exist": 0.5})
    make_run(tmp_path / "ok", "s0", image="pixels", seed=0, vqa=vqa, val=[(10, 1.0)])
    make_run(tmp_path / "ok", "s1", image="pixels", seed=1, vqa=vqa, val=[(10, 1.1)])
    assert A.accuracy_table(A.load_runs(tmp_path / "ok"))[0]["accuracy"]["n"] == 2
    make_run(tmp_path / "dup", "a", image="pixels", seed=0, vqa=vqa)
    make_run(tmp_path / "dup", "b", image="pixels", seed=0, vqa=vqa)
    with pytest.raises(ValueError, match=r"arm pixels/scratch: .*a and .*b both have seed 0"):
        A.accuracy_table(A.load_runs(tmp_path / "dup"))
    big = make_run(tmp_path / "size", "s1", image="pixels", seed=1, vqa=vqa, val=[(10, 1.0)])
    make_run(tmp_path / "size", "s0", image="pixels", seed=0, vqa=vqa, val=[(10, 1.0)])
    cfg = yaml.safe_load((big / "config.resolved.yaml").read_text())
    cfg["serializer"]["image"]["size"] = [40, 27]
    (big / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"arm pixels/scratch: its runs differ in serializer.image.size"):
        A.accuracy_table(A.load_runs(tmp_path / "size"))
    make_run(tmp_path / "size", "p0", image="pixels", init="runs/pg19_lm", seed=0, val=[(10, 0.5)])
    with pytest.raises(ValueError, match="differ in serializer.image.size"):
        A.transfer_table(A.load_runs(tmp_path / "size"))
    assert set(A.group_runs(A.load_runs(tmp_path / "size"))) == {"pixels/scratch", "pixels/pg19"}  # no check


def test_errors_over_questions_are_clustered_by_image():
    """Questions about one image are not independent draws: with every image's questions answered alike, the
    clustered error is that of the per-image means (here 1/3), not the smaller one of 6 independent questions."""
    x, g = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b", "c", "c"]
    c = A.mean_stderr(x, g, binomial=True)
    assert c["mean"] == pytest.approx(2 / 3) and c["stderr"] == pytest.approx(1 / 3) and c["clusters"] == 3
    assert A.mean_stderr(x, binomial=True)["stderr"] == pytest.approx(math.sqrt(2 / 9 / 6))  # independent
    assert A.mean_stderr(x, list("abcdef"))["stderr"] == pytest.approx(np.std(x, ddof=1) / math.sqrt(6))
    recs = [{"id": i, "qtype": "exist", "gold": "yes", "pred_rank": "yes" if v else "no", "image": im}
            for i, (v, im) in enumerate(zip(x, g))]
    base = [dict(r, pred_rank="no") for r in recs]
    d = A.paired_records(recs, base)["all"]
    assert d["mean"] == pytest.approx(2 / 3) and d["stderr"] == pytest.approx(1 / 3) and d["clusters"] == 3


def test_transfer_table_counts_runs_that_never_reach_the_target(tmp_path: Path):
    """A pretrained run that never reaches scratch's final loss was left out of the speedup and step means (a mean
    over the survivors, the failure hidden); it now counts, censored at its last step, and the figures say they
    are bounds."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        make_run(root, f"png_scratch_s{seed}", seed=seed, val=[(10, 3.0), (20, 2.0), (30, 1.5)])
    make_run(root, "png_pg19_s0", seed=0, init="runs/pg19_lm", val=[(10, 2.0), (20, 1.5), (30, 1.2)])
    make_run(root, "png_pg19_s1", seed=1, init="runs/pg19_lm", val=[(10, 2.0), (20, 1.9), (30, 1.8)])  # never
    row = A.transfer_table(A.load_runs(root))[0]
    assert row["reached"] == "1/2" and row["scratch_reached"] == "2/2"
    p = row["pretrained_steps"]
    assert (p["n"], p["censored"], p["bound"], p["mean"]) == (2, 1, ">=", pytest.approx(25.0))  # 20 and >= 30
    sp = row["speedup"]  # seed 0: 30 / 20; seed 1: 30 / (>= 30), at most 1
    assert (sp["n"], sp["censored"], sp["bound"], sp["mean"]) == (2, 1, "<=", pytest.approx(1.25))
    assert A.fmt(sp).startswith("<= 1.25 ± ") and "1 censored" in A.fmt(sp)
    assert math.isnan(row["reduction"]) and row["reduction_bound"].startswith("<= ")
    assert row["scratch_steps"]["censored"] == 0 and A.fmt(row["scratch_steps"]).startswith("30 ± 0")


def test_seeds_scored_at_other_checkpoints_or_on_other_questions_are_not_averaged(tmp_path: Path):
    """A seed whose study scoring was skipped keeps only its end-of-training report (the best checkpoint on
    eval.max_samples questions): averaged with seeds scored at the last step on every question, without a word."""
    def seed(s, step, n):
        d = make_run(tmp_path, f"s{s}", seed=s)
        (d / "eval" / f"vqa_val_{step}.json").write_text(json.dumps({**vqa_result(0.4, {}), "step": step,
                                                                      "num_samples": n}))
        return A.load_run(d)

    runs = [seed(0, 5000, 1000), seed(1, 2250, 512)]
    with pytest.raises(ValueError, match="different checkpoints or question sets .*s1: step 2250, 512 questions"):
        A.accuracy_table(runs)
    assert A.accuracy_table([runs[0], seed(2, 5000, 1000)])[0]["accuracy"]["n"] == 2


def test_a_seed_recorded_before_a_config_key_existed_ran_its_default(tmp_path: Path):
    """Seeds trained before serializer.image_align existed have no such key in their record; seeds after it
    record its default, 1: the same setup, not runs that "differ in serializer.image_align"."""
    import yaml

    def seed(s, **serializer):
        d = make_run(tmp_path, f"s{s}", seed=s)
        cfg = yaml.safe_load((d / "config.resolved.yaml").read_text())
        cfg["serializer"].update(serializer)
        (d / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
        return A.load_run(d)

    old, new, other = seed(0), seed(1, image_align=1), seed(2, image_align=8)
    A.check_seeds_of_one_arm("png/scratch", [old, new])
    with pytest.raises(ValueError, match="differ in serializer.image_align"):
        A.check_seeds_of_one_arm("png/scratch", [old, new, other])
