"""Every bad config value is a one-line ``omnibyte <verb>: error: ...`` naming the key, exit code 2, and no
traceback; nothing is accepted silently (the hardening issue's list, one case each)."""

from __future__ import annotations

import pytest
from test_train_run import write_config

from omnibyte.cli import main

BAD = {
    "train.lr=-1": "train.lr",
    "train.lr=nan": "train.lr",
    "train.lr=.inf": "train.lr",
    "train.betas=[2,3]": "train.betas",
    "train.warmup=-5": "train.warmup",
    "train.weight_decay=-0.1": "train.weight_decay",
    "train.clip=-1": "train.clip",
    "train.log_every=0": "train.log_every",
    "train.ckpt_every=-1": "train.ckpt_every",
    "train.eval_every=-3": "train.eval_every",
    "data.workers=-2": "data.workers",
    "train.device=cuda:7": "train.device",
    "train.device=tpu": "train.device",
    "train.init_stages=[7]": "init_stages",
    "eval.max_samples=-1": "eval.max_samples",
    "model.init_std=inf": "init_std must be a finite number > 0",
    "eval.select=loss": "eval.select",
}


@pytest.mark.parametrize("override", list(BAD))
def test_bad_values_are_clear_errors(tmp_path, capsys, override):
    cfg = write_config(tmp_path, train={"steps": 2, "eval_every": 0, "ckpt_every": 0})
    extra = []
    if override.startswith("train.init_stages"):
        assert main(["train", str(cfg), "run_name=src", "--quiet"]) == 0
        extra = [f"train.init_from={tmp_path / 'runs' / 'src'}"]
    capsys.readouterr()
    assert main(["train", str(cfg), override, *extra, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnibyte train: error: ") and BAD[override] in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists() or override.startswith("train.init")


def test_init_from_a_run_of_another_architecture_names_the_tensors(tmp_path, capsys):
    cfg = write_config(tmp_path, train={"steps": 2, "eval_every": 0, "ckpt_every": 0})
    assert main(["train", str(cfg), "run_name=src", "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["train", str(cfg), "run_name=dst", "model.stages.0.width=32",
               f"train.init_from={tmp_path / 'runs' / 'src'}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "another architecture" in err and "shapes differ" in err and "Traceback" not in err


def test_an_eval_split_typo_fails_before_step_1(tmp_path, capsys):
    cfg = write_config(tmp_path, train={"steps": 2, "eval_every": 0, "ckpt_every": 0})
    assert main(["train", str(cfg), "eval.split=validaton", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "validaton" in err and "Traceback" not in err
    assert not list((tmp_path / "runs" / "tiny" / "checkpoints").glob("step_*"))


def test_training_refuses_to_select_on_a_test_split(tmp_path, capsys):
    """Select on validation, never on test: eval.split picks the best checkpoint and drives early stopping."""
    cfg = write_config(tmp_path, train={"steps": 2, "eval_every": 0, "ckpt_every": 0})
    assert main(["train", str(cfg), "eval.split=test", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "eval.split=test" in err and "Select on validation" in err and "omnibyte eval" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "tiny").exists()


def test_string_fields_keep_numbers_as_written_and_yaml11_surprises_are_refused(tmp_path):
    """run_name=010 was the string '8' (YAML 1.1 octal), 2024_01_15 was '20240115', 1.10 was '1.1': a run wrote
    into another directory; train.steps=010 was 8 and train.lr=1:30 was 90."""
    from omnibyte.config import ConfigError
    from omnibyte.runconfig import load_run_config

    for text in ("010", "2024_01_15", "1.10", "7", "1e3"):
        assert load_run_config("debug_tiny", [f"run_name={text}"]).run_name == text
    cfg = tmp_path / "c.yaml"
    cfg.write_text("extends: debug_tiny.yaml\nrun_name: 010\ntrain:\n  steps: 1_000\n")
    c = load_run_config(str(cfg), [])
    assert c.run_name == "010" and c.train.steps == 1000 and type(c.train.steps) is int
    with pytest.raises(ConfigError, match=r"train.steps: '010' reads as 8 in YAML 1.1"):
        load_run_config("debug_tiny", ["train.steps=010"])
    with pytest.raises(ConfigError, match=r"train.lr: '1:30' reads as 90"):
        load_run_config("debug_tiny", ["train.lr=1:30"])


def test_a_misspelt_synthetic_split_is_refused():
    from omnibyte.config import ConfigError
    from omnibyte.runconfig import load_run_config

    with pytest.raises(ConfigError, match=r"samples: no split 'valdation' \(splits: train, validation, test\)"):
        load_run_config("debug_tiny", ["task.samples.valdation=16"])
