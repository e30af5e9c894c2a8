"""benchmarks/generate.py measures decoding, not set-up: its CPU dry run (the static step eagerly) runs every
row kind, and each row says whether a graph capture or a stepper build fell inside the timed span
(``capture_in_timing``), false after the untimed warm-up (issue 17: the graphed rows had timed capture)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from omnibyte.model.inference import graphs
from omnibyte.model.inference import kernels as decode_kernels
from omnibyte.model.inference.decoder import Decoder
from omnibyte.model.inference.graph_verify import StaticVerifier
from omnibyte.model.inference.graphs import GraphStepper
from tests.model_helpers import load_benchmark, one_thread  # noqa: F401 - one_thread: an autouse fixture


@pytest.fixture
def bench(monkeypatch):
    for obj, attr in ((Decoder, "static_step_off_cuda"), (GraphStepper, "fuse_linears"), (decode_kernels, "use_pdl"),
                      (graphs, "FUSE_MAX_ROWS"), (GraphStepper, "ssm_kernels"), (StaticVerifier, "kernel_segments")):
        monkeypatch.setattr(obj, attr, getattr(obj, attr))  # the benchmark sets them: restored after the test
    return load_benchmark(monkeypatch, "generate")


def _no_nan(name):
    raise ValueError(f"not JSON: {name}")


def _rows(bench, tmp_path, *argv) -> list[dict]:
    out = tmp_path / "rows.jsonl"
    bench.main([*argv, "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--contexts", "40",
                "--out", str(out)])
    return [json.loads(line, parse_constant=_no_nan) for line in out.read_text().splitlines()]  # strict JSON


def _check_stats(row: dict) -> None:
    """The speculative row's counts add up to the bytes made, and each ratio is its counts' (None over zero)."""
    assert row["plain_steps"] + row["passes"] + row["kept"] + 1 == row["new_bytes"]
    assert row["acceptance"] == (round(row["kept"] / row["drafted"], 4) if row["drafted"] else None)
    assert row["bytes_per_pass"] == (round((row["kept"] + row["passes"]) / row["passes"], 2) if row["passes"]
                                     else None)


def _check_decode(rows: list[dict]) -> None:
    """Every row times decoding without the prefill too (its call minus its 1-byte call), and the speculative
    row's decode speed-up is its decode rate over the best plain row's."""
    dec = [r["decode_bytes_per_s"] for r in rows]
    assert all(d is not None and d > 0 for d in dec)
    assert rows[-1]["decode_speedup_vs_best_plain"] == pytest.approx(dec[-1] / max(dec[:-1]), abs=1e-3)


def test_speculative_rows_time_decoding_only(bench, tmp_path):
    rows = _rows(bench, tmp_path, "--speculative", "--draft", "lookup", "--graph", "--new", "20", "--repeat", "1")
    assert [r["impl"] for r in rows] == ["plain", "plain_graph", "speculative"]
    assert [r["capture_in_timing"] for r in rows] == [False, False, False]
    assert rows[1]["same_output_as_eager"] and rows[1]["cuda_graphs"] is False
    assert rows[2]["draft"] == "lookup" and rows[2]["draft_prefill_s"] is None
    _check_stats(rows[2])
    _check_decode(rows)
    # without the warm-up the graphed row's first call builds its stepper inside the timing, and says so
    (tmp_path / "rows.jsonl").unlink()
    rows = _rows(bench, tmp_path, "--speculative", "--draft", "lookup", "--graph", "--new", "20", "--repeat", "1",
                 "--warm", "0")
    assert [r["capture_in_timing"] for r in rows] == [False, True, False]


def test_speculative_rows_with_static_verification(bench, tmp_path):
    rows = _rows(bench, tmp_path, "--speculative", "--draft", "lookup", "--graph", "--graph-verify", "--new", "20",
                 "--repeat", "1")
    assert [r["impl"] for r in rows] == ["plain", "plain_graph", "speculative"]
    assert all(r["graph_verify"] for r in rows) and rows[2]["same_output_as_plain"]
    _check_decode(rows)
    assert rows[2]["same_output_as_reference"] and rows[2]["first_difference"] is None
    assert [r["capture_in_timing"] for r in rows] == [False, False, False]
    assert not any(r["verify_compiled"] for r in rows)  # no --compile
    (tmp_path / "rows.jsonl").unlink()
    rows = _rows(bench, tmp_path, "--speculative", "--draft", "lookup", "--graph", "--graph-verify", "--aligned",
                 "--new", "20", "--repeat", "1")
    assert rows[2]["graph_verify"] == "aligned" and rows[2]["same_output_as_reference"]
    _check_stats(rows[2])
    with pytest.raises(SystemExit):  # --aligned shapes the static passes only
        _rows(bench, tmp_path, "--speculative", "--draft", "lookup", "--aligned")
    (tmp_path / "rows.jsonl").unlink(missing_ok=True)
    prof = _rows(bench, tmp_path, "--speculative", "--draft", "lookup", "--graph", "--graph-verify", "--new", "20",
                 "--repeat", "1", "--profile", "3")[-1]
    assert prof["impl"] == "speculative_profile" and prof["wall_ms"] > 0
    assert prof["rounds_and_steps"] >= 1 and prof["wall_ms_per_round"] > 0
    assert prof["kernels_per_round"] is None  # no device kernels on CPU


def test_speculative_row_without_a_pass_has_null_ratios(bench, tmp_path):
    """No verification pass (one new byte: the prefill's): acceptance and bytes per pass are null, not NaN (not
    JSON) and not a figure over max(passes, 1) (it said 64 bytes per pass for 64 plain steps); with passes, the
    bytes per pass are the passes' own (self-drafting: 2 passes of 8 kept + 1, and a last plain step)."""
    rows = _rows(bench, tmp_path, "--speculative", "--draft", "lookup", "--graph", "--graph-verify", "--new", "1",
                 "--repeat", "1")
    spec = rows[-1]
    assert spec["impl"] == "speculative" and spec["passes"] == spec["drafted"] == 0
    assert spec["acceptance"] is None and spec["bytes_per_pass"] is None and spec["plain_steps"] == 0
    assert all(r["decode_bytes_per_s"] is None for r in rows)  # one byte: no decoding to time, not a figure
    assert spec["decode_speedup_vs_best_plain"] is None
    _check_stats(spec)
    (tmp_path / "rows.jsonl").unlink()
    spec = _rows(bench, tmp_path, "--speculative", "--draft", "self", "--new", "20", "--repeat", "1")[-1]
    assert (spec["passes"], spec["kept"], spec["plain_steps"], spec["bytes_per_pass"]) == (2, 16, 1, 9.0)
    _check_stats(spec)
    with pytest.raises(SystemExit):
        _rows(bench, tmp_path, "--speculative", "--draft", "lookup", "--new", "0")
    out = tmp_path / "nonfinite.jsonl"  # every benchmark's rows (_common.emit): strict JSON, the gap named
    bench.emit({"bench": "x", "ratio": float("nan"), "rows": [{"bpb": 1.0}, {"bpb": float("inf")}]}, str(out))
    row = json.loads(out.read_text(), parse_constant=_no_nan)
    assert row["ratio"] is None and row["rows"] == [{"bpb": 1.0}, {"bpb": None}]
    assert row["nonfinite"] == ["ratio", "rows[1].bpb"]


