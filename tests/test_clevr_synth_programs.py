"""CLEVR functional programs on a hand-built scene, with answers worked out by hand."""

from __future__ import annotations

import pytest

from omnibyte.tasks.clevr_synth import programs as P
from omnibyte.tasks.clevr_synth import questions as Q
from omnibyte.tasks.clevr_synth import templates as T
from omnibyte.tasks.clevr_synth.scene import relationships

# Ground directions as seen from a camera looking along +y: left = -x, behind = +y.
DIRS = {"left": (-1.0, 0.0, 0.0), "right": (1.0, 0.0, 0.0), "behind": (0.0, 1.0, 0.0), "front": (0.0, -1.0, 0.0)}


def _obj(size, color, material, shape, x, y):
    return {"size": size, "color": color, "material": material, "shape": shape, "3d_coords": [x, y, 0.5]}


OBJECTS = [
    _obj("large", "red", "metal", "cube", -2, 0),  # 0
    _obj("small", "blue", "rubber", "sphere", 0, 2),  # 1
    _obj("large", "blue", "rubber", "cylinder", 2, 0),  # 2
    _obj("small", "yellow", "metal", "sphere", 0, -2),  # 3
]
SCENE = {"objects": OBJECTS, "relationships": relationships(OBJECTS, DIRS)}


class Prog:
    """Builds a program in CLEVR v1.0 release spelling; each call returns the new node's index."""

    def __init__(self):
        self.nodes = []

    def __call__(self, fn, *inputs, values=()):
        self.nodes.append({"function": fn, "inputs": list(inputs), "value_inputs": list(values)})
        return len(self.nodes) - 1

    def unique(self, **attrs):
        i = self("scene")
        for a, v in attrs.items():
            i = self("filter_" + a, i, values=[v])
        return self("unique", i)

    def filt(self, **attrs):
        i = self("scene")
        for a, v in attrs.items():
            i = self("filter_" + a, i, values=[v])
        return i


def run(build):
    p = Prog()
    build(p)
    return P.answer(p.nodes, SCENE)


def test_relationships_of_hand_built_scene():
    rel = SCENE["relationships"]
    assert rel["left"][2] == [0, 1, 3]  # everything is left of the cylinder at x = 2
    assert rel["right"][0] == [1, 2, 3]
    assert rel["behind"][0] == [1]
    assert rel["front"][1] == [0, 2, 3]
    assert rel["left"][1] == [0]  # x differs by 2 > eps only for the cube


@pytest.mark.parametrize("build, expected", [
    (lambda p: p("count", p.filt(color="blue")), "2"),
    (lambda p: p("count", p.filt(shape="sphere")), "2"),
    (lambda p: p("count", p.filt(size="large", material="rubber")), "1"),
    (lambda p: p("count", p("scene")), "4"),
    (lambda p: p("count", p.filt(color="green")), "0"),
    (lambda p: p("exist", p.filt(color="green")), "no"),
    (lambda p: p("exist", p.filt(material="metal", shape="sphere")), "yes"),
    (lambda p: p("query_color", p.unique(shape="cube")), "red"),
    (lambda p: p("query_size", p.unique(color="yellow")), "small"),
    (lambda p: p("query_material", p.unique(shape="cylinder")), "rubber"),
    (lambda p: p("query_shape", p.unique(color="red")), "cube"),
    (lambda p: p("query_shape", p.unique(color="blue", size="small")), "sphere"),
])
def test_filter_count_exist_query(build, expected):
    assert run(build) == expected


@pytest.mark.parametrize("build, expected", [
    (lambda p: p("count", p("relate", p.unique(shape="cube"), values=["right"])), "3"),
    (lambda p: p("count", p("relate", p.unique(shape="cylinder"), values=["left"])), "3"),
    (lambda p: p("query_color", p("unique", p("relate", p.unique(color="red"), values=["behind"]))), "blue"),
    (lambda p: p("exist", p("relate", p.unique(color="blue", shape="sphere"), values=["behind"])), "no"),
    (lambda p: p("count", p("filter_shape", p("relate", p.unique(color="yellow"), values=["behind"]),
                            values=["sphere"])), "1"),
])
def test_relate(build, expected):
    assert run(build) == expected


@pytest.mark.parametrize("build, expected", [
    (lambda p: p("count", p("same_color", p.unique(color="blue", shape="sphere"))), "1"),
    (lambda p: p("count", p("same_size", p.unique(shape="cube"))), "1"),
    (lambda p: p("query_shape", p("unique", p("same_material", p.unique(shape="cylinder")))), "sphere"),
    (lambda p: p("exist", p("same_shape", p.unique(color="yellow"))), "yes"),
    (lambda p: p("exist", p("same_shape", p.unique(shape="cube"))), "no"),
])
def test_same_attribute_excludes_the_object_itself(build, expected):
    assert run(build) == expected


@pytest.mark.parametrize("build, expected", [
    (lambda p: p("equal_color", p("query_color", p.unique(shape="cylinder")),
                 p("query_color", p.unique(size="small", material="rubber"))), "yes"),
    (lambda p: p("equal_size", p("query_size", p.unique(shape="cube")),
                 p("query_size", p.unique(shape="cylinder"))), "yes"),
    (lambda p: p("equal_material", p("query_material", p.unique(shape="cube")),
                 p("query_material", p.unique(shape="cylinder"))), "no"),
    (lambda p: p("equal_shape", p("query_shape", p.unique(color="yellow")),
                 p("query_shape", p.unique(color="blue", size="small"))), "yes"),
    (lambda p: p("equal_integer", p("count", p.filt(color="blue")), p("count", p.filt(shape="sphere"))), "yes"),
    (lambda p: p("less_than", p("count", p.filt(material="metal")), p("count", p.filt(size="large"))), "no"),
    (lambda p: p("greater_than", p("count", p("scene")), p("count", p.filt(material="rubber"))), "yes"),
    (lambda p: p("less_than", p("count", p.filt(color="red")), p("count", p.filt(color="blue"))), "yes"),
])
def test_comparisons(build, expected):
    assert run(build) == expected


