"""1 process vs 2-process DDP vs 2-process FSDP2 at the same global batch: do the loss curves agree?

    python benchmarks/engine_parity.py --steps 300 --out runs/parity     # needs 2 GPUs (or runs on CPU/gloo)

Trains ``configs/debug_tiny.yaml`` scaled up (1,024-byte rows, 4+2 transformer layers) three times:
one process with ``data.batch_size=B``; ``torchrun --nproc-per-node 2`` with DDP and then FSDP2 with
``B/2`` rows per rank. Prints one JSON line per run (final train loss over the last 50 steps, final eval
bits per byte, wall time, bytes/s) and one comparing each 2-process curve with the 1-process one. The
data differ between the runs (ranks read different shards), so the curves agree statistically, not
bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = [
    "data.seq_len=1024", "model.stages.0.length=128", "model.stages.0.width=256", "model.stages.0.layers=4",
    "model.stages.0.block.heads=8", "model.stages.1.width=128", "model.stages.1.layers=2",
    "model.stages.1.block.heads=4", "data.workers=2", "train.log_every=10", "train.eval_every=100",
    "train.ckpt_every=0", "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup=30", "train.progress=false",
]


def read(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32, help="global batch (rows)")
    ap.add_argument("--out", default="runs/parity")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--runs", default="single,ddp,fsdp2", help="which of single,ddp,fsdp2 to (re)run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    common = MODEL + [f"train.steps={args.steps}", f"out_dir={out}"]
    runs = {
        "single": [sys.executable, "-m", "omnibyte", "train", "debug_tiny", "run_name=single",
                   f"data.batch_size={args.batch}"],
    }
    for strategy in ("ddp", "fsdp2"):
        runs[strategy] = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={args.nproc}", "-m", "omnibyte", "train", "debug_tiny",
                          f"run_name={strategy}", f"parallel.strategy={strategy}",
                          f"data.batch_size={args.batch // args.nproc}"]
    results = {}
    for name, cmd in runs.items():
        if name not in args.runs.split(","):
            if (out / name / "metrics.jsonl").is_file():  # an earlier run's curve, for the comparison
                results[name] = {r["step"]: r["loss"] for r in read(out / name) if r["split"] == "train"}
            continue
        t0 = time.perf_counter()
        res = subprocess.run(cmd + common, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            print(json.dumps({"run": name, "error": res.stderr[-3000:]}))
            continue
        recs = read(out / name)
        train = [r for r in recs if r["split"] == "train"]
        evals = [r for r in recs if r["split"] != "train"]
        tail = [r["loss"] for r in train if r["step"] > args.steps - 50]
        results[name] = {r["step"]: r["loss"] for r in train}
        print(json.dumps({
            "bench": "engine_parity", "run": name, "strategy": name if name != "single" else "none",
            "procs": 1 if name == "single" else args.nproc, "global_batch": args.batch, "seq_len": 1024,
            "steps": args.steps, "final_train_loss": sum(tail) / len(tail), "final_eval_bpb": evals[-1]["bpb"],
            "eval_bpb": {r["step"]: round(r["bpb"], 4) for r in evals}, "wall_s": round(wall, 1),
            "bytes_per_s_last": train[-1]["bytes_per_s"],
        }), flush=True)
    if "single" in results:
        ref = results["single"]
        skip = args.steps // 6  # compare after the first sixth (the steepest part of the curve)
        for name in ("ddp", "fsdp2"):
            if name not in results:
                continue
            steps = [s for s in ref if s in results[name] and s > skip]
            diffs = [abs(results[name][s] - ref[s]) for s in steps]
            rel = [d / ref[s] for d, s in zip(diffs, steps)]
            print(json.dumps({"bench": "engine_parity", "compare": f"{name}_vs_single", "after_step": skip,
                              "max_abs_loss_diff": max(diffs), "mean_abs_loss_diff": sum(diffs) / len(diffs),
                              "max_rel_loss_diff": max(rel)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
