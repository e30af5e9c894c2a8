"""The import graph of ``omnibyte/`` is acyclic and never reaches up into ``tasks/`` or ``serializers/``.

Edges come from the source (``ast``), counting every import statement, also those inside functions: a lazy
import is still a dependency. ``from P import name`` is an edge to ``P`` (its ``__init__`` runs and may hold what is imported) and, when
``P.name`` is a module, to ``P.name`` too: ``from .. import vocab`` inside ``omnibyte.model`` depends on both
``omnibyte`` and ``omnibyte.vocab``. Loading plugins *by name* through the registry
(``importlib.import_module`` of a configured string) is not an import statement and is not an edge.
``omnibyte.serializers`` / ``omnibyte.tasks`` are the repository's ``serializers/`` and ``tasks/`` folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "omnibyte"
PLUGIN_PACKAGES = ("omnibyte.serializers", "omnibyte.tasks", "omnibyte.configs")


def _modules() -> dict[str, Path]:
    out = {}
    for path in LIBRARY.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def known(target: str) -> str | None:
        if target.startswith(PLUGIN_PACKAGES):
            return target
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("omnibyte")]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module)
                if not base.startswith("omnibyte"):
                    continue
                targets.append(base)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in mods or sub.startswith(PLUGIN_PACKAGES):
                        targets.append(sub)
            for t in targets:
                k = known(t)
                if k and k != mod:
                    graph[mod].add(k)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_library_import_graph_is_acyclic():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in omnibyte/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_library_never_imports_tasks_or_serializers():
    up = {m: sorted(t for t in ts if t.startswith(PLUGIN_PACKAGES)) for m, ts in import_graph().items()}
    up = {m: ts for m, ts in up.items() if ts}
    assert not up, f"omnibyte/ modules importing the plugin folders (load them by name through a registry): {up}"


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert _resolve("omnibyte.model.mblm", False, 2, "vocab") == "omnibyte.vocab"
    assert _resolve("omnibyte.model", True, 1, "mblm") == "omnibyte.model.mblm"
    # a function-level import is an edge too
    g = import_graph()
    assert "omnibyte.model" in g["omnibyte"] or not (LIBRARY / "__init__.py").read_text().count("from .model")


def test_no_library_module_over_400_lines():
    files = [p for folder in (LIBRARY, ROOT / "serializers", ROOT / "tasks") for p in folder.rglob("*.py")]
    big = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"modules over 400 lines (split them by what they own): {big}"


def test_every_library_package_is_in_the_wheel():
    """pyproject lists packages explicitly (serializers/, tasks/, configs/ are mapped into the namespace): a new
    package folder under omnibyte/ must be listed, or the wheel installs without it (model/inference once did)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in LIBRARY.rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml's [tool.setuptools] packages: {found - listed}"