@pytest.mark.parametrize("build, expected", [
    (lambda p: p("count", p("union", p.filt(color="red"), p.filt(color="yellow"))), "2"),
    (lambda p: p("count", p("union", p.filt(color="blue"), p.filt(shape="sphere"))), "3"),
    (lambda p: p("count", p("intersect", p.filt(color="blue"), p.filt(shape="sphere"))), "1"),
    (lambda p: p("count", p("intersect", p("relate", p.unique(shape="cube"), values=["right"]),
                            p("relate", p.unique(shape="cylinder"), values=["left"]))), "2"),
])
def test_union_intersect(build, expected):
    assert run(build) == expected


def test_failed_unique_makes_the_program_invalid():
    p = Prog()
    p("query_shape", p.unique(color="blue"))  # two blue objects
    assert P.execute(p.nodes, SCENE)[-1] is P.INVALID
    with pytest.raises(ValueError, match="invalid"):
        P.answer(p.nodes, SCENE)
    p = Prog()
    p("count", p.filt(color="green"))
    p.nodes.append({"function": "unique", "inputs": [len(p.nodes) - 2], "value_inputs": []})
    assert P.execute(p.nodes, SCENE)[-1] is P.INVALID  # empty set


def test_generator_spelling_and_template_shorthands():
    nodes = [{"type": "scene", "inputs": []},
             {"type": "filter_count", "inputs": [0], "side_inputs": ["large", "", "", "thing"]}]
    assert P.answer(nodes, SCENE) == "2"
    nodes = [{"type": "scene", "inputs": []},
             {"type": "filter_unique", "inputs": [0], "side_inputs": ["", "red", "", "thing"]},
             {"type": "relate_filter_count", "inputs": [1], "side_inputs": ["right", "", "blue", "", "thing"]}]
    assert P.answer(nodes, SCENE) == "2"


def test_answers_are_clevrs_28():
    assert len(P.ANSWERS) == 28 and len(set(P.ANSWERS)) == 28


def test_degenerate_relation_is_detected():
    # "the thing right of the cube that is blue and a sphere": relate(right) keeps 1, 2, 3, but the
    # sphere filter alone already picks the small blue sphere, so the relation is redundant
    nodes = [{"type": "scene", "inputs": []},
             {"type": "filter_shape", "inputs": [0], "side_inputs": ["cube"]},
             {"type": "unique", "inputs": [1]},
             {"type": "relate", "inputs": [2], "side_inputs": ["right"]},
             {"type": "filter_color", "inputs": [3], "side_inputs": ["blue"]},
             {"type": "filter_shape", "inputs": [4], "side_inputs": ["sphere"]},
             {"type": "count", "inputs": [5]}]
    idx = P.SceneIndex(SCENE)
    assert T.is_degenerate(nodes, idx, 1)
    nodes[4]["side_inputs"] = ["yellow"]  # yellow sphere: in front, right of the cube too -> still redundant
    assert T.is_degenerate(nodes, idx, 1)
    nodes[3]["side_inputs"] = ["behind"]  # behind the cube: only the blue sphere; yellow -> 0 vs 1 overall
    assert not T.is_degenerate(nodes, idx, 0)


def test_instantiation_respects_constraints_and_balance():
    fams = T.load_templates()
    gen = Q.QuestionGenerator(fams, "test")
    for q in gen.questions_for(SCENE, 20):
        assert P.answer(q["program"], SCENE) == q["answer"]
        assert "<" not in q["question"] and "[" not in q["question"]
    counts = gen.answer_counts
    assert all(set(c) <= {True, False, *range(11), *P.COLORS, *P.SHAPES, *P.MATERIALS, *P.SIZES}
               for c in counts.values())


def test_speculated_candidates_give_the_same_questions_whatever_the_guesses():
    """What worker processes compute ahead (speculate, from stale or wrong guesses of the counts) changes
    the work, never the questions: the same as computing everything in order."""
    from omnibyte.tasks.clevr_synth.generate import _make_scene

    fams = T.load_templates()
    scenes = [_make_scene((3, "train", i, (96, 64), False, "")) for i in range(12)]
    plain = Q.QuestionGenerator(fams, "k")
    want = [plain.questions_for(s, 6) for s in scenes]
    for lag in (1, 3):  # hints taken `lag` images ahead, as the pool does
        gen = Q.QuestionGenerator(fams, "k")
        hints = {i: gen.hint(i, 6) for i in range(lag)}
        got = []
        for i, s in enumerate(scenes):
            got.append(gen.questions_for(s, 6, Q.speculate(fams, s, "k", 6, hints.pop(i))))
            if i + lag < len(scenes):
                hints[i + lag] = gen.hint(i + lag, 6)
        assert got == want, lag
    wrong = Q.QuestionGenerator(fams, "k")  # guesses that are plain wrong: all counts 50, no answers seen
    bad = ({f["family_index"]: 50 for f in fams}, {f["family_index"]: {} for f in fams})
    assert [wrong.questions_for(s, 6, Q.speculate(fams, s, "k", 6, bad)) for s in scenes] == want
