"""Question families: CLEVR 1.0 template files, and turning a template plus a scene into questions.

A template file is a JSON list of families, each ``{"text": [...], "nodes": [...], "params": [...],
"constraints": [...]}`` (CLEVR 1.0's format). Families are numbered globally: files sorted by name,
then position in the file; that number is ``question_family_index``.

Instantiation follows CLEVR's generator (``instantiate_templates_dfs``): a depth-first search over
partial programs that fills the template's parameters in a random order, executing each partial program
on the scene and pruning as soon as it

- is invalid (a ``unique`` that does not pick exactly one object),
- breaks a constraint (``NULL``: parameter left empty; ``NEQ``: two parameters differ when both set;
  ``OUT_NEQ``: two nodes give different outputs),
- at the end: would make its answer over-represented for this family (rejection on the running answer
  counts, which balances answers per family), or is degenerate (a ``relate`` whose removal does not
  change the answer).

Filter parameters come from the filters that actually occur in the scene (so ``filter_unique`` names an
object unambiguously), plus a share of empty filters for count/exist families so that "0"/"no" answers
occur. Unlike CLEVR, the search is capped at ``max_states`` partial programs per family and image so a
hopeless family cannot stall generation.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import programs as P

DEFAULT_TEMPLATES_DIR = Path(__file__).parent / "templates"

#: words CLEVR may use for a value (ours; the text of every question picks one at random).
SYNONYMS = {
    "thing": ["thing", "object"],
    "sphere": ["sphere", "ball"],
    "cube": ["cube", "block"],
    "cylinder": ["cylinder"],
    "large": ["large", "big"],
    "small": ["small", "tiny"],
    "metal": ["metal", "metallic", "shiny"],
    "rubber": ["rubber", "matte"],
    "left": ["left of", "to the left of", "on the left side of"],
    "right": ["right of", "to the right of", "on the right side of"],
    "behind": ["behind"],
    "front": ["in front of"],
}

_SPECIAL = {"filter", "filter_unique", "filter_count", "filter_exist",
            "relate_filter", "relate_filter_unique", "relate_filter_count", "relate_filter_exist"}


def load_templates(templates_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every family under ``templates_dir`` (default: ours), each with ``family_index`` and ``filename``."""
    d = Path(templates_dir) if templates_dir else DEFAULT_TEMPLATES_DIR
    files = sorted(p for p in d.iterdir() if p.suffix == ".json") if d.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no template *.json files in {d}")
    families = []
    for path in files:
        with open(path) as f:
            items = json.load(f)
        for i, t in enumerate(items):
            families.append(dict(t, family_index=len(families), filename=path.name, index_in_file=i))
    return families


def answer_domain(template: Mapping[str, Any]) -> list:
    """Possible answers of a family (internal values), for balancing."""
    t = P.OUTPUT_TYPE[template["nodes"][-1]["type"]]
    if t == "Bool":
        return [True, False]
    if t == "Integer":
        return list(range(11))
    return list(P.TYPE_VALUES[t])


def _filter_options(idx: P.SceneIndex, input_mask: int) -> dict[tuple, int]:
    return {k: m & input_mask for k, m in idx.filter_masks().items()}


def _add_empty(options: dict, rng: random.Random, n: int) -> None:
    domains = [list(P.VALUES[a]) + [None] for a in P.ATTRIBUTES]
    target, tries = len(options) + n, 0
    while len(options) < target and tries < 50 * (n + 1):
        tries += 1
        key = tuple(rng.choice(v) for v in domains)
        if key not in options:
            options[key] = 0


def _relate_filter_options(idx: P.SceneIndex, obj: int, rng: random.Random, unique: bool,
                           include_zero: bool, trivial_frac: float = 0.1) -> dict[tuple, int]:
    options, trivial = {}, {}
    for rel in P.RELATIONS:
        related = idx.rel[rel][obj]
        for key, filtered in idx.filter_masks().items():
            inter = related & filtered
            if unique and inter.bit_count() != 1:
                continue
            if not include_zero and inter == 0:
                continue
            (trivial if inter == filtered else options)[(rel, key)] = inter
    n_trivial = int(round(len(options) * trivial_frac / (1 - trivial_frac)))
    items = list(trivial.items())
    rng.shuffle(items)
    options.update(items[:n_trivial])
    return options


def _check_constraints(template: Mapping, types: Mapping, state: dict) -> bool:
    vals, outs, imap = state["vals"], state["outputs"], state["input_map"]
    for c in template.get("constraints", []):
        kind = c["type"]
        if kind == "NEQ":
            v1, v2 = vals.get(c["params"][0]), vals.get(c["params"][1])
            if v1 is not None and v2 is not None and v1 != v2:
                return False
        elif kind == "NULL":
            p = c["params"][0]
            v = vals.get(p)
            if v is not None and v not in ("", "thing"):
                return False
        elif kind == "OUT_NEQ":
            i, j = (imap.get(x) for x in c["params"])
            if i is not None and j is not None and outs[i] == outs[j]:
                return False
        else:
            raise ValueError(f"unknown constraint type {kind!r}")
    return True


