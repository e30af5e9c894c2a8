"""omnibyte export <run-dir> [--checkpoint best|latest|N] [--out file.safetensors]"""

from __future__ import annotations

HELP = "write a trained run's weights as one safetensors file (also from the sharded checkpoints of DDP / FSDP2 runs)"


def add_arguments(p) -> None:
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default=None,
                   help="best | latest | a step (default: the best by the validation metric, else the latest)")
    p.add_argument("--out", default=None, help="output file (default <run-dir>/export/step_<N>.safetensors)")


def run(args) -> int:
    from omnibyte.export import export_weights

    path, step = export_weights(args.run_dir, args.checkpoint, args.out)
    print(f"step {step}: {path}")
    return 0
