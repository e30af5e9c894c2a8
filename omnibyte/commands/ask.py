"""omnibyte ask <run-dir> <image> <question> [--top N] [--checkpoint best|latest|STEP] [--json]"""

from __future__ import annotations

HELP = "ask a trained VQA run a question about an image: ranked answers with probabilities, and the generated one"


def add_arguments(p) -> None:
    from ._plugins import add_plugin_arguments

    p.add_argument("run_dir")
    p.add_argument("image", help="an image file (e.g. a PNG), serialized by the run's own serializer")
    p.add_argument("question", help='e.g. "What color is the cube?"')
    p.add_argument("--top", type=int, default=5, help="ranked answers to print (0: the whole closed set; default: 5)")
    p.add_argument("--max-new-bytes", type=int, default=0,
                   help="greedy answer length limit (default 0: the longest answer of the closed set + 8)")
    p.add_argument("--no-generate", action="store_true", help="rank the closed set only (default: also generate)")
    p.add_argument("--checkpoint", default=None, metavar="best|latest|STEP",
                   help="default: the run's eval.checkpoint (the best by its validation metric, else the latest)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, the run's device)")
    add_plugin_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (every answer) instead of lines")


def run(args) -> int:
    import json

    from omnibyte.ask import answer_lines, ask, read_image
    from omnibyte.config import ConfigError
    from omnibyte.run import load_run

    from ._plugins import import_chosen_plugins

    if args.top < 0:
        raise ConfigError(f"--top must be >= 0 (0: all answers), got {args.top}")
    if args.max_new_bytes < 0:
        raise ConfigError(f"--max-new-bytes must be >= 0 (0: from the answers), got {args.max_new_bytes}")
    image = read_image(args.image)  # before loading the run: a wrong path fails at once
    import_chosen_plugins(args)
    loaded = load_run(args.run_dir, args.checkpoint, device=args.device, trust_plugins=args.trust_plugins)
    result = ask(loaded, image, args.question, image_name=args.image, max_new_bytes=args.max_new_bytes,
                 generate=not args.no_generate)
    if args.json:
        print(json.dumps({"run": str(loaded.run_dir), "checkpoint": str(loaded.checkpoint), "which": loaded.which,
                          "step": loaded.step, "image": args.image, **result}, indent=1))
    else:
        print("\n".join(answer_lines(loaded, result, args.top)))
    return 0
