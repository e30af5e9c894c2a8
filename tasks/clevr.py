"""``clevr_vqa``: CLEVR v1.0 visual question answering, read from the dataset's own layout.

Layout (the real CLEVR_v1.0 download, or the offline generator's output)::

    <root>/images/{split}/CLEVR_{split}_{:06d}.png
    <root>/questions/CLEVR_{split}_questions.json   {"questions": [{image_filename, question, answer,
                                                      question_family_index, program, ...}, ...]}
    <root>/scenes/CLEVR_{split}_scenes.json          (not needed to answer; checked for nothing)

Raw samples (one per question, in file order)::

    {"id": "clevr/val/17", "question_index": 17, "image": <PNG file bytes, undecoded>, "question": str,
     "answer": str, "family": int, "qtype": "count", "function": "count", "split": "val",
     "image_filename": "CLEVR_val_000003.png", "image_index": 3}

* ``qtype`` groups the program's outermost (last) function as Johnson et al. (2017) do: ``exist``,
  ``count``, ``compare_integer`` (equal_integer, less_than, greater_than), ``query_attribute``
  (query_{size,color,material,shape}), ``compare_attribute`` (equal_{size,color,material,shape}).
  ``function`` is the outermost function itself. Both program formats are read: CLEVR 1.0's
  ``{"function", "inputs", "value_inputs"}`` and the generator's ``{"type", "inputs", "side_inputs"}``
  (its fused ``filter_count``/``filter_exist`` map to count/exist). Parsing: :mod:`tasks.clevr_questions`.
* **Answer vocabulary.** The closed set for ranking and classifier heads is ``task.answers``; empty means
  :func:`vqa_vocabulary` of the training split's answers (CLEVR's 28 in canonical order when all answers
  are CLEVR's, else the sorted distinct answers), so a CLEVR-layout set with other answers (CLEVR-Humans,
  Super-CLEVR, a lab's own) is ranked over its own answers. A run resolves it once from its training data
  and records it in its config. Evaluation reports accuracy over all questions and over the answerable
  ones (gold answer in the set), and counts the unanswerable ones.
* **Alpha.** CLEVR renders are RGBA PNGs. The task never decodes images: ``image`` holds the file bytes
  exactly as on disk, alpha included. Where alpha is dropped is the serializer's business, explicitly:
  ``pixels`` and the re-encoding modes of ``png``/``jpeg`` convert to RGB; ``png`` passthrough keeps the
  file (and its alpha channel) byte for byte.
* **Test split.** A split whose questions carry no answers at all (CLEVR's ``test``) yields samples
  without ``answer``; it can be serialized with ``prompt`` but not trained or scored on.
* **Bad data** (``on_bad_sample``): a missing image file, an image path outside ``<root>/images/<split>/``
  (absolute, or escaping with ``..``), a question without its text, or a question without an answer in an
  answered split raise :class:`DataError` naming the question (``fail``), or are counted in ``task.skipped``
  and logged (``skip``). A missing or malformed questions file, and two questions of a split with the same
  ``question_index`` (ids must be unique), always raise.
* **Default data.** With ``root`` empty, a CLEVR-format set is generated on first use with the offline
  generator (:mod:`tasks.clevr_synth`) into ``$OMNIBYTE_CACHE/clevr-synth-<params>`` (default cache
  ``~/.cache/omnibyte``), atomically (temporary folder + rename, under a file lock), then read
  (:mod:`tasks.clevr_default`).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omnibyte.errors import DataError

from .base import TASKS, Task, TaskConfig
from .clevr_default import SynthDefaults, cache_root, default_set_dir, ensure_default_set, file_lock
from .clevr_questions import (
    CLEVR_ANSWERS,
    QTYPE_OF,
    QTYPES,
    parse_questions,
    program_function,
    question_type,
    vqa_vocabulary,
)

log = logging.getLogger("omnibyte.tasks.clevr")

INDEX_CACHE_MIN_BYTES = 16 << 20  # questions files this large get a cached compact index
INDEX_FORMAT = 2  # 2: image paths confined to images/<split>/, duplicate question ids refused
_parse_questions = parse_questions  # looked up here at call time (tests replace it to count parses)


@dataclass(frozen=True)
class ClevrConfig(TaskConfig):
    families: tuple[int, ...] = ()  # keep only these question_family_index values (empty: all)
    question_types: tuple[str, ...] = ()  # keep these qtypes or outermost functions (empty: all)
    max_questions: int = 0  # per split, after filters: a seeded random subset (0: all)
    subsample_seed: int = 0
    answers: tuple[str, ...] = ()  # the closed answer set (empty: vqa_vocabulary of the training split's answers)
    eval_mode: Literal["auto", "generate", "rank", "both"] = "auto"  # auto = both
    synth: SynthDefaults = field(default_factory=SynthDefaults)
    cache_dir: str = ""  # where the default set goes ("" -> $OMNIBYTE_CACHE or ~/.cache/omnibyte)

    def __post_init__(self):
        if len(set(self.answers)) != len(self.answers):
            dup = sorted({a for a in self.answers if self.answers.count(a) > 1})
            raise ValueError(f"task.answers: duplicate answers {dup}")


@TASKS.register("clevr_vqa")
class ClevrVQA(Task):
    """CLEVR v1.0 visual question answering (real layout; generated on first use when root is empty)."""

    Config = ClevrConfig
    store_neutral = Task.store_neutral | {"answers", "eval_mode", "cache_dir"}  # scoring; where the default set is

    def store_neutral_for(self, recorded: dict) -> frozenset[str]:
        """``synth`` too unless both the store and this run use the generated default set (empty ``task.root``):
        the generator's settings shape only that set's samples (another root is logged, not refused)."""
        return self.store_neutral | ({"synth"} if self.config.root or recorded.get("root") else set())
    generators = {"clevr-synth": "omnibyte.tasks.clevr_synth:main"}  # `omnibyte prepare clevr-synth ...`
    packing = "pad"

    def __init__(self, config: ClevrConfig | None = None):
        super().__init__(config)
        self._root: Path | None = None
        self._index: dict[str, list[dict[str, Any]]] = {}
        self._answered: dict[str, bool] = {}

    # --- where the data is -----------------------------------------------------------------------
    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = Path(self.config.root).expanduser() if self.config.root else ensure_default_set(self.config)
            if not (self._root / "questions").is_dir():
                raise DataError(
                    f"CLEVR root {str(self._root)!r} has no questions/ folder; expected the CLEVR v1.0 layout "
                    f"(images/<split>/, questions/CLEVR_<split>_questions.json, scenes/). Point task.root at "
                    f"the unpacked CLEVR_v1.0 folder, or leave it empty to generate a CLEVR-format set")
        return self._root

    def splits(self) -> list[str]:
        found = sorted(p.name[len("CLEVR_"):-len("_questions.json")]
                       for p in (self.root / "questions").glob("CLEVR_*_questions.json"))
        order = {"train": 0, "val": 1, "test": 2}
        return sorted(found, key=lambda s: (order.get(s, 3), s))

    def questions_file(self, split: str) -> Path:
        return self.root / "questions" / f"CLEVR_{split}_questions.json"

    # --- index ------------------------------------------------------------------------------------
    def _records(self, split: str) -> tuple[bool, list[list[Any]]]:
        """(answered, records) of a questions file: one compact record per question, in file order:
        ``[question_index, image_filename, image_index, question, answer, family, function]``, or
        ``["BAD", reason]``. Files of INDEX_CACHE_MIN_BYTES or more (CLEVR's train questions are hundreds
        of MB) are parsed once, under a lock, and the records cached; later loads, other ranks and
        DataLoader workers read the small cache instead."""
        qfile = self.questions_file(split)
        if not qfile.is_file():
            have = ", ".join(self.splits()) or "none"
            raise DataError(f"CLEVR split {split!r}: no file {qfile} (splits found: {have})")
        st = qfile.stat()
        if st.st_size < INDEX_CACHE_MIN_BYTES:
            return _parse_questions(qfile, split)
        import hashlib

        key = hashlib.sha1(f"{INDEX_FORMAT}|{qfile.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        cache = cache_root(self.config.cache_dir) / "clevr-index" / f"{split}-{key[:16]}.json"
        if not cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(cache.with_suffix(".lock")):
                if not cache.is_file():
                    log.info("indexing %s (once; cached in %s)", qfile, cache)
                    answered, recs = _parse_questions(qfile, split)
                    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps({"answered": answered, "records": recs}))
                    os.replace(tmp, cache)
        data = json.loads(cache.read_text())
        return data["answered"], data["records"]

    def _load_index(self, split: str) -> list[dict[str, Any]]:
        if split in self._index:
            return self._index[split]
        cfg = self.config
        want_fam = set(cfg.families)
        want_type = set(cfg.question_types)
        for t in want_type:
            if t not in QTYPES and t not in QTYPE_OF:
                raise DataError(f"task.question_types: unknown {t!r}; use one of {', '.join(QTYPES)} "
                                f"or an outermost function such as query_color")
        answered, records = self._records(split)
        self._answered[split] = answered
        index = []
        for r in records:
            if r[0] == "BAD":
                self._bad(r[1])
                continue
            qindex, image_filename, image_index, question, answer, family, function = r
            rec = {"qindex": qindex, "image_filename": image_filename, "image_index": image_index,
                   "question": question, "answer": answer, "family": family, "function": function,
                   "qtype": question_type(function)}
            if want_fam and family not in want_fam:
                continue
            if want_type and rec["qtype"] not in want_type and function not in want_type:
                continue
            index.append(rec)
        if cfg.max_questions and len(index) > cfg.max_questions:
            rng = random.Random(f"{cfg.subsample_seed}/{split}")
            keep = sorted(rng.sample(range(len(index)), cfg.max_questions))
            index = [index[i] for i in keep]
        self._index[split] = index
        return index

    def _bad(self, message: str) -> None:
        if self.config.on_bad_sample == "fail":
            raise DataError(message + " (set task.on_bad_sample=skip to count and skip such samples)")
        self.skipped += 1
        log.warning("skipping bad sample: %s", message)

    def is_answered(self, split: str) -> bool:
        self._load_index(split)
        return self._answered[split]

    def num_samples(self, split: str) -> int:
        return len(self._load_index(split))

    # --- answer vocabulary ------------------------------------------------------------------------
    def answers_of(self, split: str) -> tuple[str, ...]:
        """The distinct answers of ``split`` (after the task's filters), sorted; from the question index only
        (no image is read). ``()`` for a split without answers."""
        return tuple(sorted({r["answer"] for r in self._load_index(split) if r["answer"] is not None}))

    def split_meta(self, split: str) -> Iterator[dict[str, Any]]:
        """The metadata of every question of ``split`` (answer, family, qtype, question), from the index only."""
        for r in self._load_index(split):
            yield {"id": f"clevr/{split}/{r['qindex']}", "answer": r["answer"], "family": r["family"],
                   "qtype": r["qtype"], "question": r["question"]}

    @staticmethod
    def vocabulary_from(answers: Iterable[str]) -> tuple[str, ...]:
        """The closed answer set for answers found in training data: :func:`vqa_vocabulary`."""
        return vqa_vocabulary(answers)

    @property
    def answer_vocab(self) -> tuple[str, ...]:
        """The closed answer set (ranking candidates, classifier classes): ``task.answers`` when set (a run
        always sets it, from its training data), else ``vqa_vocabulary`` of the ``train`` split's answers."""
        if self.config.answers:
            return tuple(self.config.answers)
        return vqa_vocabulary(self.answers_of("train"))

    # --- samples ----------------------------------------------------------------------------------
    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        for _, sample in self.samples_at(split, range(len(self._load_index(split)))):
            yield sample

    def samples_at(self, split: str, positions: Iterable[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """The questions at ``positions`` of the split's index (reading only their images)."""
        images = self.root / "images" / split
        index = self._load_index(split)
        for i in positions:
            rec = index[i]
            path = images / rec["image_filename"]
            try:
                data = path.read_bytes()
            except OSError as e:
                self._bad(f"question {rec['qindex']} of split {split!r}: cannot read image {path}: "
                          f"{e.strerror or e}")
                continue
            yield i, self._sample(split, rec, data)

    def _sample(self, split: str, rec: dict[str, Any], image: bytes) -> dict[str, Any]:
        s = {
            "id": f"clevr/{split}/{rec['qindex']}",
            "question_index": rec["qindex"],
            "image": image,
            "question": rec["question"],
            "family": rec["family"],
            "qtype": rec["qtype"],
            "function": rec["function"],
            "split": split,
            "image_filename": rec["image_filename"],
            "image_index": rec["image_index"],
        }
        if rec["answer"] is not None:
            s["answer"] = rec["answer"]
        return s

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model: Any, items: Iterable[Any], *, split: str, out_dir: Any = None,
                 **options: Any) -> dict:
        """VQA accuracy (overall and over answerable questions, per question type, per family) and a
        confusion matrix, over ``items`` (:class:`omnibyte.data.items.EvalItem` of ``split``).

        The closed set is :attr:`answer_vocab`. ``options``: ``mode`` (auto|generate|rank|both, default
        ``task.eval_mode``), ``batch_size``, ``max_new_bytes``, ``progress`` (see
        :func:`tasks.vqa_eval.evaluate_vqa`; ``step``, ``checkpoint``: what is evaluated). Results also go to
        ``out_dir`` (``vqa_<split>_<step>.json`` and ``vqa_<split>_<step>_predictions.jsonl``).
        """
        from .vqa_eval import evaluate_vqa

        options.setdefault("mode", self.config.eval_mode)
        return evaluate_vqa(model, items, split=split, labels=self.answer_vocab, out_dir=out_dir, **options)

    def answer(self, model: Any, prompt: Any, *, max_new_bytes: int = 0, generate: bool = True) -> dict:
        """Rank the closed set (:attr:`answer_vocab`) and generate greedily, as evaluation does."""
        from .vqa_eval import answer_one

        return answer_one(model, prompt, self.answer_vocab, max_new_bytes=max_new_bytes, generate=generate)

    def report(self, results: dict) -> list[str]:
        from .vqa_eval import vqa_report

        return vqa_report(results)


__all__ = ["CLEVR_ANSWERS", "QTYPES", "ClevrConfig", "ClevrVQA", "SynthDefaults", "cache_root", "default_set_dir",
           "ensure_default_set", "program_function", "question_type", "vqa_vocabulary"]
