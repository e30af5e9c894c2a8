"""The CLI explains itself: ``omnibyte config show|keys``, ``train --dry-run`` and its start-up summary, one
flag style across verbs (``--checkpoint``, ``--device``, ``--quiet``), defaults in ``--help``."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from omnibyte.cli import build_parser, main
from omnibyte.config import dump_yaml, to_dict
from omnibyte.config_doc import config_keys, field_docs
from omnibyte.runconfig import RESOLVED_NAME, RunConfig, TrainConfig, load_run_config


def _out(capsys, argv) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


# --- config show -------------------------------------------------------------------------------------


def test_show_prints_the_config_train_would_run(capsys):
    shown = yaml.safe_load(_out(capsys, ["config", "show", "debug_tiny", "train.lr=1e-3", "data.seq_len=128"]))
    assert shown == to_dict(load_run_config("debug_tiny", ["train.lr=1e-3", "data.seq_len=128"]))
    assert shown["train"]["lr"] == 1e-3 and shown["data"]["seq_len"] == 128
    assert shown["train"]["eps"] == 1e-8  # every default filled in


def test_show_takes_a_path_with_presets(tmp_path, capsys):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("extends: debug_tiny\nrun_name: ''\npresets:\n  cpu: {train: {steps: 7}}\n")
    shown = yaml.safe_load(_out(capsys, ["config", "show", str(cfg), "preset=cpu"]))
    assert shown["preset"] == "cpu" and shown["train"]["steps"] == 7 and shown["run_name"] == "mine_cpu"
    shown = yaml.safe_load(_out(capsys, ["config", "show", str(cfg), "preset=full"]))
    assert shown["train"]["steps"] == 300 and shown["run_name"] == "mine"


def test_show_takes_a_run_directory(tmp_path, capsys):
    run = tmp_path / "moved" / "myrun"
    run.mkdir(parents=True)
    dump_yaml(load_run_config("debug_tiny", ["train.steps=3"]), run / RESOLVED_NAME)
    shown = yaml.safe_load(_out(capsys, ["config", "show", str(run)]))
    assert shown["train"]["steps"] == 3
    assert (shown["out_dir"], shown["run_name"]) == (str(tmp_path / "moved"), "myrun")  # where it is now


def test_show_refuses_a_bad_override(capsys):
    assert main(["config", "show", "debug_tiny", "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


# --- config keys -------------------------------------------------------------------------------------


def _rows(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines()}


def test_keys_lists_type_value_and_the_field_comment(capsys):
    rows = _rows(_out(capsys, ["config", "keys", "debug_tiny", "train"]))
    assert set(rows) == {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    lr = rows["train.lr"].split()
    assert lr[1:3] == ["float", "0.0015"]  # the value debug_tiny resolves to, not the class default
    # the doc is the comment on the field in runconfig.py: one source
    src = inspect.getsource(TrainConfig)
    comment = next(ln for ln in src.splitlines() if ln.strip().startswith("lr:")).split("#", 1)[1].strip()
    assert rows["train.lr"].endswith("# " + comment)
    assert rows["train.precision"].split()[1:6] == ["auto", "|", "bf16", "|", "fp32"]


def test_keys_of_polymorphic_nodes_follow_the_config(capsys):
    rows = _rows(_out(capsys, ["config", "keys", "debug_tiny", "model.stages.0"]))
    assert "model.stages.0.block.heads" in rows and "transformer" in rows["model.stages.0.block.name"]
    assert all(k.startswith("model.stages.0.") for k in rows)
    rows = _rows(_out(capsys, ["config", "keys", "clevr_vqa_png", "model.stages.0.block", "preset=cpu"]))
    assert "model.stages.0.block.headdim" in rows and "model.stages.0.block.heads" not in rows  # mamba2's keys
    rows = _rows(_out(capsys, ["config", "keys", "debug_tiny", "serializer"]))
    assert "serializer.eos" in rows and "true" in rows["serializer.eos"].split()


def test_keys_cover_every_resolved_leaf():
    cfg = load_run_config("debug_tiny")
    keys = {k.key for k in config_keys(cfg)}
    flat = set()

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, list) and v and all(isinstance(i, dict) for i in v):
                for i, item in enumerate(v):
                    walk(item, f"{prefix}{k}.{i}.")
            else:
                flat.add(f"{prefix}{k}")
    walk(to_dict(cfg))
    assert keys == flat


def test_keys_with_an_unknown_prefix_say_which_sections_exist(capsys):
    assert main(["config", "keys", "debug_tiny", "trian"]) == 2
    err = capsys.readouterr().err
    assert "trian" in err and "train" in err


def test_field_docs_read_trailing_continued_and_leading_comments_and_bases():
    @dataclasses.dataclass(frozen=True)
    class Base:
        a: int = 1  # the a
        b: int = 2

    @dataclasses.dataclass(frozen=True)
    class Child(Base):
        c: str = "x"  # first line,
        # second line
        d: tuple[int, ...] = (
            1, 2)  # d's doc on its last line
        # e's doc, above it: e has no comment of its own
        # (two lines)
        e: bool = True
        f: int = 0  # f's doc

    assert field_docs(Child) == {"a": "the a", "b": "", "c": "first line, second line", "d": "d's doc on its last line",
                                 "e": "e's doc, above it: e has no comment of its own (two lines)", "f": "f's doc"}


def test_runconfig_sections_document_their_keys():
    """Every key of the run config's own sections has a comment, except the self-explanatory ones listed."""
    undocumented = {k.key for k in config_keys(RunConfig(task=load_run_config("debug_tiny").task,
                                                         serializer=load_run_config("debug_tiny").serializer))
                    if not k.doc and k.key.split(".")[0] in ("data", "train", "eval", "parallel", "run_name",
                                                             "out_dir", "seed", "notes", "preset")}
    assert undocumented == set(), undocumented


