"""clevr_vqa: the real CLEVR v1.0 layout (hand-built fixture), filters, subsampling, bad data, default set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from omnibyte.errors import DataError
from omnibyte.registry import TASKS
from omnibyte.tasks.clevr import (
    CLEVR_ANSWERS,
    ClevrVQA,
    default_set_dir,
    program_function,
    question_type,
    vqa_vocabulary,
)

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"


def build(**kw) -> ClevrVQA:
    return TASKS.build({"name": "clevr_vqa", "root": str(kw.pop("root", FIXTURE)), **kw})


def test_reads_layout_and_samples():
    t = build()
    assert t.splits() == ["train", "val", "test"]
    samples = list(t.samples("train"))
    assert len(samples) == t.num_samples("train") == 8
    s = samples[0]
    assert s["id"] == "clevr/train/0" and s["question"] == "How many cubes are there?" and s["answer"] == "1"
    assert s["question_index"] == 0
    assert s["family"] == 40 and s["qtype"] == "count" and s["function"] == "count"
    # image file bytes, undecoded and untouched (RGBA PNG: colour type 6 in IHDR)
    disk = (FIXTURE / "images" / "train" / "CLEVR_train_000000.png").read_bytes()
    assert s["image"] == disk and s["image"][25] == 6
    assert {x["answer"] for x in samples} <= set(CLEVR_ANSWERS)
    assert list(t.samples("train")) == samples  # fixed order


def test_question_types_follow_johnson():
    t = build()
    by_q = {s["question"]: s["qtype"] for split in ("train", "val") for s in t.samples(split)}
    assert by_q["Is there a blue thing?"] == "exist"
    assert by_q["Are there more cubes than spheres?"] == "compare_integer"
    assert by_q["What color is the sphere?"] == "query_attribute"
    assert by_q["Is the cylinder made of the same material as the sphere?"] == "compare_attribute"
    # both program formats; fused generator nodes; the string form
    assert program_function([{"function": "scene"}, {"function": "less_than"}]) == "less_than"
    assert program_function([{"type": "scene"}, {"type": "filter_exist", "side_inputs": ["red"]}]) == "filter_exist"
    assert question_type("filter_exist") == "exist" and question_type("filter_count") == "count"
    assert question_type("relate_filter_exist") == "exist" and question_type("relate_filter_count") == "count"
    assert question_type(program_function(["scene", "query_shape[x]"])) == "query_attribute"
    assert question_type("equal_integer") == "compare_integer" and question_type("equal_shape") == "compare_attribute"
    assert question_type("") == "unknown"


def test_test_split_has_no_answers():
    t = build()
    samples = list(t.samples("test"))
    assert len(samples) == 2 and all("answer" not in s for s in samples)
    assert not t.is_answered("test") and t.is_answered("val")
    assert t.answers_of("test") == ()


def test_answer_vocabulary():
    """CLEVR's 28 (canonical order) when every answer is CLEVR's, else the data's own sorted answers."""
    assert vqa_vocabulary(["yes", "2", "cube"]) == CLEVR_ANSWERS and len(CLEVR_ANSWERS) == 28
    assert vqa_vocabulary(["yes", "teal", "2", "teal"]) == ("2", "teal", "yes")
    assert vqa_vocabulary([]) == ()
    t = build()
    assert t.answers_of("train") == ("0", "1", "blue", "gray", "no", "yes")
    assert t.answer_vocab == CLEVR_ANSWERS  # the fixture's answers are CLEVR's
    assert t.vocabulary_from(["b", "a"]) == ("a", "b")
    assert build(answers=["no", "yes"]).answer_vocab == ("no", "yes")  # task.answers wins (a run sets it)
    with pytest.raises(ValueError, match="duplicate answers"):
        build(answers=["no", "no"])


def test_filters_and_seeded_subsampling():
    assert [s["family"] for s in build(families=[89]).samples("train")] == [89, 89]
    assert {s["qtype"] for s in build(question_types=["exist", "compare_integer"]).samples("train")} == {
        "exist", "compare_integer"}
    assert [s["function"] for s in build(question_types=["query_color"]).samples("val")] == ["query_color"]
    a = [s["id"] for s in build(max_questions=3, subsample_seed=1).samples("train")]
    b = [s["id"] for s in build(max_questions=3, subsample_seed=1).samples("train")]
    c = [s["id"] for s in build(max_questions=3, subsample_seed=2).samples("train")]
    assert a == b and len(a) == 3 and a == sorted(a, key=lambda i: int(i.rsplit("/", 1)[1]))
    assert c != a
    with pytest.raises(DataError, match="unknown 'colour'"):
        build(question_types=["colour"]).num_samples("train")


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "clevr"
    shutil.copytree(FIXTURE, root)
    return root


