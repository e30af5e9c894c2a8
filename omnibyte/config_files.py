"""The file side of configs: finding a config by name, reading YAML (``extends:``, no duplicate keys), merging,
and ``key=value`` overrides. :mod:`omnibyte.config` turns the resulting dicts into dataclasses and re-exports
these names."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that does not fit its schema; the message starts with the offending YAML path."""


def _did_you_mean(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"


# ----------------------------------------------------------------------------------------------
# files, extends, overrides


def configs_dir() -> Path:
    """The shipped configs: the package ``omnibyte.configs`` (the repository's ``configs/`` folder, installed
    inside the omnibyte namespace by a wheel or an editable install)."""
    import importlib.util

    spec = importlib.util.find_spec("omnibyte.configs")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - a broken install
        return Path(__file__).resolve().parent.parent / "configs"
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A path as given, else ``./configs/<name>.yaml``, else the checkout's ``configs/<name>.yaml``."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    candidates = [Path("configs") / stem, configs_dir() / stem]
    if p.suffix not in (".yaml", ".yml"):
        candidates.insert(0, p.with_suffix(".yaml"))
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(x.stem for x in configs_dir().glob("*.yaml")) if configs_dir().is_dir() else []
    hint = _did_you_mean(str(name_or_path), known) if known else ""
    raise ConfigError(f"no config file {str(name_or_path)!r} (looked at {', '.join(map(str, [p] + candidates))}){hint}")


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class RawInt(int):
    """An integer read from YAML that keeps its text: a string field gets it back as written (``run_name=010``
    was the string ``'8'``: YAML 1.1 reads 010 as octal; ``2024_01_15`` as 20240115)."""

    text = ""


class RawFloat(float):
    """A float read from YAML that keeps its text (``run_name=1.10`` was ``'1.1'``)."""

    text = ""


def _raw_number(kind, construct_plain):
    def construct(loader, node):
        out = kind(construct_plain(loader, node))
        out.text = node.value
        return out

    return construct


def _keep_number_text(loader_cls) -> None:
    loader_cls.add_constructor("tag:yaml.org,2002:int", _raw_number(RawInt, yaml.SafeLoader.construct_yaml_int))
    loader_cls.add_constructor("tag:yaml.org,2002:float", _raw_number(RawFloat, yaml.SafeLoader.construct_yaml_float))


# a RawInt / RawFloat that reaches a dumped record is written as the number it is
yaml.SafeDumper.add_representer(RawInt, yaml.representer.SafeRepresenter.represent_int)
yaml.SafeDumper.add_representer(RawFloat, yaml.representer.SafeRepresenter.represent_float)


class _OverrideLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for one ``key=value`` override, numbers keeping their text."""


_keep_number_text(_OverrideLoader)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML says keys are unique; PyYAML keeps
    the last in silence). Merge keys (``<<: *anchor``) may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


_keep_number_text(_UniqueKeyLoader)


def load_yaml(name_or_path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, resolving its ``extends:`` parent (one per file; chains allowed). A key given twice in
    one mapping is a ConfigError naming the key, the file and the line (never the last value in silence)."""
    path = resolve_config_path(name_or_path).resolve()
    if path in _seen:
        raise ConfigError(f"extends: cycle through {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: duplicate key {e.key!r} (first given on line {e.first}); a YAML "
                          f"mapping takes each key once") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: takes one parent (a file name), got {parent!r}")
    ppath = path.parent / parent
    base = load_yaml(ppath if ppath.is_file() else parent, _seen + (path,))
    return deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. model.stages.0.layers=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.load(raw, Loader=_OverrideLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.0.c=value`` overrides to a raw config dict (copied; lists addressed by index)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        walked: list[str] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(walked) or "<root>"
            if isinstance(node, list):
                try:
                    idx = int(part)
                except ValueError:
                    raise ConfigError(f"override {text!r}: {where} is a list; {part!r} is not an index") from None
                if not -len(node) <= idx < len(node):
                    raise ConfigError(f"override {text!r}: index {idx} out of range for {where} "
                                      f"(length {len(node)})")
                if last:
                    node[idx] = value
                else:
                    if node[idx] is None:
                        node[idx] = {}
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"override {text!r}: {where} is a value, not a mapping or list")
            walked.append(part)
    return data
