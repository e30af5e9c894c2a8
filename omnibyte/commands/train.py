"""omnibyte train <config> [key=value ...] [--device D] [--quiet] [--dry-run]"""

from __future__ import annotations

from ._plugins import add_plugin_arguments, import_chosen_plugins

HELP = "train (or resume) a run from a YAML config; torchrun --nproc-per-node N -m omnibyte train ... for DDP/FSDP2"


def add_arguments(p) -> None:

    p.add_argument("config", help="a YAML path, a name in configs/ (e.g. debug_tiny), or a run directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 model.stages.0.layers=4 "
                                                "(`omnibyte config keys <config>` lists them)")
    p.add_argument("--device", default=None, metavar="auto|cpu|cuda|cuda:N",
                   help="same as train.device=... (default: the config's train.device)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, warnings only; the start-up summary and loss lines stay")
    p.add_argument("--dry-run", action="store_true",
                   help="build the config, components and eval data, print the start-up summary and exit; "
                        "writes nothing (no run directory)")
    add_plugin_arguments(p)


def run(args) -> int:
    import logging
    import os
    import sys

    # Triton keeps autotuning results on disk (mamba-ssm's kernels autotune once per shape): a resumed or
    # repeated run skips it. Read when the kernels are defined, so set before anything imports them.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

    from omnibyte.logging import setup_console_logging
    from omnibyte.runconfig import load_run_config
    from omnibyte.train import TrainingError, train

    setup_console_logging(logging.WARNING if args.quiet else logging.INFO)
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else []) \
        + (["train.progress=false"] if args.quiet else [])
    import_chosen_plugins(args)
    cfg = load_run_config(args.config, overrides, trust_plugins=args.trust_plugins)
    try:
        run_dir = train(cfg, dry_run=args.dry_run)
    except TrainingError as e:
        print(f"omnibyte train: failed: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"dry run: nothing written; {run_dir} is the run directory a real start would use")
        return 0
    print(run_dir)
    return 0
