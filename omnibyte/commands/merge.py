"""omnibyte merge <run-dir> [--checkpoint best|latest|STEP|PATH] [--out DIR]"""

from __future__ import annotations

HELP = ("write a Multimodal Pathway run (train.pathway_from) as an ordinary run of its base architecture, "
        "weights merged (W + lambda W')")


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a pathway run directory (runs/<run_name>)")
    p.add_argument("--checkpoint", default=None, metavar="best|latest|STEP|PATH",
                   help="default: the best checkpoint by the validation metric, else the latest")
    p.add_argument("--out", default=None, help="the merged run directory (default <run-dir>_merged)")


def run(args) -> int:
    import logging

    from omnibyte.logging import setup_console_logging
    from omnibyte.merge import merge_run

    setup_console_logging(logging.INFO)
    out, source = merge_run(args.run_dir, args.checkpoint, args.out)
    print(f"merged {source['layers']} pathway layers of {source['checkpoint']} (step {source['step']}) into {out}")
    return 0
