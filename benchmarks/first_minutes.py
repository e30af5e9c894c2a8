"""Steps a CLEVR byte run reaches in its first minutes, per batch-padding mode (issue: shape-stable batches).

Each arm is a real ``omnibyte train`` process (the same config and overrides; only the arm's own overrides
differ: ``data.pad_to``, ``train.warm_shapes``, ``train.compile``, ``train.cuda_graphs``), started with cold
Triton and inductor caches of its own (fresh ``TRITON_CACHE_DIR`` and ``TORCHINDUCTOR_CACHE_DIR``), so every
arm pays the JIT compiles and autotuning a user's first run pays. With ``--prime S`` each arm first runs the
same command for S seconds (untimed) in those cache folders, so the timed run starts as a user's second run
on the machine does: compiled kernels and autotuning results on disk (``"caches": "primed"`` in its line). With
``--prime-once`` only the first arm primes, once, and every arm starts from a copy of those caches (one prime
for all arms; ``"caches": "primed once (ARM)"``): the shapes another arm adds still compile in its timed run. The data are generated (or read)
once before the first arm. After ``--seconds`` of wall time (process start included) the arm is stopped and
the last step in its ``metrics.jsonl`` (``train.log_every=1``) is its result. One JSON line per arm, with where
the time went: seconds to step 1, the logged shape warm-up, the step rate over the arm's last minute; each arm's
log is kept (``--logs``).

    python benchmarks/first_minutes.py --config clevr_vqa_pixels --seconds 180 --out bench.jsonl
    python benchmarks/first_minutes.py --config clevr_vqa_pixels --seconds 20 preset=cpu   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit

# every arm names its data.workers: the shipped CLEVR configs changed from 0 to 4 (after 02869dc's measurement)
ARMS = {
    "shipped": [],  # the config as it is (pad_to: buckets, data.workers: 4)
    "longest": ["data.pad_to=longest", "train.warm_shapes=false", "data.workers=0"],  # the configs before both
    "buckets": ["data.pad_to=buckets", "train.warm_shapes=auto", "data.workers=0"],  # buckets alone
    "longest_workers": ["data.pad_to=longest", "train.warm_shapes=false", "data.workers=4"],  # workers alone
    "seq_len": ["data.pad_to=seq_len", "train.warm_shapes=false", "data.workers=0"],  # one shape, ~5% more padding
    # with train.compile (the "today": 350 steps with longest rows), and with per-shape CUDA graphs
    "longest_compiled": ["data.pad_to=longest", "train.warm_shapes=false", "train.compile=true", "data.workers=0"],
    "buckets_compiled": ["data.pad_to=buckets", "train.warm_shapes=auto", "train.compile=true", "data.workers=0"],
    "buckets_graphs": ["data.pad_to=buckets", "train.compile=true", "train.cuda_graphs=true", "data.workers=0"],
    # the CLEVR configs serialize in the training process (data.workers=0: PNG decode + resize of every row
    # between steps, ~3 ms each on one core); with 4 DataLoader workers the next batches are made during the step
    "buckets_workers": ["data.pad_to=buckets", "train.warm_shapes=auto", "data.workers=4"],
    "buckets_graphs_workers": ["data.pad_to=buckets", "train.compile=true", "train.cuda_graphs=true",
                               "data.workers=4"],
}


def timeline(run_dir: Path) -> list[tuple[int, float]]:
    """(step, wall time) of every training line in the arm's ``metrics.jsonl`` (``train.log_every=1``)."""
    from omnibyte.logging import read_metrics  # skips the line being written when the arm was stopped

    return [(int(r["step"]), float(r["time"])) for r in read_metrics(run_dir) if r.get("split") == "train"]


def where_time_went(steps: list[tuple[int, float]], started: float, log_text: str) -> dict:
    """Seconds from the process start to step 1, the warm-up the run logged, and the step rate over the last
    60 s of the arm (its steady state, when it got there)."""
    import re

    rec: dict = {}
    m = re.search(r"warmed up (\d+) row length\(s\) (\[[^\]]*\]) in ([0-9.]+) s", log_text)
    if m:
        rec.update(warm_lengths=json.loads(m.group(2)), warm_s=float(m.group(3)))
    if steps:
        rec["first_step_s"] = round(steps[0][1] - started, 1)
        end = steps[-1][1]
        recent = [(s, t) for s, t in steps if t >= end - 60]
        if len(recent) > 1 and recent[-1][1] > recent[0][1]:
            rec["steps_per_s_last_60s"] = round((recent[-1][0] - recent[0][0]) / (recent[-1][1] - recent[0][1]), 2)
    return rec


