"""CLEVR questions files: parsing into compact records, question types, and the answer vocabulary.

Pure functions used by :mod:`tasks.clevr` (``clevr_vqa``); importable on their own (no images are read).

* :func:`parse_questions` reads ``CLEVR_<split>_questions.json`` into one compact record per question, in
  file order. A question that cannot be used becomes a ``["BAD", reason]`` record (the task applies
  ``on_bad_sample`` to it): no question text, neither ``image_filename`` nor ``image_index``, no answer in
  an answered split, a non-integer ``question_index``, or an image path outside ``images/<split>/``
  (absolute, or escaping it with ``..``). Two usable questions with the same ``question_index`` are a
  :class:`DataError` naming both positions: ids must be unique (predictions files, per-question results).
* :func:`vqa_vocabulary` is the closed answer set for ranking and classifier heads, derived from answers.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omnibyte.errors import DataError

#: CLEVR's 28 answers, in their canonical order (the closed set whenever a dataset's answers are all CLEVR's).
CLEVR_ANSWERS: tuple[str, ...] = (
    "yes", "no",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10",
    "gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow",
    "cube", "sphere", "cylinder",
    "rubber", "metal",
    "small", "large",
)

QTYPES: tuple[str, ...] = ("exist", "count", "compare_integer", "query_attribute", "compare_attribute")
_ATTRS = ("size", "color", "material", "shape")
QTYPE_OF: dict[str, str] = {
    "exist": "exist", "filter_exist": "exist", "relate_filter_exist": "exist",  # template macros: programs in
    "count": "count", "filter_count": "count", "relate_filter_count": "count",  # template form end in these
    "equal_integer": "compare_integer", "less_than": "compare_integer", "greater_than": "compare_integer",
    **{f"query_{a}": "query_attribute" for a in _ATTRS},
    **{f"equal_{a}": "compare_attribute" for a in _ATTRS},
}


def vqa_vocabulary(answers: Iterable[str]) -> tuple[str, ...]:
    """The closed answer set for ``answers`` (e.g. a training split's): CLEVR's 28 in their canonical order
    when every answer is one of CLEVR's, else the sorted distinct answers. No answers give ``()``."""
    distinct = {str(a) for a in answers}
    if not distinct:
        return ()
    if distinct <= set(CLEVR_ANSWERS):
        return CLEVR_ANSWERS
    return tuple(sorted(distinct))


def program_function(program: Any) -> str:
    """The outermost (last) function of a CLEVR program, in either format; ``""`` when there is none."""
    if not isinstance(program, list) or not program:
        return ""
    node = program[-1]
    if isinstance(node, str):  # "query_color" or the string form "filter_color[red]"
        name = node
    elif isinstance(node, dict):
        name = node.get("function") or node.get("type") or ""
    else:
        return ""
    return str(name).split("[", 1)[0]


def question_type(function: str) -> str:
    """Johnson et al.'s question type for an outermost function (``"other"`` if it is none of them)."""
    return QTYPE_OF.get(function, "other" if function else "unknown")


def confined_image_path(fname: str) -> str | None:
    """``fname`` normalised, relative to ``images/<split>/``; None when it is absolute, empty or escapes it."""
    if not fname or fname.startswith(("/", "\\")) or (len(fname) > 1 and fname[1] == ":"):
        return None
    norm = posixpath.normpath(fname.replace("\\", "/"))
    if norm in (".", "..") or norm.startswith("../") or norm.startswith("/"):
        return None
    return norm


def parse_questions(qfile: Path, split: str) -> tuple[bool, list[list[Any]]]:
    """(answered, records) of a CLEVR questions file: one record per question, in file order:
    ``[question_index, image_filename, image_index, question, answer, family, function]``, or
    ``["BAD", reason]`` (see the module docstring)."""
    try:
        with open(qfile, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{qfile}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        raise DataError(f"{qfile}: expected an object with a 'questions' list (CLEVR v1.0 format)")
    answered = any(isinstance(q, dict) and q.get("answer") is not None for q in questions)
    records: list[list[Any]] = []
    seen: dict[int, int] = {}  # question_index -> file position of its first question
    for pos, q in enumerate(questions):
        where = f"{qfile} question {pos}"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
            records.append(["BAD", f"{where}: no question text"])
            continue
        fname = q.get("image_filename")
        if not isinstance(fname, str):
            if not isinstance(q.get("image_index"), int):
                records.append(["BAD", f"{where}: neither image_filename nor image_index"])
                continue
            fname = f"CLEVR_{split}_{q['image_index']:06d}.png"
        confined = confined_image_path(fname)
        if confined is None:
            records.append(["BAD", f"{where}: image_filename {fname!r} is outside images/{split}/ "
                                   f"(absolute, or escaping it with '..')"])
            continue
        if answered and q.get("answer") is None:
            records.append(["BAD", f"{where}: no answer (the split's other questions have one)"])
            continue
        qindex = q.get("question_index", pos)
        if isinstance(qindex, str) and qindex.strip().isdigit():
            qindex = int(qindex)
        if isinstance(qindex, bool) or not isinstance(qindex, int):
            records.append(["BAD", f"{where}: question_index {qindex!r} is not an integer"])
            continue
        if qindex in seen:
            raise DataError(f"{qfile}: questions {seen[qindex]} and {pos} have the same question_index {qindex}; "
                            f"question ids must be unique within a split (fix or drop the duplicate)")
        seen[qindex] = pos
        fam = q.get("question_family_index")
        records.append([qindex, confined, q.get("image_index"), q["question"],
                        None if q.get("answer") is None else str(q["answer"]), int(fam) if fam is not None else -1,
                        program_function(q.get("program"))])
    return answered, records
