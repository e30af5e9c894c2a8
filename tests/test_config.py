"""Config strictness, overrides, extends and round-trips (omnibyte/config.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from omnibyte.config import (
    ConfigError,
    Node,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    poly,
    to_dict,
)
from omnibyte.registry import REGISTRIES, Registry


@dataclass(frozen=True)
class Stage:
    width: int = 8
    layers: int = 1
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Opt:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Top:
    name: str = "run"
    seed: int = 0
    stages: tuple[Stage, ...] = (Stage(),)
    opt: Opt = field(default_factory=Opt)
    flag: bool = False
    note: str | None = None


def test_defaults_and_nested():
    cfg = from_dict(Top, {"stages": [{"width": 4}, {"layers": 3}], "opt": {"lr": "3e-4"}})
    assert cfg.stages == (Stage(width=4), Stage(layers=3))
    assert cfg.opt.lr == pytest.approx(3e-4)  # PyYAML reads 3e-4 as a string
    assert cfg.note is None


def test_unknown_key_names_path_and_suggestion():
    with pytest.raises(ConfigError) as e:
        from_dict(Top, {"stages": [{"width": 4, "layrs": 2}]})
    assert "stages.0.layrs" in str(e.value) and "'layers'" in str(e.value)


def test_bad_types_and_literals():
    with pytest.raises(ConfigError, match="seed: expected an integer"):
        from_dict(Top, {"seed": "ten"})
    with pytest.raises(ConfigError, match="seed: expected an integer"):
        from_dict(Top, {"seed": 1.5})
    with pytest.raises(ConfigError, match=r"stages\.0\.kind: 'c' is not one of"):
        from_dict(Top, {"stages": [{"kind": "c"}]})
    with pytest.raises(ConfigError, match="flag: expected true/false"):
        from_dict(Top, {"flag": 3})
    with pytest.raises(ConfigError, match="opt.betas: expected 2 items"):
        from_dict(Top, {"opt": {"betas": [0.9]}})


def test_frozen():
    cfg = from_dict(Top, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_overrides_with_list_indices():
    raw = {"stages": [{"width": 4}, {"width": 8}], "opt": {"lr": 0.1}}
    out = apply_overrides(raw, ["stages.1.layers=4", "opt.lr=2e-4", "seed=7", "note=hello world"])
    cfg = from_dict(Top, out)
    assert cfg.stages[1] == Stage(width=8, layers=4)
    assert cfg.seed == 7 and cfg.opt.lr == pytest.approx(2e-4) and cfg.note == "hello world"
    assert raw["stages"][1] == {"width": 8}  # input not mutated
    with pytest.raises(ConfigError, match="out of range"):
        apply_overrides(raw, ["stages.5.layers=1"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(raw, ["stages.x.layers=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(raw, ["stages"])
    with pytest.raises(ConfigError, match="stages.0.depth: unknown key"):
        from_dict(Top, apply_overrides(raw, ["stages.0.depth=1"]))


def test_extends_and_dump_roundtrip(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\nstages:\n  - {width: 4}\n  - {width: 2}\nopt: {lr: 0.5}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nopt: {betas: [0.8, 0.9]}\nstages: [{width: 16}]\n")
    raw = load_yaml(tmp_path / "child.yaml")
    assert raw["opt"] == {"lr": 0.5, "betas": [0.8, 0.9]}  # dicts merge
    assert raw["stages"] == [{"width": 16}]  # lists replace
    cfg = load_config(Top, tmp_path / "child.yaml", ["stages.0.layers=2"])
    assert cfg.seed == 1 and cfg.stages == (Stage(width=16, layers=2),)
    dump_yaml(cfg, tmp_path / "dump.yaml")
    assert load_config(Top, tmp_path / "dump.yaml") == cfg
    assert to_dict(cfg)["opt"]["betas"] == [0.8, 0.9]


def test_extends_cycle_and_missing(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="no config file"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(tmp_path / "bad.yaml")


# --- polymorphic nodes ---------------------------------------------------------------------------

@pytest.fixture
def widgets():
    reg = Registry("widget")
    REGISTRIES["widgets"] = reg

    @reg.register("round")
    class Round:
        @dataclass(frozen=True)
        class Config(Node):
            radius: float = 1.0

        def __init__(self, config):
            self.config = config

    @reg.register("square")
    class Square:
        @dataclass(frozen=True)
        class Config(Node):
            side: int = 2

        def __init__(self, config):
            self.config = config

    yield reg
    del REGISTRIES["widgets"]


def test_poly_nodes(widgets):
    @dataclass(frozen=True)
    class Holder:
        main: Node = poly("widgets", default="round")
        extra: Node = poly("widgets")

    h = from_dict(Holder, {"extra": {"name": "square", "side": 5}})
    assert h.main.name == "round" and h.main.radius == 1.0
    assert h.extra.name == "square" and h.extra.side == 5
    assert from_dict(Holder, {"extra": "square"}).extra.side == 2  # string shorthand
    with pytest.raises(ConfigError, match=r"extra: unknown key 'radius'|extra.radius: unknown key"):
        from_dict(Holder, {"extra": {"name": "square", "radius": 1}})
    with pytest.raises(ConfigError, match="did you mean 'square'"):
        from_dict(Holder, {"extra": {"name": "sqaure"}})
    with pytest.raises(ConfigError, match="missing 'name:'"):
        from_dict(Holder, {"extra": {"side": 1}})
    d = to_dict(h)
    assert d["extra"] == {"name": "square", "side": 5}
    assert from_dict(Holder, d) == h
    built = widgets.build(h.extra)
    assert built.config.side == 5
    assert widgets.build({"name": "round", "radius": 2.5}).config.radius == 2.5