def test_missing_image_fail_or_skip(tmp_path):
    root = _copy(tmp_path)
    (root / "images" / "train" / "CLEVR_train_000001.png").unlink()
    with pytest.raises(DataError, match="CLEVR_train_000001.png"):
        list(build(root=root).samples("train"))
    t = build(root=root, on_bad_sample="skip")
    assert len(list(t.samples("train"))) == 5 and t.skipped == 3


def _edit_questions(root: Path, split: str, edit) -> None:
    qfile = root / "questions" / f"CLEVR_{split}_questions.json"
    data = json.loads(qfile.read_text())
    edit(data["questions"])
    qfile.write_text(json.dumps(data))


@pytest.mark.parametrize("bad", ["../../questions/CLEVR_val_questions.json", "/etc/hostname",
                                 "../val/CLEVR_val_000000.png", "sub/../../train/CLEVR_train_000000.png"])
def test_image_paths_are_confined_to_the_split_folder(tmp_path, bad):
    root = _copy(tmp_path)

    def edit(qs):
        qs[1]["image_filename"] = bad

    _edit_questions(root, "train", edit)
    with pytest.raises(DataError, match=r"question 1: image_filename .* is outside images/train/"):
        list(build(root=root).samples("train"))
    t = build(root=root, on_bad_sample="skip")
    got = list(t.samples("train"))
    assert len(got) == 7 and t.skipped == 1 and "clevr/train/1" not in {s["id"] for s in got}
    # a path that stays inside the split folder is fine
    _edit_questions(root, "train", lambda qs: qs[1].update(image_filename="./x/../CLEVR_train_000000.png"))
    assert len(list(build(root=root).samples("train"))) == 8


def test_duplicate_question_ids_are_refused(tmp_path):
    root = _copy(tmp_path)
    _edit_questions(root, "val", lambda qs: qs[3].update(question_index=1))
    with pytest.raises(DataError, match="questions 1 and 3 have the same question_index 1"):
        build(root=root, on_bad_sample="skip").num_samples("val")
    _edit_questions(root, "val", lambda qs: qs[3].update(question_index="three"))
    with pytest.raises(DataError, match="question 3: question_index 'three' is not an integer"):
        build(root=root).num_samples("val")


def test_malformed_json_names_the_file(tmp_path):
    root = _copy(tmp_path)
    qfile = root / "questions" / "CLEVR_val_questions.json"
    qfile.write_text(qfile.read_text()[:-40])
    with pytest.raises(DataError, match=r"CLEVR_val_questions.json: malformed JSON at line"):
        list(build(root=root, on_bad_sample="skip").samples("val"))


def test_missing_answer_in_answered_split(tmp_path):
    root = _copy(tmp_path)
    qfile = root / "questions" / "CLEVR_val_questions.json"
    data = json.loads(qfile.read_text())
    del data["questions"][2]["answer"]
    qfile.write_text(json.dumps(data))
    with pytest.raises(DataError, match="question 2: no answer"):
        list(build(root=root).samples("val"))
    t = build(root=root, on_bad_sample="skip")
    assert [s["id"] for s in t.samples("val")] == ["clevr/val/0", "clevr/val/1", "clevr/val/3"] and t.skipped == 1


def test_actionable_errors_for_wrong_root(tmp_path):
    with pytest.raises(DataError, match="no questions/ folder.*CLEVR v1.0 layout"):
        build(root=tmp_path).splits()
    with pytest.raises(DataError, match=r"no file .*CLEVR_dev_questions.json \(splits found: train, val, test\)"):
        list(build().samples("dev"))


