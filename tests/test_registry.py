"""Registry behaviour (omnibyte/registry.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from omnibyte.config import Node
from omnibyte.registry import Registry, RegistryError


def _make(reg, name):
    @reg.register(name)
    class Thing:
        @dataclass(frozen=True)
        class Config(Node):
            size: int = 1

        def __init__(self, config):
            self.config = config

    return Thing


def test_register_get_names_build():
    reg = Registry("thing")
    a = _make(reg, "alpha")
    _make(reg, "alpine")
    _make(reg, "beta")
    assert reg.get("alpha") is a and a.registry_name == "alpha"
    assert reg.names() == ["alpha", "alpine", "beta"]
    assert reg.names("al*") == ["alpha", "alpine"]
    assert "beta" in reg and "gamma" not in reg
    obj = reg.build({"name": "beta", "size": 3})
    assert obj.config.size == 3


def test_duplicate_raises():
    reg = Registry("thing")
    _make(reg, "alpha")
    with pytest.raises(RegistryError, match="already registered"):
        _make(reg, "alpha")


def test_miss_suggests():
    reg = Registry("thing")
    _make(reg, "transformer")
    with pytest.raises(RegistryError, match="did you mean 'transformer'"):
        reg.get("transfomer")
    with pytest.raises(RegistryError, match="registered: transformer"):
        reg.get("zzz")


def test_needs_config():
    reg = Registry("thing")
    with pytest.raises(TypeError, match="Config"):
        reg.register("x")(type("X", (), {}))


def test_plugins_load_lazily(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_mod.py").write_text(
        "from dataclasses import dataclass\n"
        "from omnibyte.config import Node\n"
        "import omnibyte_test_reg\n"
        "@omnibyte_test_reg.REG.register('plug')\n"
        "class P:\n"
        "    @dataclass(frozen=True)\n"
        "    class Config(Node):\n"
        "        pass\n"
    )
    import sys
    import types

    holder = types.ModuleType("omnibyte_test_reg")
    holder.REG = Registry("thing", plugins=("my_plugin_mod",))
    monkeypatch.setitem(sys.modules, "omnibyte_test_reg", holder)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "my_plugin_mod" not in sys.modules
    assert holder.REG.names() == ["plug"]  # first lookup imports the plugin
    assert "my_plugin_mod" in sys.modules

