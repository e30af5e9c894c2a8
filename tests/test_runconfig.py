"""The run config: shipped debug config, overrides, strictness, plugins, run directories."""

from __future__ import annotations

import sys

import pytest

from omnibyte.config import ConfigError, dump_yaml
from omnibyte.runconfig import RunConfig, load_run_config


def test_debug_tiny_loads_with_overrides():
    cfg = load_run_config("debug_tiny", ["train.lr=1e-4", "train.min_lr=1e-5", "model.stages.0.layers=1", "data.workers=2"])
    assert isinstance(cfg, RunConfig) and cfg.run_name == "debug_tiny"
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.model.stages[0].layers == 1 and cfg.data.workers == 2
    assert cfg.task.name == "synthetic_text" and cfg.serializer.name == "utf8"


def test_unknown_keys_and_bad_values_name_the_path():
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key; did you mean 'lr'"):
        load_run_config("debug_tiny", ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"parallel\.strategy: 'fsdp' is not one of"):
        load_run_config("debug_tiny", ["parallel.strategy=fsdp"])
    with pytest.raises(ConfigError, match=r"task\.name: unknown task 'synthetic_txt'.*synthetic_text"):
        load_run_config("debug_tiny", ["task.name=synthetic_txt"])
    with pytest.raises(ConfigError, match="data.source 'h5' needs data.path"):
        load_run_config("debug_tiny", ["data.source=h5"])


def test_missing_task_is_an_error(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("serializer: utf8\n")
    with pytest.raises(ConfigError, match="task: missing"):
        load_run_config(p)


def test_plugins_are_imported_before_parsing(tmp_path, monkeypatch):
    mod = tmp_path / "my_plugin_tasks.py"
    mod.write_text(
        "from dataclasses import dataclass\n"
        "from omnibyte.tasks.base import TASKS, Task, TaskConfig\n"
        "@TASKS.register('my_plugin_task')\n"
        "class Mine(Task):\n"
        "    @dataclass(frozen=True)\n"
        "    class Config(TaskConfig):\n"
        "        size: int = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("plugins: [my_plugin_tasks]\ntask: {name: my_plugin_task, size: 5}\nserializer: utf8\n")
    try:
        cfg = load_run_config(cfg_file)
        assert cfg.task.size == 5 and cfg.run_name == "p"
    finally:
        from omnibyte.registry import TASKS

        TASKS.unregister("my_plugin_task")
        sys.modules.pop("my_plugin_tasks", None)
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_plugin'"):
        load_run_config("debug_tiny", ["plugins=[no_such_plugin]"])


def test_run_directory_round_trip(tmp_path):
    cfg = load_run_config("debug_tiny", ["train.steps=7"])
    run = tmp_path / "debug_tiny"
    run.mkdir()
    dump_yaml(cfg, run / "config.resolved.yaml")
    again = load_run_config(run)
    # the same config, located where the run directory is now (out_dir is its parent, run_name its name)
    import dataclasses

    assert again == dataclasses.replace(cfg, out_dir=str(tmp_path), run_name="debug_tiny")
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run_config(tmp_path)