def is_degenerate(nodes: list[dict], idx: P.SceneIndex, answer: Any) -> bool:
    """A question whose answer stays the same when one of its ``relate`` nodes is replaced by the
    whole scene: the relation is redundant (CLEVR's degeneracy test)."""
    for k, node in enumerate(nodes):
        if node["type"] == "relate":
            alt = nodes[:k] + [{"type": "scene", "inputs": []}] + nodes[k + 1:]
            out = P.execute(alt, idx)[-1]
            if out is not P.INVALID and out == answer:
                return True
    return False


def accept_answer(counts: dict, answer: Any) -> bool:
    """CLEVR's rejection rule: skip answers already far more frequent than the others."""
    if answer not in counts:
        return False
    ordered = sorted(counts.values())
    median = max(ordered[len(ordered) // 2], 5)
    cur = counts[answer]
    if len(ordered) > 1 and cur > 1.1 * ordered[-2]:
        return False
    return cur <= 5.0 * median


def _leaves(template: Mapping[str, Any], idx: P.SceneIndex, rng: random.Random, max_states: int):
    """Complete programs of ``template`` on the scene, in the search's depth-first order (a generator): valid
    (every ``unique`` picks one object) and within the constraints, degenerate ones included. At most
    ``max_states`` partial programs are executed. The order depends on ``rng`` and the scene alone."""
    types = {p["name"]: p["type"] for p in template["params"]}
    tnodes = template["nodes"]
    states = [{"nodes": [{"type": tnodes[0]["type"], "inputs": []}], "vals": {}, "input_map": {0: 0},
               "next": 1, "outputs": []}]
    popped = 0
    # depth-first, children generated lazily: a stack of iterators over each level's children
    stack = [iter(states)]
    while stack and popped < max_states:
        state = next(stack[-1], None)
        if state is None:
            stack.pop()
            continue
        popped += 1
        state["outputs"] = P.execute(state["nodes"], idx, state["outputs"])
        ans = state["outputs"][-1]
        if ans is P.INVALID or not _check_constraints(template, types, state):
            continue
        if state["next"] == len(tnodes):
            yield state
            continue
        stack.append(_expand(template, types, tnodes[state["next"]], state, idx, rng))


def _question(template: Mapping[str, Any], idx: P.SceneIndex, state: dict) -> dict | None:
    """A complete program as a question (nodes, vals, answer), or None when it is degenerate."""
    ans = state["outputs"][-1]
    # the expanded program: relate_filter_* template nodes expand into relate nodes (testing the template's own
    # nodes skipped every relate_filter family, ~1 in 4 of their questions degenerate)
    if any(n["type"] == "relate" for n in state["nodes"]) and is_degenerate(state["nodes"], idx, ans):
        return None
    return {"nodes": state["nodes"], "vals": state["vals"], "answer": ans}


def first_accepted(template: Mapping[str, Any], idx: P.SceneIndex, rng: random.Random, answer_counts: dict,
                   max_states: int = 800) -> dict | None:
    """The question of ``template`` on the scene: the first complete, non-degenerate program of the search
    whose answer the running ``answer_counts`` accept (see :func:`accept_answer`), or None."""
    for state in _leaves(template, idx, rng, max_states):
        if accept_answer(answer_counts, state["outputs"][-1]):
            q = _question(template, idx, state)
            if q is not None:
                return q
    return None


def candidates(template: Mapping[str, Any], idx: P.SceneIndex, rng: random.Random, answer_counts: Mapping,
               max_states: int = 800) -> tuple[list[dict], bool]:
    """What :func:`first_accepted` needs, computed from a guess of the answer counts: the first non-degenerate
    complete program of each answer, in search order, up to the first whose answer ``answer_counts`` (a
    guess) accept; and whether the search ended before that (True) or stopped there (False).
    :func:`first_accepted` with the same rng state and the true counts gives the first candidate whose answer
    the true counts accept; when none is and the search did not end, the question (if any) lies beyond."""
    out: list[dict] = []
    seen: list = []
    for state in _leaves(template, idx, rng, max_states):
        ans = state["outputs"][-1]
        if ans in seen:
            continue
        q = _question(template, idx, state)
        if q is None:
            continue
        seen.append(ans)
        out.append(q)
        if accept_answer(answer_counts, ans):
            return out, False
    return out, True


def instantiate(template: Mapping[str, Any], idx: P.SceneIndex, rng: random.Random,
                answer_counts: dict, max_states: int = 800) -> list[dict]:
    """[the question of ``template`` on the scene] or []; counts its answer in ``answer_counts``."""
    q = first_accepted(template, idx, rng, answer_counts, max_states)
    if q is None:
        return []
    answer_counts[q["answer"]] += 1
    return [q]


def _expand(template: Mapping, types: Mapping, tnode: Mapping, state: dict, idx: P.SceneIndex,
            rng: random.Random):
    """Children of a partial program (a generator): every way to instantiate the next template node,
    in a random order."""
    n_before = len(state["nodes"])
    kind = tnode["type"]
    if kind in _SPECIAL:
        src = state["input_map"][tnode["inputs"][0]]
        src_out = state["outputs"][src]
        if kind.startswith("relate_filter"):
            options = _relate_filter_options(idx, src_out, rng, unique=kind.endswith("unique"),
                                             include_zero=kind.endswith(("count", "exist")))
        else:
            options = _filter_options(idx, src_out)
            if kind == "filter":
                options.pop((None, None, None, None), None)
            if kind == "filter_unique":
                options = {k: v for k, v in options.items() if v.bit_count() == 1}
            else:
                if kind == "filter_exist":
                    n_add = len(options)
                else:  # filter_count, filter: as many empty filters as singletons
                    n_add = sum(1 for v in options.values() if v.bit_count() == 1)
                _add_empty(options, rng, n_add)
        keys = list(options)
        rng.shuffle(keys)
        for key in keys:
            new, vals = [], dict(state["vals"])
            cur = src
            side = list(tnode["side_inputs"])
            if kind.startswith("relate"):
                rel, key = key
                vals[side[0]] = rel
                new.append({"type": "relate", "inputs": [cur], "side_inputs": [rel]})
                cur = n_before + len(new) - 1
                side = side[1:]
            for name, val in zip(side, key):
                if val is None:
                    vals[name] = "thing" if types[name] == "Shape" else ""
                    continue
                vals[name] = val
                new.append({"type": "filter_" + types[name].lower(), "inputs": [cur], "side_inputs": [val]})
                cur = n_before + len(new) - 1
            for suffix in ("unique", "count", "exist"):
                if kind.endswith(suffix):
                    new.append({"type": suffix, "inputs": [cur]})
                    cur = n_before + len(new) - 1
            imap = dict(state["input_map"])
            imap[state["next"]] = cur
            yield ({"nodes": state["nodes"] + new, "vals": vals, "input_map": imap,
                             "next": state["next"] + 1, "outputs": state["outputs"]})
    elif tnode.get("side_inputs"):
        if len(tnode["side_inputs"]) != 1:
            raise ValueError(f"template node {tnode} has several side inputs; not supported")
        name = tnode["side_inputs"][0]
        domain = list(P.TYPE_VALUES[types[name]])
        rng.shuffle(domain)
        for val in domain:
            imap = dict(state["input_map"])
            imap[state["next"]] = n_before
            node = {"type": kind, "inputs": [imap[i] for i in tnode["inputs"]], "side_inputs": [val]}
            yield ({"nodes": state["nodes"] + [node], "vals": dict(state["vals"], **{name: val}),
                             "input_map": imap, "next": state["next"] + 1, "outputs": state["outputs"]})
    else:
        imap = dict(state["input_map"])
        imap[state["next"]] = n_before
        node = {"type": kind, "inputs": [imap[i] for i in tnode["inputs"]]}
        yield ({"nodes": state["nodes"] + [node], "vals": state["vals"], "input_map": imap,
                         "next": state["next"] + 1, "outputs": state["outputs"]})


def render_text(template: Mapping[str, Any], vals: Mapping[str, str], rng: random.Random) -> str:
    """The question text: a random phrasing, parameters replaced (with synonyms), optional words."""
    text = rng.choice(template["text"])
    for name in sorted(vals, key=lambda n: (-len(n), n)):
        val = vals[name]
        if val in SYNONYMS:
            val = rng.choice(SYNONYMS[val])
        text = text.replace(name, val)
    out, i = [], 0
    while i < len(text):  # [optional words]: kept or dropped with probability 1/2
        j = text.find("[", i)
        if j < 0:
            out.append(text[i:])
            break
        k = text.index("]", j)
        out.append(text[i:j])
        if rng.random() < 0.5:
            out.append(text[j + 1:k])
        i = k + 1
    text = " ".join("".join(out).split())
    text = text.replace(" ?", "?").replace(" ,", ",")
    return _other_heuristic(text, vals)


def _other_heuristic(text: str, vals: Mapping[str, str]) -> str:
    """Drop 'other' when the two objects named are told apart by their descriptions (as CLEVR does)."""
    if " other " not in text and " another " not in text:
        return text
    if set(vals) != {"<Z>", "<C>", "<M>", "<S>", "<Z2>", "<C2>", "<M2>", "<S2>"}:
        return text
    for a, b in (("<Z>", "<Z2>"), ("<C>", "<C2>"), ("<M>", "<M2>"), ("<S>", "<S2>")):
        v1, v2 = vals[a], vals[b]
        if v1 not in ("", "thing") and v2 not in ("", "thing") and v1 != v2:
            return text.replace(" other ", " ").replace(" another ", " a ")
    return text
