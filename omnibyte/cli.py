"""``omnibyte <verb> ...``: one entry point; each verb lives in ``omnibyte/commands/<verb>.py``.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules import heavy dependencies (torch, PIL) inside ``run`` so that ``omnibyte --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

VERBS = ("train", "eval", "generate", "inspect", "prepare", "list", "plot", "export", "config", "doctor", "ask",
         "robustness", "merge")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config_doc import HelpFormatter  # every verb's --help shows its defaults

    parser = argparse.ArgumentParser(prog="omnibyte", description="Multimodal byte-level language modelling.")
    parser.add_argument("--version", action="version", version=f"omnibyte {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="verb")
    for verb in VERBS:
        try:
            mod = importlib.import_module(f"omnibyte.commands.{verb}")
        except ModuleNotFoundError as e:
            if e.name != f"omnibyte.commands.{verb}":
                raise
            continue
        p = sub.add_parser(verb, help=mod.HELP, description=mod.HELP, formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `omnibyte train cfg --quiet a=b`: key=value overrides may follow options
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .errors import DataError, SerializationError
    from .lock import RunLockedError
    from .registry import RegistryError

    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `omnibyte ... | head`: the reader left; nothing to report
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush stays quiet
        except OSError:
            pass
        return 0
    except (ConfigError, RegistryError, SerializationError, DataError, FileNotFoundError, CheckpointError,
            RunLockedError) as e:
        print(f"omnibyte {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"omnibyte {args.verb}: error: no space left on device while writing {e.filename or 'a file'}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
