"""omnibyte doctor [--json]"""

from __future__ import annotations

HELP = ("report what this machine offers a run: Python, torch, CUDA, Triton, mamba-ssm, causal-conv1d, data "
        "packages, and the Mamba-2 path and attention backend a run would use")


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines (default: lines)")


def run(args) -> int:
    import json

    from omnibyte.doctor import collect, report_lines

    report = collect()
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print("\n".join(report_lines(report)))
    return 0
