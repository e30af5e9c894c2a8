"""benchmarks/verify_pass.py: the cost of one static verification round against one plain step, on CPU (eager,
tiny preset): a row per pass length, its break-even and 2x byte counts being the measured ratio."""

from __future__ import annotations

import json

import pytest

from omnibyte.model.inference.graph_verify import StaticVerifier
from tests.model_helpers import load_benchmark, one_thread  # noqa: F401 - one_thread: an autouse fixture


def test_verify_pass_rows_on_cpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(StaticVerifier, "kernel_segments", StaticVerifier.kernel_segments)  # the benchmark sets it
    bench = load_benchmark(monkeypatch, "verify_pass")
    out = tmp_path / "rows.jsonl"
    bench.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--context", "40", "--T", "3,5",
                "--reps", "4", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["T"], r["segments"]) for r in rows] == [(3, "torch"), (5, "torch")]  # no kernels on CPU: said so
    assert "no decode kernels on cpu" in capsys.readouterr().out
    for r in rows:
        assert r["step_ms"] > 0 and r["round_ms"] > 0 and not r["graphs"] and not r["compiled"]
        assert r["break_even_bytes"] == pytest.approx(r["round_ms"] / r["step_ms"], rel=0.01)
        assert r["bytes_for_2x"] == pytest.approx(2 * r["break_even_bytes"], rel=0.01, abs=0.02)  # each rounded to 0.01
    with pytest.raises(SystemExit):
        bench.main(["--segments", "triton"])
