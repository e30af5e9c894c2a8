"""CLEVR functional programs: the vocabulary and an executor over a scene graph.

A program is a list of nodes; node ``i`` reads the outputs of the nodes listed in its ``inputs``
(always earlier ones). Two spellings of a node are accepted, since both occur in the wild:

- CLEVR v1.0 release files: ``{"function": "filter_color", "inputs": [0], "value_inputs": ["red"]}``
- CLEVR's generator and template files: ``{"type": "filter_color", "inputs": [0], "side_inputs": ["red"]}``

Inside the executor an ObjectSet is a Python int used as a bit mask over object indices (bit ``i`` set
= object ``i`` in the set), an Object is its index, attribute values are strings, Integer is ``int`` and
Bool is ``bool``. A failed ``unique`` (zero or several objects) makes the program invalid: its output,
and every output depending on it, is :data:`INVALID`.

The template-only shorthands of CLEVR's template files (``filter_unique``, ``filter_count``,
``relate_filter_exist``, ...) execute too, with empty strings / ``None`` / ``"thing"`` meaning "no
filter on this attribute".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# CLEVR 1.0's attribute vocabulary (the values of its metadata "types").
SHAPES = ("cube", "sphere", "cylinder")
COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SIZES = ("small", "large")
MATERIALS = ("rubber", "metal")
RELATIONS = ("left", "right", "behind", "front")
ATTRIBUTES = ("size", "color", "material", "shape")  # the order of CLEVR's <Z> <C> <M> <S>
VALUES = {"size": SIZES, "color": COLORS, "material": MATERIALS, "shape": SHAPES}
TYPE_VALUES = {"Size": SIZES, "Color": COLORS, "Material": MATERIALS, "Shape": SHAPES, "Relation": RELATIONS}

#: CLEVR's 28 answers.
ANSWERS = ("yes", "no", *(str(i) for i in range(11)), *COLORS, *SHAPES, *MATERIALS, *SIZES)

#: output type of each function (CLEVR's metadata "functions"), template-only ones included.
OUTPUT_TYPE = {
    "scene": "ObjectSet", "unique": "Object", "relate": "ObjectSet", "union": "ObjectSet",
    "intersect": "ObjectSet", "count": "Integer", "exist": "Bool",
    "equal_integer": "Bool", "less_than": "Bool", "greater_than": "Bool", "equal_object": "Bool",
    "filter": "ObjectSet", "filter_unique": "Object", "filter_count": "Integer", "filter_exist": "Bool",
    "relate_filter": "ObjectSet", "relate_filter_unique": "Object", "relate_filter_count": "Integer",
    "relate_filter_exist": "Bool",
}
for _a in ATTRIBUTES:
    OUTPUT_TYPE[f"filter_{_a}"] = "ObjectSet"
    OUTPUT_TYPE[f"same_{_a}"] = "ObjectSet"
    OUTPUT_TYPE[f"query_{_a}"] = _a.capitalize()
    OUTPUT_TYPE[f"equal_{_a}"] = "Bool"


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()


class SceneIndex:
    """Bit masks of one scene, built once and shared by every program run on it."""

    def __init__(self, scene: Mapping[str, Any]):
        objects = scene["objects"]
        self.n = len(objects)
        self.all = (1 << self.n) - 1
        self.attr = [{a: o[a] for a in ATTRIBUTES} for o in objects]
        self.by_value: dict[str, dict[str, int]] = {a: {v: 0 for v in VALUES[a]} for a in ATTRIBUTES}
        for i, o in enumerate(objects):
            for a in ATTRIBUTES:
                self.by_value[a][o[a]] = self.by_value[a].get(o[a], 0) | (1 << i)
        self.rel: dict[str, list[int]] = {}
        for name, lists in scene.get("relationships", {}).items():
            self.rel[name] = [sum(1 << j for j in related) for related in lists]
        self._filters: dict[tuple, int] | None = None

    def filter_masks(self) -> dict[tuple, int]:
        """Every non-empty (size, color, material, shape) filter, ``None`` = any, -> its object mask."""
        if self._filters is None:
            out: dict[tuple, int] = {}
            for i, at in enumerate(self.attr):
                vals = [at[a] for a in ATTRIBUTES]
                for m in range(16):
                    key = tuple(v if m >> k & 1 else None for k, v in enumerate(vals))
                    out[key] = out.get(key, 0) | (1 << i)
            self._filters = out
        return self._filters


def index_of(scene: Mapping[str, Any] | SceneIndex) -> SceneIndex:
    return scene if isinstance(scene, SceneIndex) else SceneIndex(scene)


def node_function(node: Mapping[str, Any]) -> str:
    return node["function"] if "function" in node else node["type"]


def node_values(node: Mapping[str, Any]) -> list:
    if "value_inputs" in node:
        return list(node["value_inputs"])
    return list(node.get("side_inputs", []))


def _filter(idx: SceneIndex, mask: int, values: Sequence[Any]) -> int:
    """Apply filters named by attribute values ('' / None / 'thing' = no filter)."""
    for v in values:
        if v in (None, "", "thing"):
            continue
        for a in ATTRIBUTES:
            if v in idx.by_value[a]:
                mask &= idx.by_value[a][v]
                break
        else:
            raise ValueError(f"unknown attribute value {v!r}")
    return mask


def _unique(mask: int) -> Any:
    if mask == 0 or mask & (mask - 1):
        return INVALID
    return mask.bit_length() - 1


def run_node(fn: str, args: Sequence[Any], values: Sequence[Any], idx: SceneIndex) -> Any:
    """Output of one node given its inputs' outputs (already checked not INVALID)."""
    if fn == "scene":
        return idx.all
    if fn.startswith("filter_") and fn[7:] in VALUES:
        return _filter(idx, args[0], values)
    if fn == "unique":
        return _unique(args[0])
    if fn == "relate":
        return idx.rel[values[0]][args[0]]
    if fn == "union":
        return args[0] | args[1]
    if fn == "intersect":
        return args[0] & args[1]
    if fn == "count":
        return args[0].bit_count()
    if fn == "exist":
        return args[0] != 0
    if fn.startswith("query_"):
        return idx.attr[args[0]][fn[6:]]
    if fn.startswith("same_"):
        a = fn[5:]
        return idx.by_value[a][idx.attr[args[0]][a]] & ~(1 << args[0])
    if fn.startswith("equal_") and fn[6:] in VALUES or fn in ("equal_integer", "equal_object"):
        return args[0] == args[1]
    if fn == "less_than":
        return args[0] < args[1]
    if fn == "greater_than":
        return args[0] > args[1]
    # template-only shorthands
    if fn.startswith("relate_filter"):
        base = _filter(idx, idx.rel[values[0]][args[0]], values[1:])
        return _finish(fn[len("relate_filter"):], base)
    if fn.startswith("filter"):
        return _finish(fn[len("filter"):], _filter(idx, args[0], values))
    raise ValueError(f"unknown CLEVR function {fn!r}")


