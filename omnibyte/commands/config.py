"""omnibyte config show <config> [key=value ...] | omnibyte config keys <config> [prefix] [key=value ...]

``show`` prints the config as ``omnibyte train`` resolves it (``extends:``, the preset, the overrides, every
default filled in), as YAML. ``keys`` lists every key of that config with its type, its value there and its
one-line doc (the comment on the field in the code, :mod:`omnibyte.config_doc`).
"""

from __future__ import annotations

HELP = "print a resolved config (show) or list its keys with types, values and docs (keys)"

_CONFIG_HELP = "a YAML path, a name in configs/ (e.g. debug_tiny), or a run directory"


def add_arguments(p) -> None:
    from omnibyte.config_doc import HelpFormatter

    from ._plugins import add_plugin_arguments

    p.formatter_class = HelpFormatter
    sub = p.add_subparsers(dest="action", metavar="action", required=True)
    show = sub.add_parser("show", formatter_class=HelpFormatter, help="the resolved config, as YAML",
                          description="Print the config as `omnibyte train` resolves it (extends, preset, "
                                      "overrides, every default), as YAML.")
    show.add_argument("config", help=_CONFIG_HELP)
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 preset=cpu")
    add_plugin_arguments(show)
    keys = sub.add_parser("keys", formatter_class=HelpFormatter,
                          help="every key: type, value in this config, one-line doc",
                          description="List every key of the resolved config with its type, its value there "
                                      "and its one-line doc (the field's comment in the code).")
    keys.add_argument("config", help=_CONFIG_HELP)
    keys.add_argument("prefix", nargs="?", default="", help="only keys under this dotted prefix, e.g. train or "
                                                           "model.stages.0")
    keys.add_argument("overrides", nargs="*", help="dotted overrides applied first, e.g. preset=cpu")
    add_plugin_arguments(keys)


def run(args) -> int:
    import sys

    from omnibyte.config import ConfigError, dump_yaml
    from omnibyte.config_doc import config_keys, filter_keys, format_keys
    from omnibyte.runconfig import load_run_config

    from ._plugins import import_chosen_plugins

    import_chosen_plugins(args)
    overrides = list(args.overrides or [])
    prefix = getattr(args, "prefix", "")
    if args.action == "keys" and "=" in prefix:  # `config keys cfg a.b=c`: an override, no prefix
        overrides.insert(0, prefix)
        prefix = ""
    cfg = load_run_config(args.config, overrides, trust_plugins=args.trust_plugins)
    if args.action == "show":
        sys.stdout.write(dump_yaml(cfg))
        return 0
    keys = filter_keys(config_keys(cfg), prefix)
    if not keys:
        raise ConfigError(f"no key of {args.config} starts with {prefix!r} (sections: "
                          f"{', '.join(dict.fromkeys(k.key.split('.')[0] for k in config_keys(cfg)))})")
    for line in format_keys(keys):
        print(line)
    return 0
