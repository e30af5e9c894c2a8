"""benchmarks/speedrun.py: the first step's start-up is not training time, and --final-test never chooses an arm
whose schedule did not finish inside the budget (an H100 sweep's cold first arm spent 114 s of a 3-minute budget
compiling in its first step and was cut at 2,160 of 4,836 steps, beside a warm arm that finished)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.model_helpers import BENCH, load_benchmark


@pytest.fixture
def speedrun(monkeypatch):
    return load_benchmark(monkeypatch, "speedrun")


def _recs(t_first: float, sps: float, steps: range) -> list[dict]:
    first = steps[0]
    return [{"step": s, "split": "train", "time": t_first + (s - first) * sps} for s in steps]


def test_timing_separates_start_up_from_training(speedrun):
    # launched at t=1000; 114 s of compile in step 1, then 0.05 s a step; lines every 10 steps up to 2,000
    recs = _recs(1000.0 + 114.0 + 10 * 0.05, 0.05, range(10, 2001, 10))
    tm = speedrun.timing(recs, 1000.0, fallback_sps=0.9)
    assert tm["run_seconds_per_step"] == pytest.approx(0.05)
    assert tm["startup_s"] == pytest.approx(114.0, abs=0.1)
    assert tm["training_s"] == pytest.approx(100.0, abs=0.1)  # 2,000 steps at the steady rate, start-up excluded
    one = speedrun.timing(recs[:1], 1000.0, fallback_sps=0.05)  # one line: the calibration's rate
    assert one["training_s"] == pytest.approx(0.5) and one["startup_s"] == pytest.approx(114.0, abs=0.1)
    assert speedrun.timing([], 1000.0, 0.05)["training_s"] is None


def test_steps_reached_count_the_checkpoint_a_stop_wrote_between_log_lines(speedrun, tmp_path):
    """A stop request checkpoints the step it stops at, usually between log lines: the run reached that step, not
    the last line's (a loaded CI box once stopped an arm before its first line, and the harness said step 0)."""
    from omnibyte.vocab import CONTRACT_VERSION

    run = tmp_path / "run"
    (run / "checkpoints" / "step_000007").mkdir(parents=True)
    (run / "checkpoints" / "step_000007" / "state.json").write_text(
        json.dumps({"step": 7, "contract_version": CONTRACT_VERSION}))
    (run / "checkpoints" / "latest").write_text("step_000007")
    recs = _recs(100.0, 0.5, range(5, 6))
    assert speedrun.reached_step(run, recs) == 7
    assert speedrun.reached_step(run, []) == 7  # stopped before the first log line
    assert speedrun.reached_step(run, _recs(100.0, 0.5, range(5, 11, 5))) == 10  # a line past the checkpoint
    assert speedrun.reached_step(tmp_path / "none", []) == 0
    assert speedrun.timing(recs, 90.0, 0.5, reached=7)["training_s"] == pytest.approx(3.5)
    assert speedrun.timing([], 90.0, 0.5, reached=7)["training_s"] == pytest.approx(3.5)


def test_eligible_names_why_an_arm_may_not_be_chosen(speedrun):
    ok = {"cut_by_budget": False, "over_budget": False}
    assert speedrun.eligible(ok) is None
    assert "step 2160 of 4836" in speedrun.eligible({**ok, "cut_by_budget": True, "steps_reached": 2160,
                                                      "steps_planned": 4836})
    assert "over the 3.0-minute budget" in speedrun.eligible({**ok, "over_budget": True, "training_s": 190.0,
                                                              "budget_minutes": 3.0})
    assert speedrun.eligible({}) is None  # records of older sweeps: no flags, judged by what they say


def _arm(name: str, bpb: float, **kw) -> dict:
    return {"bench": "speedrun_arm", "config": "pg19_lm", "arm": name, "overrides": [], "budget_minutes": 3.0,
            "validation_bpb": bpb, "steps_reached": 100, "steps_planned": 100, "cut_by_budget": False,
            "over_budget": False, "run": f"/runs/{name}", **kw}


