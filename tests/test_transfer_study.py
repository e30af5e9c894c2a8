"""The transfer study's driver end to end at its CPU size (``results/run_transfer.py --scale micro``): data,
PG19 pretraining, the scratch, Multimodal Pathway and modality-aware arms on raw pixels, their evaluation
(VQA per question, cost, answer-loss split) and ``results/report.py``'s per-question tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pg19(root: Path) -> Path:
    text = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 40).encode()
    for split, n in (("train", 3), ("validation", 1), ("test", 1)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            (root / split / f"{split}{i}.txt").write_bytes(text[i:] + b"\n")
    return root


@pytest.mark.slow
def test_the_micro_study_runs_every_arm_and_reports_paired_differences(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "results" / "run_transfer.py"), "--out", str(out), "--pg19",
           str(_pg19(tmp_path / "pg19")), "--scale", "micro", "--seeds", "1", "--kinds", "pixels", "--no-cnn",
           "--arms", "scratch,pathway,mom"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kinds"] == ["pixels"] and set(summary["status"].values()) == {0}
    assert not any(k.startswith(("png", "jpeg", "cnn")) for k in summary["status"])
    runs = {n: out / "runs" / f"pixels_{n}_s0" for n in ("scratch", "pathway", "mom")}
    cost = {n: json.loads((d / "eval" / "cost.json").read_text()) for n, d in runs.items()}
    assert cost["pathway"]["params_trained"] > cost["scratch"]["params_trained"]  # W' trains too
    assert cost["pathway"]["flops_per_step"] > cost["scratch"]["flops_per_step"]  # only the weight combination:
    assert cost["pathway"]["flops_per_step"] < 1.01 * cost["scratch"]["flops_per_step"]  # one multiply per layer
    assert cost["mom"]["flops_per_step"] == cost["scratch"]["flops_per_step"]  # one expert per position
    for d in runs.values():
        split = json.loads((d / "eval" / "answer_split_val.json").read_text())
        assert split["rows"] == 3 and split["first_byte"]["n"] == 3
        assert list((d / "eval").glob("vqa_val_*_predictions.jsonl"))
        blind = {r["corruption"]: r for r in json.loads((d / "eval" / "blind_val.json").read_text())["rows"]}
        assert list(blind) == ["clean", "blank"] and blind["blank"]["paired"]["all"]["n"] == 4  # vqa_samples
        assert blind["blank"]["paired"]["all"]["mean"] == pytest.approx(blind["blank"]["accuracy"]
                                                                        - blind["clean"]["accuracy"])
    sys.path.insert(0, str(REPO / "results"))
    try:
        import report
    finally:
        sys.path.remove(str(REPO / "results"))
    text = report.per_question_tables(str(out / "runs"))
    assert "pixels/scratch" in text and "pixels/pathway-pg19" in text and "pixels/mom" in text
    assert "Δ all" in text and "GFLOPs / step" in text and "the blind control" in text


def test_the_runner_gives_a_freed_slot_to_the_evaluation_of_the_training_that_just_ended(tmp_path):
    """One slot: A trains, B (declared before A's evaluation) waits; when A ends, its evaluation runs before B,
    so a budget cut falls on B, not on the evaluation of a training already paid for. A job whose dependency
    failed is skipped without holding up the others."""
    import time

    sys.path.insert(0, str(REPO / "results"))
    try:
        import run_transfer
    finally:
        sys.path.remove(str(REPO / "results"))
    order = tmp_path / "order.txt"

    def job(name, code=0, sleep=0.3):
        return [sys.executable, "-c", f"import time; time.sleep({sleep}); open({str(order)!r}, 'a').write("
                                      f"{name!r} + '\\n'); raise SystemExit({code})"]

    r = run_transfer.Runner(tmp_path, 1, time.time() + 120, {})
    a = r.run("train_a", job("train_a"))
    bad = r.run("train_bad", job("train_bad", code=1, sleep=0.0))
    b = r.run("train_b", job("train_b"))
    e = r.run("eval_a", job("eval_a"), [a], ["train_a"], priority=0)
    skipped = r.run("eval_bad", job("eval_bad"), [bad], ["train_bad"], priority=0)
    for ev in (a, bad, b, e, skipped):
        assert ev.wait(30)
    done = order.read_text().split()
    assert done.index("eval_a") < done.index("train_b"), done
    assert "eval_bad" not in done and r.status["eval_bad"].startswith("skipped (train_bad failed)")
    assert r.status["train_a"] == 0 and r.status["train_bad"] == 1 and r.status["train_b"] == 0
    assert not r.pending and r.running == 0


def test_the_summary_names_the_commit_of_a_copy_without_git(monkeypatch):
    """On the device the study runs from a copy without .git: the summary's commit is OMNIBYTE_COMMIT (it said ""
    in the twelfth session's probe, which had exported it), as every other record's is."""
    from omnibyte import provenance

    sys.path.insert(0, str(REPO / "results"))
    try:
        import run_transfer
    finally:
        sys.path.remove(str(REPO / "results"))
    monkeypatch.setenv("OMNIBYTE_COMMIT", "f7b0ff9")
    provenance.git_state.cache_clear()
    try:
        env = run_transfer._environment()
    finally:
        provenance.git_state.cache_clear()
    assert env["commit"] == "f7b0ff9" and env["dirty"] is None


def test_the_answer_prior_is_taken_on_the_questions_evaluation_scores(tmp_path, monkeypatch):
    """With --vqa-samples N the prior took the FIRST N val questions while evaluation scores N spread over the
    split (subset_positions): the baseline of the report's sentence was another, image-clustered question set."""
    from omnibyte.data.sources import subset_positions

    monkeypatch.syspath_prepend(str(REPO / "results"))
    import run_transfer

    data = tmp_path / "clevr"
    (data / "questions").mkdir(parents=True)
    fam = {"exist": 0, "count": 1}

    def q(i, split, answer, kind):
        prog = [{"function": "scene", "inputs": []}, {"function": kind, "inputs": [0]}]
        return {"question": f"q{i}", "answer": answer, "image_filename": f"CLEVR_{split}_{i:06d}.png",
                "question_family_index": fam[kind], "program": prog}

    train = [q(i, "train", "yes", "exist") for i in range(5)] + [q(5 + i, "train", "3", "count") for i in range(5)]
    val = [q(i, "val", "yes" if i % 3 else "no", "exist") for i in range(30)]
    for split, qs in (("train", train), ("val", val)):
        (data / "questions" / f"CLEVR_{split}_questions.json").write_text(json.dumps({"questions": qs}))
    out = tmp_path / "prior.json"
    assert run_transfer.main(["prior", str(data), str(out), "--vqa-samples", "10"]) == 0
    res = json.loads(out.read_text())
    chosen = subset_positions(30, 10)
    assert chosen != list(range(10)) and res["num_val"] == 10 and res["val_subset"]["rule"] == "spread"
    assert res["majority_by_family"] == sum(val[i]["answer"] == "yes" for i in chosen) / 10
