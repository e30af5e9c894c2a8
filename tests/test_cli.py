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
