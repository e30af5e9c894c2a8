"""Steps a CLEVR byte run reaches in its first minutes, per batch-padding mode (issue: shape-stable batches).

Each arm is a real ``omnibyte train`` process (the same config and overrides; only ``data.pad_to`` and
``train.warm_shapes`` differ), started with a cold Triton cache of its own (a fresh ``TRITON_CACHE_DIR``), so
every arm pays the JIT compiles and autotuning a user's first run pays. The data are generated (or read)
once before the first arm. After ``--seconds`` of wall time (process start included) the arm is stopped and
the last step in its ``metrics.jsonl`` (``train.log_every=1``) is its result. One JSON line per arm.

    python benchmarks/first_minutes.py --config clevr_vqa_pixels --seconds 180 --out bench.jsonl
    python benchmarks/first_minutes.py --config clevr_vqa_pixels --seconds 20 preset=cpu   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit

ARMS = {
    "longest": ["data.pad_to=longest", "train.warm_shapes=false"],
    "buckets": ["data.pad_to=buckets", "train.warm_shapes=auto"],
}


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the arm was stopped
            continue
        if rec.get("split") == "train":
            steps.append(int(rec["step"]))
    return max(steps, default=0)


def run_arm(name: str, args, overrides: list[str], work: Path) -> dict:
    env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix=f"triton-{name}-", dir=work),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "omnibyte", "train", args.config, f"out_dir={work / 'runs'}", f"run_name={name}",
           "train.log_every=1", f"train.steps={args.steps}", "train.eval_every=0", "train.ckpt_every=0",
           "eval.report=false", "--quiet", *overrides, *ARMS[name]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        proc.wait(timeout=args.seconds)
        finished = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = False
    secs = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if finished and proc.returncode != 0:
        raise SystemExit(f"arm {name} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return {"arm": name, "overrides": ARMS[name], "seconds": round(secs, 1), "steps": last_step(work / "runs" / name),
            "finished": finished}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="clevr_vqa_pixels")
    p.add_argument("--seconds", type=float, default=180.0, help="wall time per arm (process start included)")
    p.add_argument("--steps", type=int, default=100000, help="train.steps (large: the clock stops the arm)")
    p.add_argument("--arms", default="longest,buckets")
    p.add_argument("--work", default=None, help="folder for the runs and Triton caches (default: a temp folder)")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every arm")
    args = p.parse_args()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="first_minutes-"))
    work.mkdir(parents=True, exist_ok=True)
    # the data once, before any arm is timed (a generated CLEVR set is cached under $OMNIBYTE_CACHE)
    subprocess.run([sys.executable, "-m", "omnibyte", "train", args.config, f"out_dir={work / 'runs'}",
                    "run_name=data", "--dry-run", "--quiet", *args.overrides], check=True)
    for name in args.arms.split(","):
        rec = run_arm(name, args, args.overrides, work)
        emit({"bench": "first_minutes", "device": device, "config": args.config, "extra_overrides": args.overrides, **rec}, args.out)


if __name__ == "__main__":
    main()