def _final(speedrun, monkeypatch, tmp_path, arms: list[dict], *extra: str) -> list[dict]:
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text("".join(json.dumps(a) + "\n" for a in arms))
    scored = []

    def fake_eval(run, split, log):
        scored.append((str(run), split))
        return {"bpb": 1.7, "word_ppl": 900.0, "step": 100, "checkpoint": None}

    monkeypatch.setattr(speedrun, "evaluate", fake_eval)
    out = tmp_path / "final.jsonl"
    monkeypatch.setattr(sys, "argv", ["speedrun.py", "--root", str(tmp_path), "--minutes", "3", "--work",
                                      str(tmp_path / "w"), "--final-test", "--choose-from", str(sweep),
                                      "--out", str(out), *extra])
    speedrun.main()
    assert len(scored) == 1 and scored[0][1] == "test"  # the test book is scored once, for the chosen arm
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_final_test_never_chooses_an_arm_that_did_not_finish(speedrun, monkeypatch, tmp_path):
    arms = [_arm("cut", 1.50, cut_by_budget=True, steps_reached=50),  # best validation, but its schedule was cut
            _arm("slow", 1.60, over_budget=True, training_s=200.0),
            _arm("fine", 1.90), _arm("better", 1.80)]
    final = _final(speedrun, monkeypatch, tmp_path, arms)[-1]
    assert final["bench"] == "speedrun_final" and final["arm"] == "better" and final["arms_compared"] == 2
    assert {e["arm"] for e in final["excluded"]} == {"cut", "slow"}
    assert all(e["why"] for e in final["excluded"])


def test_final_test_refuses_when_no_arm_finished(speedrun, monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="no arm of config pg19_lm at 3.0 minutes finished"):
        _final(speedrun, monkeypatch, tmp_path, [_arm("cut", 1.5, cut_by_budget=True)])


TINY = ["data.seq_len=512", "data.batch_size=2", "model.stages.0.length=64", "model.stages.0.width=64",
        "model.stages.0.layers=1", "model.stages.1.width=32", "model.stages.1.layers=1", "train.compile=false"]


