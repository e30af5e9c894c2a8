"""How configs and options explain themselves: ``omnibyte config keys`` and the verbs' ``--help``.

A config key's one-line doc has one source: the comment on its field in the dataclass that declares it,
``lr: float = 3e-4  # peak learning rate`` (comment lines right below continue it), or, for a field without
one, the comment lines right above it. They are read from the class's source with :mod:`ast` and
:mod:`tokenize`; a field without a comment has an empty doc.
Polymorphic nodes (task, serializer, model, each stage's block) list the fields of the class the config
selects.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any, Literal, NamedTuple

from .config import Node, to_dict


class Key(NamedTuple):
    key: str  # dotted, e.g. model.stages.0.block.heads
    type: str  # e.g. int, float, rope | learned | none, list[int]
    value: Any  # the resolved value (plain YAML data)
    doc: str  # the field's comment ("" when it has none)


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    """Field name -> comment, for the fields written in ``cls``'s own body (not its bases)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (built dynamically, a frozen install without .py files)
        return {}
    try:
        body = ast_class_body(source)
        comments: dict[int, str] = {}
        code_lines: set[int] = set()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                  tokenize.ENDMARKER):
                code_lines.update(range(tok.start[0], tok.end[0] + 1))
    except (SyntaxError, tokenize.TokenError):
        return {}
    fields = [(name, first, last, next((comments[n] for n in range(first, last + 1) if n in comments), ""))
              for name, first, last in body]
    starts = {first: trailing for _, first, _, trailing in fields}

    def comment_block(line: int, step: int) -> list[int]:
        lines = []
        while line in comments and line not in code_lines:
            lines.append(line)
            line += step
        return lines

    docs: dict[str, str] = {}
    for name, first, last, trailing in fields:
        if trailing:  # `x: int = 1  # doc`, and comment lines right below it, unless they lead a field
            below = comment_block(last + 1, 1)  # that has no comment of its own
            if below and starts.get(below[-1] + 1) == "":
                below = []
            docs[name] = " ".join([trailing, *(comments[n] for n in below)])
        else:  # comment lines right above the field
            docs[name] = " ".join(comments[n] for n in reversed(comment_block(first - 1, -1)))
    return docs


def ast_class_body(source: str) -> list[tuple[str, int, int]]:
    """``(field name, first line, last line)`` of each annotated assignment in the first class of ``source``."""
    import ast

    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    return [(n.target.id, n.lineno, n.end_lineno or n.lineno) for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> one-line doc for every field of dataclass ``cls``, its bases' fields included (the class
    that declares a field last wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, v in _own_field_docs(klass).items() if v or k not in docs})
    return docs


def type_name(tp: Any) -> str:
    """A short, YAML-minded name of a field's type: ``int``, ``rope | learned | none``, ``list[int]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return " | ".join(type_name(a) for a in args if a is not type(None)) + (
            " | null" if type(None) in args else "")
    if origin in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return f"list[{', '.join(type_name(a) for a in args)}]" if args else "list"
    if origin is dict:
        return f"mapping[{', '.join(type_name(a) for a in args)}]" if args else "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _registry_names(kind: str) -> list[str]:
    from .config import POLY_REGISTRIES

    reg = POLY_REGISTRIES.get(kind)
    return list(reg.names()) if reg is not None else []


def config_keys(obj: Any, prefix: str = "") -> list[Key]:
    """Every leaf key of a resolved config dataclass, depth first, with its type, value and doc."""
    out: list[Key] = []
    hints = typing.get_type_hints(type(obj))
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if isinstance(obj, Node) and f.name == "name":
            continue  # listed by the parent, with the registry's names as its type
        if "registry" in f.metadata:
            kind = f.metadata["registry"]
            names = _registry_names(kind)
            out.append(Key(f"{key}.name", " | ".join(names) if names else "str",
                           getattr(value, "name", None), docs.get(f.name, "")))
            if value is not None:
                out.extend(config_keys(value, f"{key}."))
            continue
        if dataclasses.is_dataclass(value):
            out.extend(config_keys(value, f"{key}."))
        elif (isinstance(value, tuple) and value and all(dataclasses.is_dataclass(v) for v in value)):
            for i, item in enumerate(value):
                out.extend(config_keys(item, f"{key}.{i}."))
        else:
            out.append(Key(key, type_name(hints.get(f.name, Any)), to_dict(value), docs.get(f.name, "")))
    return out


def filter_keys(keys: list[Key], prefix: str) -> list[Key]:
    """The keys at or under a dotted ``prefix`` (``train``, ``model.stages.0``; a key's own name works too)."""
    prefix = prefix.strip(".")
    if not prefix:
        return keys
    return [k for k in keys if k.key == prefix or k.key.startswith(prefix + ".")]


def format_value(value: Any) -> str:
    import yaml

    if value == "":
        return '""'
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def format_keys(keys: list[Key]) -> list[str]:
    """Aligned lines ``key  type  value  # doc``."""
    if not keys:
        return []
    rows = [(k.key, k.type, format_value(k.value), k.doc) for k in keys]
    wk = max(len(r[0]) for r in rows)
    wt = min(max(len(r[1]) for r in rows), 32)
    wv = min(max(len(r[2]) for r in rows), 24)
    return [f"{key:<{wk}}  {tp:<{wt}}  {val:<{wv}}{'  # ' + doc if doc else ''}".rstrip()
            for key, tp, val, doc in rows]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where there is nothing to say (a flag, no default) or
    the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default in ("", [])
                or "default" in text.lower() or isinstance(action, argparse._StoreConstAction)):
            return text
        return super()._get_help_string(action)


__all__ = ["Key", "config_keys", "field_docs", "filter_keys", "format_keys", "type_name", "HelpFormatter"]
