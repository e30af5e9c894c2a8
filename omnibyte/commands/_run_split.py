"""The ``<run-dir> [split] [key=value ...]`` arguments (and checkpoint, device, plugins) of verbs that score a
trained run on one split."""

from __future__ import annotations


def add_run_split_arguments(p, example: str) -> None:
    """``run_dir [split] [key=value ...] --checkpoint --device --plugin --trust-plugins``."""
    from ._plugins import add_plugin_arguments

    p.add_argument("run_dir", help="a run directory (runs/<run_name>)")
    p.add_argument("split", nargs="?", default=None,
                   help="default: the run's eval.split (a validation split); name `test` to score the test split")
    p.add_argument("overrides", nargs="*", help=f"evaluation settings, e.g. {example}")
    p.add_argument("--checkpoint", default=None, metavar="best|latest|STEP",
                   help="default: the run's eval.checkpoint (auto: the best checkpoint by its validation "
                        "metric, else the latest)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="where the model runs (auto: the run's train.device)")
    add_plugin_arguments(p)


def split_and_overrides(args) -> tuple[str | None, list[str]]:
    """``(split, overrides)``: ``omnibyte eval run a.b=c`` names no split, its first word is an override."""
    overrides, split = list(args.overrides), args.split
    if split is not None and "=" in split:
        overrides.insert(0, split)
        split = None
    return split, overrides
