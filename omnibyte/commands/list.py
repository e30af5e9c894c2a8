"""omnibyte list serializers|tasks|stages|models|configs"""

from __future__ import annotations

HELP = "list registered serializers, tasks, stages (blocks), models, or shipped configs"


def add_arguments(p) -> None:
    p.add_argument("what", choices=["serializers", "tasks", "stages", "models", "configs"])
    p.add_argument("pattern", nargs="?", default="*", help="glob filter, e.g. 'mamba*'")


def run(args) -> int:
    if args.what == "configs":
        import fnmatch

        from omnibyte.config import configs_dir

        for p in sorted(configs_dir().glob("*.yaml")):
            if fnmatch.fnmatchcase(p.stem, args.pattern):
                print(p.stem)
        return 0
    from omnibyte.registry import REGISTRIES

    reg = REGISTRIES[args.what]
    for name in reg.names(args.pattern):
        cls = reg.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:<20} {doc[0] if doc else ''}")
    return 0
