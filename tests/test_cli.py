"""The `omnibyte` entry point (omnibyte/cli.py)."""

from __future__ import annotations

import pytest


def test_cli_overrides_may_follow_options(capsys):
    from omnibyte.cli import build_parser, main

    assert main(["list", "serializers"]) == 0
    assert "qa" in capsys.readouterr().out
    args, extra = build_parser().parse_known_args(["train", "debug_tiny", "--quiet", "train.steps=2"])
    assert extra == ["train.steps=2"]  # what main() folds into the overrides
    with pytest.raises(SystemExit):
        main(["list", "serializers", "--bogus"])


def test_a_closed_pipe_ends_quietly():
    """`omnibyte list configs | head -1` used to end in a BrokenPipeError traceback (exit 1)."""
    import subprocess
    import sys

    res = subprocess.run(f"{sys.executable} -m omnibyte list configs | head -1", shell=True, capture_output=True,
                         text=True, env={**__import__('os').environ, "PYTHONUNBUFFERED": "1"})
    assert res.stdout.strip() and "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr


def test_version(capsys):
    import omnibyte
    from omnibyte.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"omnibyte {omnibyte.__version__}"
