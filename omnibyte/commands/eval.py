"""omnibyte eval <run-dir> [split] [key=value ...] [--checkpoint best|latest|STEP]"""

from __future__ import annotations

HELP = "score a trained run: bits per byte (overall, per modality), per-token losses (h5), task metrics"


def add_arguments(p) -> None:
    from ._run_split import add_run_split_arguments

    add_run_split_arguments(p, "eval.max_samples=0 task.root=/data/CLEVR")
    p.add_argument("--quiet", action="store_true", help="print only the results file")


def run(args) -> int:
    import json
    import logging

    from omnibyte.logging import setup_console_logging
    from omnibyte.run import evaluate_run, load_run

    from ._plugins import import_chosen_plugins
    from ._run_split import split_and_overrides

    import_chosen_plugins(args)

    setup_console_logging(logging.WARNING if args.quiet else logging.INFO)
    split, overrides = split_and_overrides(args)
    loaded = load_run(args.run_dir, args.checkpoint, device=args.device, overrides=overrides,
                      trust_plugins=args.trust_plugins)
    logging.getLogger("omnibyte.eval").info("evaluating %s checkpoint %s (step %d) on %s", loaded.which,
                                            loaded.checkpoint, loaded.step, split or loaded.config.eval.split)
    results = evaluate_run(loaded, split, progress=not args.quiet)
    if args.quiet:
        print(results["results_file"])
    else:
        print(json.dumps(results, indent=1, default=str))
    return 0
