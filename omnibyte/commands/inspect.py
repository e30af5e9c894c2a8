"""omnibyte inspect --serializer <name or YAML> [key=value ...] <file or sample JSON> [--plot out.png]"""

from __future__ import annotations

HELP = "serialize one sample and show the stream (length, spans, hex/ASCII head; --plot draws it)"


def add_arguments(p) -> None:
    p.add_argument("--serializer", "-s", required=True,
                   help="a registered serializer name (utf8, pixels, png, jpeg, qa), a run config (its "
                        "'serializer:' node is used) or a YAML file holding a serializer node with 'name:'")
    p.add_argument("args", nargs="+", metavar="key=value ... FILE",
                   help="dotted overrides of the serializer config (e.g. image.method=reencode "
                        "image.size=[62,41]), then an image file, a .txt file or a sample .json")
    p.add_argument("--plot", metavar="OUT.png", help="also draw the stream to this PNG")
    p.add_argument("--head", type=int, default=64, help="tokens in the hex/ASCII head (default 64)")


def resolve_serializer_node(spec: str, overrides: list[str]) -> dict:
    """``spec`` -> a serializer config dict (name + fields) with the overrides applied."""
    from pathlib import Path

    from omnibyte.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
    from omnibyte.registry import SERIALIZERS

    if spec in SERIALIZERS and not Path(spec).is_file():
        node: object = {"name": spec}
    else:
        try:
            data = load_yaml(spec)
        except ConfigError as e:
            import difflib

            close = difflib.get_close_matches(spec, SERIALIZERS.names(), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"--serializer {spec!r}: {hint}not a registered serializer "
                              f"({', '.join(SERIALIZERS.names())}) and not a config file ({e})") from None
        if "serializer" in data:
            node = data["serializer"]
        elif "name" in data:
            node = data
        else:
            raise ConfigError(f"{spec}: no 'serializer:' node and no 'name:' key")
    if isinstance(node, str):
        node = {"name": node}
    if not isinstance(node, dict):
        raise ConfigError(f"{spec}: the serializer node must be a mapping or a name, got {type(node).__name__}")
    if "name" not in node:
        raise ConfigError(f"{spec}: the serializer node has no 'name:'")
    # resolve every default first, so that overrides of nested nodes (image.size=...) find their 'name:'
    full = to_dict(from_dict(SERIALIZERS.get(node["name"]).Config, node, path="serializer"))
    return apply_overrides(full, overrides)


def run(args) -> int:
    from pathlib import Path

    from omnibyte.config import ConfigError
    from omnibyte.inspect import load_sample, plot, summary
    from omnibyte.registry import SERIALIZERS

    overrides = [a for a in args.args if "=" in a and not Path(a).is_file()]
    files = [a for a in args.args if a not in overrides]
    if len(files) != 1:
        raise ConfigError(f"expected exactly one input file after the overrides, got {files or 'none'}")
    node = resolve_serializer_node(args.serializer, overrides)
    serializer = SERIALIZERS.build(node)
    try:
        sample = load_sample(files[0])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    stream = serializer(sample).validate()
    print(summary(stream, serializer, head=args.head))
    if args.plot:
        out = plot(stream, serializer, args.plot)
        print(f"wrote {out}")
    return 0
