"""omnibyte robustness <run-dir> [split] [key=value ...] [--corruptions ...] [--seed N] [--limit N] [--out FILE]
[--plot [FILE]]"""

from __future__ import annotations

HELP = "score a trained run on clean and corrupted copies of its eval split (text, image files, image bytes)"


def add_arguments(p) -> None:
    from ._run_split import add_run_split_arguments

    add_run_split_arguments(p, "task.root=/data/pg19 task.eval_stride=512")
    p.add_argument("--corruptions", nargs="+", default=None, metavar="NAME[:VALUE]",
                   help="e.g. drop:0.05 uppercase:0.3 antspeak random_case image_flip:0.001 jpeg:20 noise:8 "
                        "(default: every corruption that applies to the run; text ones at p = 0.05 and 0.3, image-byte "
                        "ones at 0.001 and 0.01, jpeg:30, jpeg:10, noise:0, noise:16)")
    p.add_argument("--seed", type=int, default=0, help="corruption seed (with each sample id, or its image file for image corruptions: the draws)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score N samples spread over the split, as eval.max_samples (default: the run's eval.max_samples; 0: all)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the JSON table (default: <run>/eval/robustness_<split>_<step>_seed<S>_n<N>.json; "
                        "one holding another corruption set is not replaced: the call is refused)")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="FILE",
                   help="also draw the table as a PNG (default file: the JSON's path with .png)")
    p.add_argument("--quiet", action="store_true", help="print only the table")


def run(args) -> int:
    import logging
    from pathlib import Path

    from omnibyte.config import ConfigError
    from omnibyte.logging import setup_console_logging
    from omnibyte.robustness.evaluate import plan_for, run_robustness
    from omnibyte.robustness.report import plot, table_lines
    from omnibyte.run import load_run

    from ._plugins import import_chosen_plugins
    from ._run_split import split_and_overrides

    import_chosen_plugins(args)
    setup_console_logging(logging.WARNING if args.quiet else logging.INFO)
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit must be >= 0 (0: the whole split), got {args.limit}")
    split, overrides = split_and_overrides(args)
    loaded = load_run(args.run_dir, args.checkpoint, device=args.device, overrides=overrides,
                      trust_plugins=args.trust_plugins)
    plan_for(loaded, args.corruptions)  # refuse bad corruptions before any scoring
    log = logging.getLogger("omnibyte.robustness")
    log.info("robustness of %s checkpoint %s (step %d) on %s", loaded.which, loaded.checkpoint, loaded.step,
             split or loaded.config.eval.split)
    result = run_robustness(loaded, split, corruptions=args.corruptions, seed=args.seed, limit=args.limit,
                            out=args.out, progress=not args.quiet, log=log)
    print("\n".join(table_lines(result)))
    print(f"results: {result['results_file']}")
    if args.plot is not None:
        png = plot(result, args.plot or Path(result["results_file"]).with_suffix(".png"))
        print(f"plot: {png}")
    return 0
