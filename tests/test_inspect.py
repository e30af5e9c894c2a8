"""omnibyte inspect: the README's command, YAML serializer specs, overrides, file kinds, the plot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from omnibyte.cli import main

EXAMPLES = Path(__file__).parents[1] / "omnibyte" / "examples"
SAMPLE = EXAMPLES / "clevr_sample.json"


def test_readme_command_in_process(tmp_path, capsys):
    out = tmp_path / "stream.png"
    assert main(["inspect", "--serializer", "qa", str(SAMPLE), "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sample 'clevr_sample' [qa]" in text and "<BOS>" in text and "<SOM_IMAGE>" in text
    assert "answer" in text and "'cyan'" in text and "|.PNG" in text
    im = Image.open(out)
    assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 500


@pytest.mark.slow  # a subprocess or a whole run: the README command's 2-minute budget (CI runs -m slow)
def test_console_script_runs(tmp_path):
    """The exact README command through the installed entry point (python -m omnibyte)."""
    out = tmp_path / "stream.png"
    r = subprocess.run([sys.executable, "-m", "omnibyte", "inspect", "--serializer", "qa", str(SAMPLE),
                        "--plot", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("args", [
    ["--serializer", "pixels", "size=[62,41]", "order=patch", "header=true"],
    ["--serializer", "png", "method=reencode", "size=[62,41]", "crop=0.1"],
    ["--serializer", "jpeg", "method=reencode", "quality=50"],
])
def test_image_serializers_and_overrides(tmp_path, capsys, args):
    out = tmp_path / "p.png"
    assert main(["inspect", *args, str(EXAMPLES / "clevr_sample.png"), "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "image" in text and out.is_file()


def test_yaml_bare_node_and_run_config(tmp_path, capsys):
    node = tmp_path / "ser.yaml"
    node.write_text("name: qa\nloss: all\nimage:\n  name: png\n  method: reencode\n  size: [31, 20]\n")
    assert main(["inspect", "--serializer", str(node), str(SAMPLE)]) == 0
    assert "loss 1 " in capsys.readouterr().out
    run = tmp_path / "run.yaml"
    run.write_text("task: {name: whatever}\nserializer:\n  name: qa\n  order: [question, image, question, answer]\n")
    assert main(["inspect", "--serializer", str(run), "image.method=reencode", "image.size=[10,10]",
                 str(SAMPLE)]) == 0
    text = capsys.readouterr().out
    assert "BOS SOM_QUESTION" in text and "EOM SOM_IMAGE" in text


def test_text_file_and_json_with_relative_image(tmp_path, capsys):
    txt = tmp_path / "a.txt"
    txt.write_bytes("zero \x00 byte and é".encode())
    assert main(["inspect", "--serializer", "utf8", "bos=true", str(txt)]) == 0
    assert "<BOS>" in capsys.readouterr().out
    shutil.copy(EXAMPLES / "clevr_sample.png", tmp_path / "img.png")
    (tmp_path / "s.json").write_text(json.dumps({"image": "img.png", "question": "Q?", "answer": "no"}))
    assert main(["inspect", "-s", "qa", str(tmp_path / "s.json"), "--plot", str(tmp_path / "o.png")]) == 0
    assert "sample 's'" in capsys.readouterr().out


def test_errors_exit_2(tmp_path, capsys):
    assert main(["inspect", "--serializer", "qa", str(tmp_path / "missing.json")]) == 2
    assert main(["inspect", "--serializer", "qaa", str(SAMPLE)]) == 2
    assert "did you mean" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": "b7", "image": "img.png", "question": "", "answer": "x"}))
    shutil.copy(EXAMPLES / "clevr_sample.png", tmp_path / "img.png")
    assert main(["inspect", "--serializer", "qa", str(bad)]) == 2
    assert "sample 'b7' [qa]: empty question" in capsys.readouterr().err
    assert main(["inspect", "--serializer", "png", "methd=reencode", str(SAMPLE)]) == 2
