"""The `pg19_speedrun` sweep (issue 18 item 4): each arm trains PG19-mini for a fixed time budget and is scored on
the validation book; the best arm by validation is scored once on the test book, at the end, and never chosen by it.

    python benchmarks/speedrun.py --root .data/pg19-mini --minutes 10 --out sweep.jsonl \\
        --arm base: --arm wide:model.stages.0.width=768 --arm drop:model.stages.1.block.dropout=0.1 [--final-test]

An arm is ``NAME:override,override,...`` on top of ``--config`` (default ``pg19_lm``). Per arm, in order:

1. calibration: ``--calibrate-steps`` steps with the arm's settings (compile, graphs and all), timed from the
   run's own metrics after its first log window (start-up, compile and autotuning excluded): seconds per step;
2. the run: ``train.steps`` = the steps that fit the budget at that rate (less ``--margin`` for the final
   evaluation), so the learning-rate schedule ends where the budget does. The budget is training time: the first
   step's start-up (torch.compile, Triton JIT and autotuning, CUDA-graph capture: up to two minutes on a cold
   machine, where the caches are empty) is not counted, since counting it would hand a cold arm fewer steps than a
   warm one. A hard cap still holds (``train.stop_after_minutes`` = the budget plus an allowance of 1.5x the
   calibration's start-up, at least a minute). Recorded per arm: ``startup_s`` (process start to the first
   training line, less that line's steps at the run's rate) and ``training_s`` (the steps reached at the median
   per-window rate of the run's own log). A run the cap cut short (``cut_by_budget``) or whose steps took longer than the
   budget (``over_budget``) is still scored, and never chosen by ``--final-test``;
3. ``omnibyte eval RUN validation``: the PG19 task's bits per byte over the whole validation book (each byte
   scored once) and word perplexity.

One JSON line per arm (arm, overrides, seconds per step, steps planned / reached, training seconds, validation
bpb); with ``--final-test`` a last line: the best arm by validation bpb and its test-book bpb. The test book is
scored once per sweep (``WORK/test_looks.jsonl``, or ``--looks FILE``: the repository's
``benchmarks/speedrun_looks.jsonl`` records the looks of the PG19-mini sweep, which spans machines whose work folders
are gone): a second ``--final-test``, e.g. after more arms, is refused unless ``--look-again``, and then the final
line lists every earlier look (``earlier_test_looks``).

**An arm longer than one command.** A 10-minute arm with its calibration, start-up and evaluation does not fit a
device command of 10 minutes. ``--call-seconds S`` caps this invocation's training so the harness exits inside S
seconds: the run stops with a checkpoint (``train.stop_after_minutes``), a ``speedrun_paused`` line says where,
and the same command run again (the work folder kept, e.g. on a still-warm machine) goes on: the calibration and
the plan (``WORK/NAME.plan.json``: seconds per step, steps, cap) are read back, not redone, and the run resumes
from its checkpoint with the budget that is left. Training time across invocations is the steps reached at the
run's median per-window rate, so the gap between invocations and each invocation's start-up are not counted.
Run arms in separate calls (``--only NAME`` picks one), and the last call with ``--final-test --choose-from
sweep.jsonl`` to score the chosen run on the test book.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from _common import emit

ROOT = Path(__file__).resolve().parent.parent


def _omnibyte(*args: str) -> list[str]:
    return [sys.executable, "-m", "omnibyte", *args]


def _records(run: Path, split: str) -> list[dict]:
    from omnibyte.logging import read_metrics

    return [r for r in read_metrics(run) if r.get("split") == split]


def _train_records(run: Path) -> list[dict]:
    return _records(run, "train")


def reached_step(run: Path, recs: list[dict]) -> int:
    """The step a run reached: its latest checkpoint's, or its last training line's if that is later. A stop
    request (the time cap, ``--call-seconds``) checkpoints the step it stops at, which is often between two log
    lines: the last line alone under-counts by up to ``train.log_every - 1`` steps, and says 0 when the stop came
    before the first line (the checkpoint's log window carries those steps into the resumed run's first line)."""
    from omnibyte.checkpoint import latest_checkpoint, read_state

    ckpt = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    return max(int(read_state(ckpt)["step"]) if ckpt else 0, recs[-1]["step"] if recs else 0)


def validation_curve(run: Path) -> list[list[float]]:
    """[[step, bpb], ...] of the run's own validation evaluations during training (``--eval-points``; the
    trainer's figure over the validation split's chunks, not ``omnibyte eval``'s whole-book score): where an arm
    stopped improving, e.g. from reading its data too many times. Diagnostic only: arms are chosen on the final
    score."""
    return [[r["step"], round(r["bpb"], 4)] for r in _records(run, "validation")
            if isinstance(r.get("bpb"), (int, float))]


def steady_rate(recs: list[dict], what: str) -> float:
    """Steady seconds per step from training lines: from the first log line (whose window holds the start-up and
    compiles) to the last."""
    if len(recs) < 2:
        raise SystemExit(f"{what} logged {len(recs)} training line(s); raise --calibrate-steps")
    a, b = recs[0], recs[-1]
    return (b["time"] - a["time"]) / (b["step"] - a["step"])


def seconds_per_step(run: Path) -> float:
    return steady_rate(_train_records(run), f"calibration run {run}")


def median_rate(recs: list[dict]) -> float | None:
    """Seconds per step: the median over consecutive training lines of (time gap) / (step gap). The window
    holding a start-up (compile, autotuning) or a gap between invocations (a resume) is one window among many, so
    it does not move the median; None with fewer than two lines."""
    rates = sorted((b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(recs, recs[1:])
                   if b["step"] > a["step"])
    if not rates:
        return None
    n = len(rates)
    return rates[n // 2] if n % 2 else (rates[n // 2 - 1] + rates[n // 2]) / 2


def timing(recs: list[dict], started: float, fallback_sps: float, reached: int | None = None) -> dict:
    """``training_s``: the steps reached (``reached``, else the last line's step) at the median per-window rate
    (the run's own, else ``fallback_sps`` when it logged one line); ``startup_s``: from ``started`` (an
    invocation's launch, epoch seconds) to its first training line, less that line's steps at that rate
    (meaningful for a run's first invocation)."""
    if not recs:
        return {"startup_s": None, "training_s": None if not reached else round(fallback_sps * reached, 1),
                "run_seconds_per_step": None}
    sps = median_rate(recs) or fallback_sps
    first, last = recs[0], recs[-1]
    steps = max(reached or 0, last["step"])
    return {"startup_s": round(first["time"] - started - sps * first["step"], 1),
            "training_s": round(sps * steps, 1), "run_seconds_per_step": round(sps, 4)}


def eligible(rec: dict) -> str | None:
    """Why an arm may not be chosen (None: it may): its schedule must have finished inside the budget."""
    if rec.get("cut_by_budget"):
        return f"cut by the time cap at step {rec.get('steps_reached')} of {rec.get('steps_planned')}"
    if rec.get("over_budget"):
        return f"its steps took {rec.get('training_s')} s, over the {rec.get('budget_minutes')}-minute budget"
    return None


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"--arm {text!r}: NAME:override,override,... (NAME: letters, digits, - and _)")
    return name, [o for o in rest.split(",") if o]


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log}:\n{log.read_text()[-3000:]}")


def evaluate(run_dir: Path, split: str, log: Path) -> dict:
    out = subprocess.run(_omnibyte("eval", str(run_dir), split, "eval.per_token=false", "--quiet"),
                         capture_output=True, text=True, cwd=ROOT)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"omnibyte eval {run_dir} {split} failed; see {log}:\n{out.stderr[-3000:]}")
    res = json.loads(Path(out.stdout.strip().splitlines()[-1]).read_text())
    task = res.get("task") or {}
    return {"bpb": task.get("bpb", res.get("bpb")), "word_ppl": task.get("word_ppl"), "step": res.get("step"),
            "checkpoint": res.get("checkpoint")}


