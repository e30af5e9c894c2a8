"""Name -> class registries for serializers, tasks, model stages (blocks) and models.

A registered class carries a ``Config`` frozen dataclass (see :mod:`omnibyte.config`) and is built
as ``cls(config)``. Registries import their plugin modules lazily, on the first lookup, so that
``import omnibyte`` stays cheap and the library never imports ``serializers/`` or ``tasks/`` directly.

Third-party plugins: list modules under the entry-point group ``omnibyte.plugins`` in your package,
or name them in a run config's ``plugins:`` list; importing the module registers its classes.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable, Iterable
from typing import Any

from .config import POLY_REGISTRIES, from_dict, node_name

_ENTRY_POINT_GROUP = "omnibyte.plugins"
_entry_points_loaded = False


class RegistryError(KeyError):
    """Unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        ep.load()


def import_plugins(modules: Iterable[str]) -> None:
    """Import user plugin modules (e.g. from a config's ``plugins:`` list) so they register."""
    for name in modules:
        importlib.import_module(name)


class Registry:
    def __init__(self, kind: str, plugins: Iterable[str] = ()):
        self.kind = kind
        self._plugins = tuple(plugins)
        self._loaded = False
        self._entries: dict[str, type] = {}

    # --- registration -------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: ``@SERIALIZERS.register("png")``. Registering a name twice raises."""

        def deco(cls: type) -> type:
            if name in self._entries and self._entries[name] is not cls:
                other = self._entries[name]
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered by {other.__module__}.{other.__qualname__}"
                )
            if not hasattr(cls, "Config"):
                raise TypeError(f"{cls.__qualname__} must define a nested Config dataclass to be registered")
            self._entries[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    # --- lookup -----------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: plugin modules may look names up while importing
        for mod in self._plugins:
            importlib.import_module(mod)
        _load_entry_points()

    def get(self, name: str) -> type:
        self._ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            pass
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(sorted(self._entries)) or 'none'})"
        )

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def names(self, pattern: str = "*") -> list[str]:
        self._ensure_loaded()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def config_class(self, name: str) -> type:
        return self.get(name).Config

    def build(self, node: Any, **kwargs: Any) -> Any:
        """Build a registered class from a config node: a parsed Config (with ``name``) or a dict."""
        if isinstance(node, dict):
            if "name" not in node:
                raise ValueError(f"a {self.kind} config needs a 'name:' key (one of: {', '.join(self.names())})")
            cls = self.get(node["name"])
            cfg = from_dict(cls.Config, node, path=self.kind)
        else:
            cls = self.get(node_name(node))
            cfg = node
        return cls(cfg, **kwargs)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


SERIALIZERS = Registry("serializer", plugins=("omnibyte.serializers",))
TASKS = Registry("task", plugins=("omnibyte.tasks",))
STAGES = Registry("stage", plugins=("omnibyte.model.blocks",))
MODELS = Registry("model", plugins=("omnibyte.model", "omnibyte.tasks"))

#: the registries by kind: the same dict that ``poly`` config fields resolve through
REGISTRIES = POLY_REGISTRIES
REGISTRIES.update({"serializers": SERIALIZERS, "tasks": TASKS, "stages": STAGES, "models": MODELS})
