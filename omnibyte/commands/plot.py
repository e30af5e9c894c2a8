"""omnibyte plot <run-dir> [--out png]"""

from __future__ import annotations

HELP = "draw a run's loss and bits-per-byte curves (train and eval, per modality) as a PNG"


def add_arguments(p) -> None:
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default <run-dir>/curves.png)")


def run(args) -> int:
    from omnibyte.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