def _save_plan(work: Path, name: str, plan: dict) -> None:
    (work / f"{name}.plan.json").write_text(json.dumps(plan, indent=1))


def _plan(name: str, overrides: list[str], a, work: Path, common: list[str]) -> dict:
    """The arm's calibration and plan, made once and kept in WORK/NAME.plan.json (a later invocation of the same
    arm reads it back; a different arm definition under the same name is refused)."""
    path = work / f"{name}.plan.json"
    what = {"config": a.config, "overrides": overrides, "common": list(a.common), "budget_minutes": a.minutes,
            "margin_s": a.margin, "calibrate_steps": a.calibrate_steps, "root": str(Path(a.root).resolve()),
            "eval_points": a.eval_points}
    if path.exists():
        plan = json.loads(path.read_text())
        if {k: plan.get(k) for k in what} != what:
            raise SystemExit(f"arm {name}: {path} was planned with other settings "
                             f"({ {k: plan.get(k) for k in what} }); use another --work or arm name")
        return plan
    cal = work / "runs" / f"{name}_calibration"
    t_cal = time.time()
    run(_omnibyte("train", *common, f"run_name={cal.name}", f"train.steps={a.calibrate_steps}",
                  "train.eval_every=0", "train.ckpt_every=0", "train.log_every=5"), work / f"{name}_calibration.log")
    sps = seconds_per_step(cal)
    cal_startup = timing(_train_records(cal), t_cal, sps)["startup_s"]
    plan = {**what, "seconds_per_step": sps, "steps": max(1, int((a.minutes * 60.0 - a.margin) / sps)),
            "calibration_startup_s": cal_startup,
            "allowance_s": max(60.0, 1.5 * cal_startup),  # the first step's start-up is not training time
            "invocations": []}
    _save_plan(work, name, plan)
    return plan


