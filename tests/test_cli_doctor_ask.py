"""`omnibyte doctor` (what this machine offers a run) and `omnibyte ask` (a VQA run asked about one image)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from run_overrides import QUICK, TINY_MBLM

from omnibyte.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"
IMAGE = FIXTURE / "images" / "val" / "CLEVR_val_000000.png"


# --- doctor ---------------------------------------------------------------------------------------------


def test_doctor_reports_torch_and_the_paths_a_run_would_take(capsys):
    import torch

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch: {torch.__version__}" in out and "python: " in out
    for name in ("triton", "mamba-ssm", "causal-conv1d", "pyspng", "webdataset", "h5py", "wandb"):
        assert re.search(rf"^{re.escape(name)}( \(optional\))?: ", out, re.M), name
    assert "Traceback" not in out
    if not torch.cuda.is_available():
        assert "CUDA: unavailable (" in out
        assert "Mamba-2 path: torch twin" in out
        assert "FlexAttention not used (no CUDA)" in out
    assert "SDPA" in out and "matrix-product attention for sequences of at most 32 positions" in out


def test_doctor_json_parses(capsys):
    import torch

    assert main(["doctor", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["torch"]["version"] == torch.__version__ and r["cuda"]["available"] == torch.cuda.is_available()
    assert r["mamba2"]["path"] in ("torch twin", "triton unfused", "triton fused")
    assert {"triton", "mamba-ssm", "causal-conv1d", "pyspng", "webdataset", "h5py", "wandb"} <= set(r["packages"])
    assert r["attention"]["short_max"] == 32


def test_doctor_says_not_installed_for_a_missing_package():
    from omnibyte.doctor import _package_line, package_status

    s = package_status("omnibyte_no_such_module_xyz", "omnibyte-no-such-dist")
    assert s["installed"] is False and _package_line("x", s) == "x: not installed"
    s = package_status("omnibyte_no_such_module_xyz", "omnibyte-no-such-dist", optional=True)
    assert _package_line("x", s) == "x (optional): not installed"


# --- ask ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("ask_runs")
    assert main(["train", "clevr_vqa_png", f"task.root={FIXTURE}", "serializer.image.size=[16,12]",
                 "model.stages.0.length=128", "data.seq_len=1024", *TINY_MBLM, *QUICK, f"out_dir={runs}",
                 "--quiet"]) == 0
    return runs / "clevr_vqa_png"


def _answers(run_dir: Path) -> tuple[str, ...]:
    import yaml

    return tuple(yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["task"]["answers"])


def test_ask_ranks_the_closed_set_and_generates(vqa_run, capsys):
    answers = _answers(vqa_run)
    capsys.readouterr()
    assert main(["ask", str(vqa_run), str(IMAGE), "What color is the cube?", "--top", "0"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+\d+\. (.+?)\s+([01]\.\d{4})$", out, re.M)
    assert [a for a, _ in rows] and {a for a, _ in rows} == set(answers)  # every candidate, from the vocabulary
    probs = [float(p) for _, p in rows]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3 * len(probs))
    assert re.search(r"^generated \(greedy\): \S", out, re.M)
    assert "question: What color is the cube?" in out

    assert main(["ask", str(vqa_run), str(IMAGE), "What color is the cube?"]) == 0  # default: top 5
    assert len(re.findall(r"^\s+\d+\. ", capsys.readouterr().out, re.M)) == min(5, len(answers))


def test_ask_json_has_every_answer_with_probabilities(vqa_run, capsys):
    capsys.readouterr()
    assert main(["ask", str(vqa_run), str(IMAGE), "Is there a cube?", "--json", "--checkpoint", "latest"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [a["answer"] for a in r["answers"]] and {a["answer"] for a in r["answers"]} == set(_answers(vqa_run))
    assert sum(a["prob"] for a in r["answers"]) == pytest.approx(1.0, abs=1e-9)
    assert isinstance(r["generated"], str) and r["which"] == "latest" and r["step"] == 3


def _refused(capsys, argv: list[str], *words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("omnibyte ask: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def test_ask_refuses_a_missing_or_unreadable_image(vqa_run, tmp_path, capsys):
    _refused(capsys, ["ask", str(vqa_run), str(tmp_path / "nope.png"), "What color?"], "nope.png", "no such image")
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a PNG file at all")
    _refused(capsys, ["ask", str(vqa_run), str(bad), "What color?"], "not_an_image.png", "refuses this image")
    _refused(capsys, ["ask", str(vqa_run), str(tmp_path), "What color?"], "is a directory")


def test_ask_refuses_a_run_that_is_not_vqa(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "debug_tiny", "train.steps=1", "train.eval_every=0", "train.ckpt_every=0",
                 "train.progress=false", "eval.report=false", "eval.max_samples=1", f"out_dir={runs}",
                 "--quiet"]) == 0
    _refused(capsys, ["ask", str(runs / "debug_tiny"), str(IMAGE), "What color?"], "not a VQA run")
