"""The ``--plugin`` / ``--trust-plugins`` options of verbs that open run directories."""

from __future__ import annotations


def add_plugin_arguments(p) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first (registers its serializers/tasks/models); repeatable")
    p.add_argument("--trust-plugins", action="store_true",
                   help="import the plugins a run directory's config names (runs their code: only for runs "
                        "you trust; default: refuse and say which)")


def import_chosen_plugins(args) -> None:
    """Import the modules named with ``--plugin`` (the user's own choice of code)."""
    from omnibyte.runconfig import open_plugins

    open_plugins(list(args.plugin), "--plugin", trust=True)