def one_arm(name: str, overrides: list[str], a, work: Path, started: float) -> dict:
    """Plan, train (or go on training) and score one arm; the arm's record, or a ``speedrun_paused`` record when
    ``--call-seconds`` stopped this invocation before the arm's schedule ended."""
    common = [a.config, f"task.root={Path(a.root).resolve()}", f"out_dir={work / 'runs'}", "train.progress=false",
              "eval.report=false", "--quiet", *a.common, *overrides]
    plan = _plan(name, overrides, a, work, common)
    sps, steps, allowance = plan["seconds_per_step"], plan["steps"], plan["allowance_s"]
    budget = a.minutes * 60.0
    run_dir = work / "runs" / name
    recs = _train_records(run_dir) if run_dir.exists() else []
    inv = plan["invocations"]
    ended = bool(inv) and not inv[-1].get("paused_by_call")  # the last invocation met the budget's cap (or ended)
    before = reached_step(run_dir, recs)
    if before < steps and not ended:
        spent = timing(recs, time.time(), sps, before)["training_s"] or 0.0
        cap = budget - spent + allowance  # the budget left, and this invocation's start-up
        paused_by_call = False
        limits = [a.call_train_seconds] if a.call_train_seconds else []
        if a.call_seconds:
            left = a.call_seconds - (time.time() - started) - a.eval_reserve
            if left < 5.0:
                raise SystemExit(f"arm {name}: {left:.0f} s left of --call-seconds={a.call_seconds} after "
                                 f"--eval-reserve={a.eval_reserve}: too little to train; run it in another call")
            limits.append(left)
        if limits:
            paused_by_call, cap = min(limits) < cap, min(cap, *limits)
        t0 = time.time()
        plan["invocations"].append({"started": t0, "from_step": recs[-1]["step"] if recs else 0,
                                    "cap_s": round(cap, 1)})
        _save_plan(work, name, plan)
        run(_omnibyte("train", *common, f"run_name={name}", f"train.steps={steps}",
                      f"train.stop_after_minutes={cap / 60.0:.4f}",
                      f"train.eval_every={max(1, steps // a.eval_points) if a.eval_points else steps}",
                      f"train.ckpt_every={steps}"), work / f"{name}.log")
        recs = _train_records(run_dir)
        reached = reached_step(run_dir, recs)
        plan["invocations"][-1]["paused_by_call"] = reached < steps and paused_by_call
        _save_plan(work, name, plan)
        if reached < steps and paused_by_call:
            tm = timing(recs, t0, sps, reached)
            return {"bench": "speedrun_paused", "arm": name, "steps_reached": reached, "steps_planned": steps,
                    "training_s": tm["training_s"], "budget_minutes": a.minutes, "run": str(run_dir),
                    "next": "run the same command again (same --work) to go on from the checkpoint"}
    reached = reached_step(run_dir, recs)
    first = plan["invocations"][0]["started"] if plan["invocations"] else time.time()
    tm = timing([r for r in recs if r["time"] >= first], first, sps, reached)
    if len(plan["invocations"]) > 1:  # the start-up of the first invocation only: later ones resumed
        tm["startup_s"] = timing([r for r in recs if first <= r["time"] < plan["invocations"][1]["started"]],
                                 first, sps)["startup_s"]
    val = evaluate(run_dir, "validation", work / f"{name}_eval_validation.log")
    return {"bench": "speedrun_arm", "config": a.config, "arm": name, "overrides": overrides,
            "seconds_per_step": round(sps, 4), "steps_planned": steps, "steps_reached": reached,
            "cut_by_budget": reached < steps, "budget_minutes": a.minutes,
            "over_budget": tm["training_s"] is not None and tm["training_s"] > budget, **tm,
            "invocations": len(plan["invocations"]), "calibration_startup_s": plan["calibration_startup_s"],
            "allowance_s": round(allowance, 1), "validation_bpb": val["bpb"], "validation_word_ppl": val["word_ppl"],
            "validation_curve": validation_curve(run_dir), "run": str(run_dir), "common": list(a.common),
            "root": a.root, "margin_s": a.margin, "calibrate_steps": a.calibrate_steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="a PG19-format folder (train/ validation/ test/)")
    p.add_argument("--config", default="pg19_lm")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per arm")
    p.add_argument("--margin", type=float, default=30.0, help="seconds of the budget left for evaluations and the "
                                                               "first step's compile")
    p.add_argument("--calibrate-steps", type=int, default=40)
    p.add_argument("--eval-points", type=int, default=0, help="validation evaluations during each arm's run (its "
                   "validation_curve: where it stopped improving; they take time inside the cap, not training_s); "
                   "0: only the final one")
    p.add_argument("--arm", action="append", default=[], help="NAME:override,override,... (repeatable)")
    p.add_argument("--only", default="", help="run only these arms (comma-separated names)")
    p.add_argument("--common", nargs="*", default=[], help="overrides for every arm")
    p.add_argument("--work", default="speedrun_work")
    p.add_argument("--final-test", action="store_true", help="score the best arm by validation bpb on the test book")
    p.add_argument("--look-again", action="store_true", help="--final-test although this sweep's test book was "
                   "already scored (every earlier look is recorded in the final line)")
    p.add_argument("--looks", default="", help="the record of this sweep's test-book looks (default: "
                   "WORK/test_looks.jsonl); a file kept with the repository (benchmarks/speedrun_looks.jsonl) holds "
                   "the looks of a sweep that spans machines, whose work folders are gone")
    p.add_argument("--choose-from", default="", help="JSON lines of earlier arms (this sweep's --out) to choose among")
    p.add_argument("--out", default=None)
    p.add_argument("--call-seconds", type=float, default=0.0, help="stop this invocation's training so the harness "
                   "ends within this many seconds (a device command's limit); run it again to go on (0: off)")
    p.add_argument("--call-train-seconds", type=float, default=0.0, help="train at most this many seconds in this "
                   "invocation (its start-up included), then pause as --call-seconds does (0: off)")
    p.add_argument("--eval-reserve", type=float, default=60.0, help="--call-seconds: seconds kept for the "
                   "validation evaluation (and the final test) after training")
    a = p.parse_args()
    started = time.time()
    if not (math.isfinite(a.minutes) and a.minutes > 0):
        raise SystemExit(f"--minutes must be > 0, got {a.minutes}")
    if a.eval_points < 0:
        raise SystemExit(f"--eval-points must be >= 0, got {a.eval_points}")
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    arms = [parse_arm(x) for x in a.arm]
    only = {x for x in a.only.split(",") if x}
    if unknown := only - {n for n, _ in arms}:
        raise SystemExit(f"--only: no such arm {sorted(unknown)}")
    done = []
    for name, overrides in arms:
        if only and name not in only:
            continue
        rec = one_arm(name, overrides, a, work, started)
        emit(rec, a.out)
        if rec["bench"] == "speedrun_paused":
            print(f"arm {name} paused at step {rec['steps_reached']} of {rec['steps_planned']}: run the same "
                  f"command again to go on", file=sys.stderr)
            return
        done.append(rec)
    if not a.final_test:
        return
    pool = list(done)
    if a.choose_from:
        pool += [json.loads(x) for x in Path(a.choose_from).read_text().splitlines()
                 if x.strip() and json.loads(x).get("bench") == "speedrun_arm"]
    # one entry per run (--choose-from = --out holds this call's arms too), and only arms of this config and
    # training budget: a longer budget's arm is not a candidate of this one
    pool = list({r.get("run"): r for r in pool if isinstance(r.get("validation_bpb"), (int, float))
                 and r.get("config") == a.config and r.get("budget_minutes") == a.minutes}.values())
    # an arm whose schedule did not finish inside the budget is not comparable: it is listed, never chosen
    why = {r["run"]: eligible(r) for r in pool}
    excluded = [{"arm": r["arm"], "run": r["run"], "why": why[r["run"]]} for r in pool if why[r["run"]]]
    pool = [r for r in pool if not why[r["run"]]]
    if not pool:
        raise SystemExit(f"--final-test: no arm of config {a.config} at {a.minutes} minutes finished its schedule "
                         f"inside the budget; excluded: {excluded}")
    best = min(pool, key=lambda r: r["validation_bpb"])  # chosen on validation only
    # the test book is scored once per sweep: a second look after changing the pool is selection on test
    looks = Path(a.looks) if a.looks else work / "test_looks.jsonl"
    earlier = [json.loads(x) for x in looks.read_text().splitlines() if x.strip()] if looks.exists() else []
    if earlier and not a.look_again:
        e = earlier[-1]
        raise SystemExit(f"--final-test: this sweep's test book was already scored (arm {e['arm']}, {e['date']}; "
                         f"{looks}): looking again after changing the arms is choosing on test. Pass --look-again "
                         f"to score it anyway; the final line then records every earlier look")
    test = evaluate(Path(best["run"]), "test", work / f"{best['arm']}_eval_test.log")
    looks.parent.mkdir(parents=True, exist_ok=True)
    with open(looks, "a") as f:
        f.write(json.dumps({"arm": best["arm"], "run": best["run"], "test_bpb": test["bpb"],
                            "config": a.config, "budget_minutes": best["budget_minutes"],
                            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    emit({"bench": "speedrun_final", "config": a.config, "chosen_by": "validation_bpb", "arm": best["arm"],
          "overrides": best["overrides"], "validation_bpb": best["validation_bpb"], "test_bpb": test["bpb"],
          "test_word_ppl": test["word_ppl"], "steps_reached": best["steps_reached"],
          "budget_minutes": best["budget_minutes"], "arms_compared": len(pool), "excluded": excluded,
          "earlier_test_looks": earlier, "run": best["run"]}, a.out)


if __name__ == "__main__":
    main()
