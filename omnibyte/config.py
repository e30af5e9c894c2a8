"""YAML -> frozen dataclasses, strictly.

Every component owns a frozen ``Config`` dataclass. This module turns nested dicts (from YAML files,
``extends:`` parents and dotted command-line overrides) into those dataclasses and back:

* Unknown keys fail with their YAML path and the nearest valid name
  (``model.stages.0.layrs: unknown key; did you mean 'layers'?``).
* Polymorphic nodes (a serializer, a task, a model, each model stage's block) carry ``name:``; the
  field is declared with :func:`poly` and resolves through a registry to that class's own ``Config``,
  which subclasses :class:`Node`.
* ``extends: parent.yaml`` (one parent per file, relative to the file or a name in ``configs/``) is
  deep-merged under the child; lists are replaced, not merged.
* Overrides ``a.b.0.c=4`` address dict keys and list indices; values are parsed as YAML scalars.
* :func:`to_dict` / :func:`dump_yaml` give the resolved config back, every default filled in.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not fit its schema; the message starts with the offending YAML path."""


@dataclasses.dataclass(frozen=True)
class Node:
    """Base of configs selected by ``name:`` through a registry (serializers, tasks, models, blocks)."""

    name: str = ""


def poly(registry: str, default: str | None = None, **field_kwargs: Any) -> Any:
    """Declare a polymorphic field: ``serializer: Node = poly("serializers", default="png")``.

    ``registry`` is a key of :data:`POLY_REGISTRIES` (:data:`omnibyte.registry.REGISTRIES`). With ``default`` a missing key
    becomes that registered class's default config; without it a missing key is ``None``.
    """
    return dataclasses.field(default=None, metadata={"registry": registry, "default_name": default},
                             **field_kwargs)


def node_name(node: Any) -> str:
    name = getattr(node, "name", "")
    if not name:
        raise ConfigError(f"config node {type(node).__name__} has no 'name'")
    return name


# ----------------------------------------------------------------------------------------------
# dict -> dataclass


def _fmt(path: str) -> str:
    return path or "<root>"


def _did_you_mean(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"


#: registries that ``poly`` fields resolve through, by kind; filled by :mod:`omnibyte.registry` (which builds
#: on this module, not the other way round) and by anything else that registers a kind of plugin
POLY_REGISTRIES: dict[str, Any] = {}


def _registry(kind: str):
    try:
        return POLY_REGISTRIES[kind]
    except KeyError:
        raise ConfigError(f"no registry of kind {kind!r} (known: {', '.join(sorted(POLY_REGISTRIES)) or 'none'}); "
                          f"import omnibyte.registry, or register it in omnibyte.config.POLY_REGISTRIES") from None


def _convert_poly(value: Any, path: str, meta: Mapping[str, Any]) -> Any:
    reg = _registry(meta["registry"])
    if value is None:
        return None
    if isinstance(value, Node):
        return value
    if isinstance(value, str):  # shorthand: `serializer: png`
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_fmt(path)}: expected a mapping with 'name:', got {type(value).__name__}")
    if "name" not in value:
        raise ConfigError(f"{_fmt(path)}: missing 'name:' (one of: {', '.join(reg.names())})")
    try:
        cls = reg.get(value["name"])
    except KeyError as e:
        raise ConfigError(f"{_fmt(path)}.name: {e}") from None
    return from_dict(cls.Config, value, path=path)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_fmt(path)}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value in args:
            return value
        hint = _did_you_mean(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise ConfigError(f"{_fmt(path)}: {value!r} is not one of {list(args)}{hint}")
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_fmt(path)}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{_fmt(path)}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}.{i}") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{path}.{i}") for i, v in enumerate(value))
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_fmt(path)}: expected a mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, f"{path}.{k}"): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_fmt(path)}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, path=path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{_fmt(path)}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{_fmt(path)}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{_fmt(path)}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{_fmt(path)}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{_fmt(path)}: expected a number, got {value!r}")
        try:
            return float(value)  # PyYAML reads 3e-4 as a string: accept numeric strings
        except (TypeError, ValueError):
            raise ConfigError(f"{_fmt(path)}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{_fmt(path)}: expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{_fmt(path)}: expected {tp.__name__}, got {value!r}")
    return value


_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    h = _hints_cache.get(cls)
    if h is None:
        h = _hints_cache[cls] = typing.get_type_hints(cls)
    return h


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly (unknown keys and bad types raise ConfigError)."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            sub = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{sub}: unknown key{_did_you_mean(key, list(fields))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if "registry" in f.metadata:
            if name in data:
                kwargs[name] = _convert_poly(data[name], sub, f.metadata)
            elif f.metadata.get("default_name"):
                kwargs[name] = _convert_poly({"name": f.metadata["default_name"]}, sub, f.metadata)
            continue
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: missing required key")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{_fmt(path)}: {e}") from None
    return obj


# ----------------------------------------------------------------------------------------------
# dataclass -> dict / YAML


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe data for a config (tuples become lists; nodes keep their ``name`` first)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        if isinstance(obj, Node):
            out["name"] = obj.name
        for f in dataclasses.fields(obj):
            if f.name == "name" and isinstance(obj, Node):
                continue
            out[f.name] = to_dict(getattr(obj, f.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any, path: str | os.PathLike | None = None) -> str:
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, width=110)
    if path is not None:
        Path(path).write_text(text)
    return text


def replace(obj: T, **changes: Any) -> T:
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


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
        value = yaml.safe_load(raw) if raw.strip() else ""
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


def load_config(cls: type[T], source: Any = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML name/path, a dict or an instance, then apply dotted overrides."""
    if isinstance(source, cls):
        if not overrides:
            return source
        source = to_dict(source)
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = load_yaml(source)
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)
