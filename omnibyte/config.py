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
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .config_files import (  # noqa: F401  (re-exported: the YAML side of configs)
    ConfigError,
    _did_you_mean,
    apply_overrides,
    configs_dir,
    deep_merge,
    load_yaml,
    parse_override,
    resolve_config_path,
)

T = TypeVar("T")


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


def _type_name(tp: Any) -> str:
    """``Literal['auto']`` -> ``'auto'``, ``bool`` -> ``true/false``, other types by name (for messages)."""
    if typing.get_origin(tp) is Literal:
        return " / ".join(repr(a) for a in typing.get_args(tp))
    if tp is bool:
        return "true / false"
    return getattr(tp, "__name__", str(tp))


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
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_fmt(path)}: {value!r} is none of "
                          f"{', '.join(_type_name(a) for a in args if a is not type(None))}")
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
        _refuse_yaml11_surprise(value, path)
        if isinstance(value, int):
            return int(value)  # a RawInt (YAML text kept) becomes a plain int
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
        _refuse_yaml11_surprise(value, path)
        try:
            return float(value)  # PyYAML reads 3e-4 as a string: accept numeric strings
        except (TypeError, ValueError):
            raise ConfigError(f"{_fmt(path)}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return getattr(value, "text", "") or str(value)  # as written: run_name=010 is '010', not '8'
        raise ConfigError(f"{_fmt(path)}: expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{_fmt(path)}: expected {tp.__name__}, got {value!r}")
    return value


def _refuse_yaml11_surprise(value: Any, path) -> None:
    """YAML 1.1 reads ``010`` as octal 8 and ``1:30`` as 90 (base 60): a number written so is refused, not
    taken at a value its writer did not mean."""
    import re

    text = getattr(value, "text", "")
    if text and (re.fullmatch(r"[-+]?0[0-7_]+", text) or ":" in text):
        hint = "" if ":" in text else f", e.g. {text.lstrip('+-0') or '0'}"
        raise ConfigError(f"{_fmt(path)}: {text!r} reads as {value!r} in YAML 1.1 (octal or base 60); write the "
                          f"number plainly{hint}")


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