# --- train --dry-run and the start-up summary -----------------------------------------------------------


def test_dry_run_builds_everything_prints_the_summary_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "runs"
    assert main(["train", "debug_tiny", f"out_dir={out_dir}", "--dry-run", "--quiet", "--device", "cpu"]) == 0
    io = capsys.readouterr()
    assert "dry run" in io.out and "nothing written" in io.out
    summary = [ln for ln in io.err.splitlines() if "omnibyte.progress" in ln]
    text = "\n".join(summary)
    for part in ("M parameters", "global batch: 8 rows x 256 bytes x 1 grad_accum x 1 rank", "2,048 bytes per step",
                 "device: cpu", "precision fp32", "data: task synthetic_text", f"run directory: {out_dir}/debug_tiny",
                 "(new)"):
        assert part in text, (part, text)
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []


def test_dry_run_stops_on_a_config_error_before_anything_is_written(tmp_path, capsys):
    out_dir = tmp_path / "runs"
    assert main(["train", "debug_tiny", f"out_dir={out_dir}", "eval.split=nope", "--dry-run", "--quiet"]) == 2
    assert "nope" in capsys.readouterr().err and not out_dir.exists()


def test_summary_names_a_resume():
    import torch

    from omnibyte import parallel
    from omnibyte.startup import startup_summary

    cfg = load_run_config("debug_tiny", ["data.source=h5", "data.path=data/x.h5", "train.grad_accum=2"])
    info = parallel.DistInfo(world=4, device=torch.device("cpu"), strategy="ddp")
    lines = startup_summary(cfg, info, torch.nn.Linear(10, 10), True, resume_from=cfg.run_dir / "ck" / "step_5",
                            resume_step=5)
    text = "\n".join(lines)
    assert "110 parameters" not in text and "0.00M parameters (110)" in text
    assert "8 rows x 256 bytes x 2 grad_accum x 4 ranks = 64 rows, 16,384 bytes per step" in text
    assert "bf16 autocast" in text and "data: h5 data/x.h5" in text and "resumes from" in text and "step 5" in text


# --- one flag style, defaults in --help ---------------------------------------------------------------------


def _help(verb: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    return sub.choices[verb].format_help()


@pytest.mark.parametrize("verb,flags", [("train", ["--device", "--quiet", "--dry-run"]),
                                        ("eval", ["--device", "--quiet", "--checkpoint"]),
                                        ("generate", ["--device", "--quiet", "--checkpoint"]),
                                        ("prepare", ["--quiet", "--no-progress"])])
def test_verbs_share_flags(verb, flags):
    text = _help(verb)
    assert all(f in text for f in flags), text


def test_help_shows_defaults():
    text = " ".join(_help("generate").split())
    assert "--temperature TEMPERATURE >= 0; 0 = greedy (default: 0.8)" in text
    assert "(default: 256)" in text and "(default: 0)" in text  # --max-new-bytes, --seed / --top-k
    assert "(default: False)" not in text  # flags say nothing
    assert "(default: 10000)" in " ".join(_help("prepare").split())
    assert "(default: auto)" in " ".join(_help("eval").split())


def test_train_device_flag_is_train_device():
    args, _ = build_parser().parse_known_args(["train", "debug_tiny", "--device", "cpu"])
    assert args.device == "cpu"


def test_prepare_quiet_and_its_old_name(tmp_path, capsys):
    for i, flag in enumerate(("--quiet", "--no-progress")):
        out = tmp_path / f"d{i}"
        assert main(["prepare", "debug_tiny", "task.samples={train: 4, validation: 2}", "--out", str(out), flag]) == 0
        assert (out / "train.shards.json").is_file()


def test_a_preset_runs_resolved_config_loads_as_a_config(tmp_path):
    """`omnibyte train runs/clevr_vqa_png_cpu` failed: its record says preset: cpu and holds no presets: section
    (the preset was applied when it was written)."""
    import yaml

    from omnibyte.config import to_dict
    from omnibyte.runconfig import load_run_config

    c = load_run_config("clevr_vqa_png", ["preset=cpu"])
    rec = tmp_path / "config.resolved.yaml"
    rec.write_text(yaml.safe_dump(to_dict(c)))
    again = load_run_config(str(rec), [])
    assert again.preset == "cpu" and again.model == c.model and again.data == c.data