def test_the_drafters_prefill_is_set_up_not_decoding(bench, tmp_path, monkeypatch):
    """A 1-byte speculative call drafts nothing, so it never prefills its drafter: subtracting it left a model
    drafter's whole prefill in the speculative row's decoding time (0.17 s of a 0.18-s "decode" at 64 KiB)."""
    import time

    from omnibyte.model.inference import speculative

    real = speculative._CachedDrafter.reset  # the model drafters' (self, --draft RUN) prefill

    def slow_reset(self, ctx):
        time.sleep(0.5)
        return real(self, ctx)

    monkeypatch.setattr(speculative._CachedDrafter, "reset", slow_reset)
    spec = _rows(bench, tmp_path, "--speculative", "--draft", "self", "--new", "20", "--repeat", "1")[-1]
    assert spec["total_s"] > 0.5  # the call did prefill the drafter
    assert 19 / spec["decode_bytes_per_s"] < 0.45  # ... and its decoding time does not hold that prefill


def test_per_context_rows_say_where_capture_fell(bench, tmp_path):
    rows = _rows(bench, tmp_path, "--graph", "--new", "4", "--warm", "9")
    assert rows[0]["bench"] == "generate" and rows[0]["capture_in_timing"] is False
    assert rows[0]["cuda_graphs"] is False


def test_a_snapshot_inside_another_checkout_is_not_recorded_as_its_commit(tmp_path, monkeypatch):
    """The device runs a snapshot folder of the tree inside the carried checkout: git answered that checkout's HEAD
    (and -dirty) for code that was another commit. Only a checkout whose root is the benchmarks' tree counts; else
    the rows take OMNIBYTE_COMMIT."""
    import shutil
    import subprocess

    outer = tmp_path / "outer"
    (outer / "snap" / "benchmarks").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    (outer / "f").write_text("x")
    subprocess.run(["git", "-C", str(outer), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
                   check=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "benchmarks" / "_common.py", outer / "snap" / "benchmarks")
    spec = importlib.util.spec_from_file_location("_common_snap", outer / "snap" / "benchmarks" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.git_commit() == "unknown"
    monkeypatch.setenv("OMNIBYTE_COMMIT", "abc1234")
    mod.emit({"bench": "x"}, str(tmp_path / "rows.jsonl"))
    assert json.loads((tmp_path / "rows.jsonl").read_text())["commit"] == "abc1234"


def test_speculative_rows_are_written_before_the_profile(bench, tmp_path, monkeypatch):
    """A profile that never ends (a device call's time limit) must not take the timings with it: the rows are in
    the file before profiling starts. The eager decoder is timed in the first --eager-repeat rounds only."""
    def cut(*a, **k):
        raise KeyboardInterrupt("the call's time limit")

    monkeypatch.setattr(bench, "profile_speculative", cut)
    with pytest.raises(KeyboardInterrupt):
        _rows(bench, tmp_path, "--speculative", "--draft", "lookup", "--graph", "--new", "20", "--repeat", "2",
              "--eager-repeat", "1", "--profile", "3")
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["plain", "plain_graph", "speculative"]
    assert all(r["repeat"] == 2 and r["eager_repeat"] == 1 for r in rows)
    _check_decode(rows)