def _finish(suffix: str, mask: int) -> Any:
    if suffix == "":
        return mask
    if suffix == "_unique":
        return _unique(mask)
    if suffix == "_count":
        return mask.bit_count()
    if suffix == "_exist":
        return mask != 0
    raise ValueError(f"unknown suffix {suffix!r}")


def execute(program: Sequence[Mapping[str, Any]], scene: Mapping[str, Any] | SceneIndex,
            outputs: list | None = None) -> list:
    """Outputs of every node (internal representation; INVALID once a ``unique`` fails).

    ``outputs`` may hold the already-computed outputs of a prefix of ``program``; they are extended.
    """
    idx = index_of(scene)
    out = list(outputs) if outputs else []
    for node in program[len(out):]:
        args = [out[i] for i in node["inputs"]]
        if any(a is INVALID for a in args):
            out.append(INVALID)
            continue
        out.append(run_node(node_function(node), args, node_values(node), idx))
    return out


def to_answer(value: Any) -> str:
    """CLEVR's answer string for a terminal output: yes/no, a count, or an attribute value."""
    if value is INVALID:
        raise ValueError("program is invalid on this scene (a unique failed)")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return str(value)


def answer(program: Sequence[Mapping[str, Any]], scene: Mapping[str, Any] | SceneIndex) -> str:
    """Execute ``program`` on ``scene`` and return CLEVR's answer string."""
    return to_answer(execute(program, scene)[-1])


def expand_objects(mask: int) -> list[int]:
    """Sorted object indices of an ObjectSet mask."""
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def to_release(node: Mapping[str, Any]) -> dict:
    """A node in CLEVR v1.0 release spelling (function / inputs / value_inputs)."""
    return {"inputs": list(node["inputs"]), "function": node_function(node),
            "value_inputs": [v for v in node_values(node)]}