def _run_for(cmd: list[str], env: dict, log_file, seconds: float) -> tuple[bool, int | None]:
    """Run ``cmd`` for at most ``seconds`` (then its process group is killed); (finished, exit code)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True,
                            start_new_session=True)
    try:
        proc.wait(timeout=seconds)
        return True, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False, None


def arm_command(name: str, args, overrides: list[str], work: Path, run_name: str) -> list[str]:
    return [sys.executable, "-m", "omnibyte", "train", args.config, f"out_dir={work / 'runs'}",
            f"run_name={run_name}", "train.log_every=1", f"train.steps={args.steps}", "train.eval_every=0",
            "train.ckpt_every=0", "eval.report=false", "train.progress=false", *overrides, *ARMS[name]]


def cache_env(triton: str, inductor: str) -> dict:
    return {**os.environ, "TRITON_CACHE_DIR": triton, "TORCHINDUCTOR_CACHE_DIR": inductor, "PYTHONUNBUFFERED": "1"}


def prime_once(name: str, args, overrides: list[str], work: Path) -> tuple[Path, Path]:
    """Run arm ``name`` untimed for ``--prime`` seconds into a cache pair of its own; the arms copy it."""
    triton, inductor = work / "primed-triton", work / "primed-inductor"
    triton.mkdir(exist_ok=True)
    inductor.mkdir(exist_ok=True)
    log_path = (Path(args.logs) if args.logs else work) / f"first_minutes_{name}.prime.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        _run_for(arm_command(name, args, overrides, work, f"{name}_prime"), cache_env(str(triton), str(inductor)),
                 f, args.prime)
    return triton, inductor


def run_arm(name: str, args, overrides: list[str], work: Path, primed: tuple[Path, Path] | None = None) -> dict:
    triton = tempfile.mkdtemp(prefix=f"triton-{name}-", dir=work)
    inductor = tempfile.mkdtemp(prefix=f"inductor-{name}-", dir=work)
    if primed is not None:  # a copy, so that no arm sees what an earlier timed arm compiled
        shutil.copytree(primed[0], triton, dirs_exist_ok=True)
        shutil.copytree(primed[1], inductor, dirs_exist_ok=True)
    env = cache_env(triton, inductor)
    cmd = arm_command(name, args, overrides, work, name)
    log_path = (Path(args.logs) if args.logs else work) / f"first_minutes_{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if args.prime > 0 and primed is None:  # the same command, untimed, in the same cache folders, a run of its own
        with open(log_path.with_suffix(".prime.log"), "w") as f:
            _run_for(arm_command(name, args, overrides, work, f"{name}_prime"), env, f, args.prime)
    t0, started = time.perf_counter(), time.time()
    with open(log_path, "w") as log_file:
        finished, returncode = _run_for(cmd, env, log_file, args.seconds)
    secs = time.perf_counter() - t0
    err = log_path.read_text()
    if finished and returncode != 0:
        raise SystemExit(f"arm {name} failed (exit {returncode}):\n{err[-3000:]}")
    steps = timeline(work / "runs" / name)
    caches = "cold" if args.prime <= 0 else "primed" if primed is None else f"primed once ({args.arms.split(',')[0]})"
    return {"arm": name, "overrides": ARMS[name], "caches": caches,
            "seconds": round(secs, 1),
            "steps": max((s for s, _ in steps), default=0), "finished": finished,
            **where_time_went(steps, started, err), "log": str(log_path)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="clevr_vqa_pixels")
    p.add_argument("--seconds", type=float, default=180.0, help="wall time per arm (process start included)")
    p.add_argument("--prime", type=float, default=0.0,
                   help="seconds of an untimed run of each arm first, in its cache folders (0: cold caches)")
    p.add_argument("--prime-once", action="store_true",
                   help="prime only the first arm, once; every arm starts from a copy of its caches")
    p.add_argument("--steps", type=int, default=100000, help="train.steps (large: the clock stops the arm)")
    p.add_argument("--arms", default="longest,buckets", help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--work", default=None, help="folder for the runs and Triton caches (default: a temp folder)")
    p.add_argument("--out", default=None)
    p.add_argument("--logs", default=None, help="folder for each arm's log (default: --work)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every arm")
    args = p.parse_args()
    if bad := [a for a in args.arms.split(",") if a not in ARMS]:
        p.error(f"--arms: unknown {bad}; choose from {', '.join(ARMS)}")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="first_minutes-"))
    work.mkdir(parents=True, exist_ok=True)
    # the data once, before any arm is timed (a generated CLEVR set is cached under $OMNIBYTE_CACHE)
    subprocess.run([sys.executable, "-m", "omnibyte", "train", args.config, f"out_dir={work / 'runs'}",
                    "run_name=data", "--dry-run", "--quiet", *args.overrides], check=True)
    arms = args.arms.split(",")
    primed = prime_once(arms[0], args, args.overrides, work) if args.prime > 0 and args.prime_once else None
    for name in arms:
        rec = run_arm(name, args, args.overrides, work, primed)
        emit({"bench": "first_minutes", "device": device, "config": args.config, "extra_overrides": args.overrides, **rec}, args.out)


if __name__ == "__main__":
    main()
