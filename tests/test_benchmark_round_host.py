"""benchmarks/round_host.py times the speculative round loop's host work against an instant fake target: its row
counts the rounds the loop ran and the loop reproduces the text (the fake target's greedy continuation)."""

from __future__ import annotations

import json

import pytest

from tests.model_helpers import load_benchmark


@pytest.fixture
def bench(monkeypatch):
    return load_benchmark(monkeypatch, "round_host")


def test_round_host_row(bench, tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"the cat sat on the mat; " * 40)  # repeats: lookup drafts are kept
    out = tmp_path / "rows.jsonl"
    bench.main(["--text", str(text), "--context", "100", "--new", "200", "--repeat", "1", "--out", str(out)])
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["bench"] == "round_host" and row["rounds"] > 0 and row["us_per_round"] > 0
    assert row["acceptance"] > 0.5  # the text repeats: the lookup drafter copies it right
    with pytest.raises(SystemExit, match="fewer than"):
        bench.main(["--text", str(text), "--context", "900", "--new", "200"])