def test_default_set_is_generated_once_atomically(tmp_path, monkeypatch):
    """With root empty the generator is called once into the cache (temp folder + rename), then reused."""
    import omnibyte.tasks

    # the set's folder name reads GENERATOR_VERSION from the real submodule: import it before the package is faked
    # (in a full run another test has imported it already; alone it was missing)
    import omnibyte.tasks.clevr_synth.generate  # noqa: F401

    calls = []

    def fake_generate(out_dir, images, questions_per_image, seed, size, splits, progress, workers):
        calls.append((images, questions_per_image, seed, size, splits))
        assert ".tmp-" in Path(out_dir).name
        shutil.copytree(FIXTURE, out_dir)

    fake = type("M", (), {"generate": staticmethod(fake_generate)})
    monkeypatch.setitem(__import__("sys").modules, "omnibyte.tasks.clevr_synth", fake)
    monkeypatch.setattr(omnibyte.tasks, "clevr_synth", fake, raising=False)
    monkeypatch.setenv("OMNIBYTE_CACHE", str(tmp_path / "cache"))
    t = TASKS.build({"name": "clevr_vqa", "synth": {"images": 6, "questions_per_image": 2, "seed": 3}})
    assert t.num_samples("val") == 4
    target = default_set_dir(t.config)
    assert t.root == target and target.parent == tmp_path / "cache" and (target / ".complete").is_file()
    assert calls == [(6, 2, 3, (480, 320), ("train", "val"))]
    again = TASKS.build({"name": "clevr_vqa", "synth": {"images": 6, "questions_per_image": 2, "seed": 3}})
    assert again.num_samples("train") == 8 and len(calls) == 1
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_large_question_files_are_indexed_once(tmp_path, monkeypatch):
    import omnibyte.tasks.clevr as clevr_mod

    root = _copy(tmp_path)
    monkeypatch.setattr(clevr_mod, "INDEX_CACHE_MIN_BYTES", 0)
    monkeypatch.setenv("OMNIBYTE_CACHE", str(tmp_path / "cache"))
    first = [s["id"] for s in build(root=root).samples("val")]
    assert len(list((tmp_path / "cache" / "clevr-index").glob("val-*.json"))) == 1
    parse = clevr_mod._parse_questions
    monkeypatch.setattr(clevr_mod, "_parse_questions", lambda *a: pytest.fail("parsed again"))
    t = build(root=root, question_types=["exist"])
    assert [s["id"] for s in t.samples("val")] == ["clevr/val/1"] and t.is_answered("val")
    assert [s["id"] for s in build(root=root).samples("val")] == first
    monkeypatch.setattr(clevr_mod, "_parse_questions", parse)
    qfile = root / "questions" / "CLEVR_val_questions.json"
    data = json.loads(qfile.read_text())
    data["questions"] = data["questions"][:2]
    qfile.write_text(json.dumps(data))  # a changed file gets a fresh index
    assert build(root=root).num_samples("val") == 2


def test_reads_the_generators_output(tmp_path):
    """A CLEVR-layout set these tests never saw (the offline generator's) loads without code changes."""
    pytest.importorskip("omnibyte.tasks.clevr_synth")
    from omnibyte.cli import main
    from omnibyte.tasks.clevr import QTYPES

    out = tmp_path / "synth"
    assert main(["prepare", "clevr-synth", "--out", str(out), "--images", "6", "--questions-per-image", "4",
                 "--size", "96x64", "--seed", "1", "--no-progress"]) == 0
    t = build(root=out)
    assert t.splits() == ["train", "val"]
    samples = [s for split in t.splits() for s in t.samples(split)]
    assert len(samples) >= 12 and all(s["image"][:8] == b"\x89PNG\r\n\x1a\n" for s in samples)
    assert {s["answer"] for s in samples} <= set(CLEVR_ANSWERS)
    assert {s["qtype"] for s in samples} <= set(QTYPES) and all(s["family"] >= 0 for s in samples)


def test_eval_subset_is_spread_over_the_split_and_counts_only_its_own_skips(tmp_path):
    """eval.max_samples took the first N questions (CLEVR lists ~10 per image: a few images, few families) and
    the skip count then included every bad record of the whole split; now N positions spread over the split by a
    seeded rule (recorded), and only the chosen samples' skips are counted. max_samples=0 is the whole split."""
    import copy

    from omnibyte.data.items import eval_items
    from omnibyte.data.sources import subset_positions
    from omnibyte.registry import SERIALIZERS
    from omnibyte.runconfig import DataConfig

    root = _copy(tmp_path)

    def edit(qs):
        extra = [copy.deepcopy(qs[0]) for _ in range(3)]
        for k, q in enumerate(extra):
            q["question_index"] = 10 + k
        del extra[0]["answer"], extra[1]["answer"]  # two bad records (no answer): not samples of the split
        extra[2]["image_filename"] = "CLEVR_val_000009.png"  # a sample whose image is missing
        qs.extend(extra)

    _edit_questions(root, "val", edit)
    task = build(root=root, on_bad_sample="skip")
    ser = SERIALIZERS.build({"name": "qa", "image": {"name": "png"}})
    assert subset_positions(5, 2) == [3, 4]  # the rule: seeded, fixed; position 4 is the missing image
    stats, subset = {}, {}
    got = [it.id for it in eval_items(DataConfig(), task, ser, "val", max_samples=2, stats=stats, subset=subset)]
    assert got == ["clevr/val/3"] and stats == {"task_skipped": 1}
    assert subset == {"rule": "spread", "seed": 0, "n": 2, "of": 5}
    stats, subset = {}, {}
    got = [it.id for it in eval_items(DataConfig(), task, ser, "val", stats=stats, subset=subset)]
    assert got == [f"clevr/val/{i}" for i in range(4)] and stats == {"task_skipped": 3}  # the whole split
    assert subset["rule"] == "all"