def _pg19(tmp_path) -> Path:
    """A PG19-layout folder of repeated English text (the test must not read ../shared)."""
    root = tmp_path / "pg19"
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 400
    for split, n in (("train", 3), ("validation", 1), ("test", 1)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            (root / split / f"{i}.txt").write_text(text)
    return root


@pytest.mark.slow
def test_an_arm_paused_by_the_call_limit_goes_on_where_it_stopped(speedrun, monkeypatch, tmp_path):
    """--call-seconds stops the run with a checkpoint and a speedrun_paused line; the same command again reads the
    plan back (no second calibration), resumes, and scores the arm once its schedule has run."""
    root, work, out = _pg19(tmp_path), tmp_path / "work", tmp_path / "sweep.jsonl"
    # a schedule of ~15 s (30-s budget, 15-s margin), so that the second invocation finishes inside its cap (the
    # budget left plus a minute) even when the box runs 4x slower than at calibration, as a loaded CI box did
    argv = ["speedrun.py", "--root", str(root), "--minutes", "0.5", "--margin", "15", "--calibrate-steps", "12",
            "--work", str(work), "--out", str(out), "--eval-points", "3", "--common", *TINY, "--arm", "base:"]
    # 8 s of the first invocation, its start-up included (--call-train-seconds: independent of how long the
    # calibration took on this machine; --call-seconds, which counts it, is the device-call form of the same pause)
    monkeypatch.setattr(sys, "argv", [*argv, "--call-train-seconds", "8", "--call-seconds", "600"])
    speedrun.main()
    (paused,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert paused["bench"] == "speedrun_paused" and 0 < paused["steps_reached"] < paused["steps_planned"]
    plan = json.loads((work / "base.plan.json").read_text())
    assert len(plan["invocations"]) == 1 and plan["invocations"][0]["paused_by_call"]
    cal_mtime = (work / "runs" / "base_calibration" / "metrics.jsonl").stat().st_mtime
    monkeypatch.setattr(sys, "argv", argv)
    speedrun.main()
    arm = json.loads(out.read_text().splitlines()[-1])
    assert arm["bench"] == "speedrun_arm" and arm["steps_reached"] == arm["steps_planned"] == plan["steps"]
    assert arm["invocations"] == 2 and not arm["cut_by_budget"] and arm["validation_bpb"] > 0
    curve = arm["validation_curve"]  # --eval-points 3: evaluations during the run, the last at its end
    assert len(curve) >= 3 and [s for s, _ in curve] == sorted({s for s, _ in curve}) and curve[-1][0] == plan["steps"]
    assert (work / "runs" / "base_calibration" / "metrics.jsonl").stat().st_mtime == cal_mtime  # not recalibrated
    steps = [r["step"] for r in speedrun._train_records(work / "runs" / "base")]
    assert steps == sorted(set(steps))  # resumed from the checkpoint: no step twice
    monkeypatch.setattr(sys, "argv", argv)  # a third time: nothing left to train, the arm is scored again
    speedrun.main()
    again = json.loads(out.read_text().splitlines()[-1])
    assert again["steps_reached"] == arm["steps_reached"] and again["invocations"] == 2


def test_validation_curve_reads_the_runs_own_evaluations(speedrun, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": 5, "split": "train", "time": 1.0, "bpb": 3.0}, {"step": 5, "split": "validation", "time": 2.0,
            "bpb": 2.51234}, {"step": 10, "split": "validation", "time": 3.0, "bpb": 2.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert speedrun.validation_curve(run) == [[5, 2.5123], [10, 2.4]]


def test_the_test_book_is_scored_once_per_sweep(speedrun, monkeypatch, tmp_path):
    """A second --final-test (after more arms: the pool changed) is choosing on test: refused, unless --look-again,
    whose final line records the earlier look."""
    _final(speedrun, monkeypatch, tmp_path, [_arm("a", 1.9)])
    with pytest.raises(SystemExit, match="already scored .arm a"):
        _final(speedrun, monkeypatch, tmp_path, [_arm("a", 1.9), _arm("b", 1.8)])
    final = _final(speedrun, monkeypatch, tmp_path, [_arm("a", 1.9), _arm("b", 1.8)], "--look-again")[-1]
    assert final["arm"] == "b" and [e["arm"] for e in final["earlier_test_looks"]] == ["a"]


def test_a_looks_file_carries_the_record_across_work_folders(speedrun, monkeypatch, tmp_path):
    """--looks FILE (the repository's benchmarks/speedrun_looks.jsonl): a sweep spanning machines, each with a
    fresh work folder, still refuses a second look at the test book, and records both in the file."""
    looks = tmp_path / "kept" / "looks.jsonl"
    for m in ("machine1", "machine2"):
        (tmp_path / m).mkdir()
    _final(speedrun, monkeypatch, tmp_path / "machine1", [_arm("a", 1.9)], "--looks", str(looks))
    with pytest.raises(SystemExit, match="already scored .arm a"):
        _final(speedrun, monkeypatch, tmp_path / "machine2", [_arm("b", 1.8)], "--looks", str(looks))
    final = _final(speedrun, monkeypatch, tmp_path / "machine2", [_arm("b", 1.8)], "--looks", str(looks),
                   "--look-again")[-1]
    assert [e["arm"] for e in final["earlier_test_looks"]] == ["a"]
    assert [json.loads(x)["arm"] for x in looks.read_text().splitlines()] == ["a", "b"]


def test_the_repository_keeps_the_pg19_sweeps_looks():
    """benchmarks/speedrun_looks.jsonl: the PG19-mini sweep's test book was looked at (the tenth session's drop01);
    the next --final-test of that sweep must say it looks again."""
    recs = [json.loads(x) for x in (BENCH / "speedrun_looks.jsonl").read_text().splitlines() if x.strip()]
    assert recs and recs[0]["arm"] == "drop01" and abs(recs[0]["test_bpb"] - 1.7205) < 1e-3
