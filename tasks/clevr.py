"""``clevr_vqa``: CLEVR v1.0 visual question answering, read from the dataset's own layout.

Layout (the real CLEVR_v1.0 download, or the offline generator's output)::

    <root>/images/{split}/CLEVR_{split}_{:06d}.png
    <root>/questions/CLEVR_{split}_questions.json   {"questions": [{image_filename, question, answer,
                                                      question_family_index, program, ...}, ...]}
    <root>/scenes/CLEVR_{split}_scenes.json          (not needed to answer; checked for nothing)

Raw samples (one per question, in file order)::

    {"id": "clevr/val/17", "image": <PNG file bytes, undecoded>, "question": str, "answer": str,
     "family": int, "qtype": "count", "function": "count", "split": "val",
     "image_filename": "CLEVR_val_000003.png", "image_index": 3}

* ``qtype`` groups the program's outermost (last) function as Johnson et al. (2017) do: ``exist``,
  ``count``, ``compare_integer`` (equal_integer, less_than, greater_than), ``query_attribute``
  (query_{size,color,material,shape}), ``compare_attribute`` (equal_{size,color,material,shape}).
  ``function`` is the outermost function itself. Both program formats are read: CLEVR 1.0's
  ``{"function", "inputs", "value_inputs"}`` and the generator's ``{"type", "inputs", "side_inputs"}``
  (its fused ``filter_count``/``filter_exist`` map to count/exist).
* **Alpha.** CLEVR renders are RGBA PNGs. The task never decodes images: ``image`` holds the file bytes
  exactly as on disk, alpha included. Where alpha is dropped is the serializer's business, explicitly:
  ``pixels`` and the re-encoding modes of ``png``/``jpeg`` convert to RGB; ``png`` passthrough keeps the
  file (and its alpha channel) byte for byte.
* **Test split.** A split whose questions carry no answers at all (CLEVR's ``test``) yields samples
  without ``answer``; it can be serialized with ``prompt`` but not trained or scored on.
* **Bad data** (``on_bad_sample``): a missing image file, a question without its text, or a question
  without an answer in an answered split raise :class:`DataError` naming the file (``fail``), or are
  counted in ``task.skipped`` and logged (``skip``). A missing or malformed questions file always raises.
* **Default data.** With ``root`` empty, a CLEVR-format set is generated on first use with the offline
  generator (:mod:`tasks.clevr_synth`) into ``$OMNIBYTE_CACHE/clevr-synth-<params>`` (default cache
  ``~/.cache/omnibyte``), atomically (temporary folder + rename, under a file lock), then read.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omnibyte.errors import DataError

from .base import TASKS, Task, TaskConfig

log = logging.getLogger("omnibyte.tasks.clevr")

#: CLEVR's 28 answers, in a fixed order (the closed set for ranking and the CNN+LSTM classifier).
CLEVR_ANSWERS: tuple[str, ...] = (
    "yes", "no",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10",
    "gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow",
    "cube", "sphere", "cylinder",
    "rubber", "metal",
    "small", "large",
)

INDEX_CACHE_MIN_BYTES = 16 << 20  # questions files this large get a cached compact index
INDEX_FORMAT = 1
QTYPES: tuple[str, ...] = ("exist", "count", "compare_integer", "query_attribute", "compare_attribute")
_ATTRS = ("size", "color", "material", "shape")
_QTYPE_OF: dict[str, str] = {
    "exist": "exist", "filter_exist": "exist",
    "count": "count", "filter_count": "count",
    "equal_integer": "compare_integer", "less_than": "compare_integer", "greater_than": "compare_integer",
    **{f"query_{a}": "query_attribute" for a in _ATTRS},
    **{f"equal_{a}": "compare_attribute" for a in _ATTRS},
}


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
    return _QTYPE_OF.get(function, "other" if function else "unknown")


@dataclass(frozen=True)
class SynthDefaults:
    """The generated set made when ``root`` is empty (see :mod:`tasks.clevr_synth`)."""

    images: int = 2000  # divided among splits by the generator (val 15%, train the rest; see clevr_synth)
    questions_per_image: int = 10
    seed: int = 0
    size: tuple[int, int] = (480, 320)  # width, height: CLEVR's
    splits: tuple[str, ...] = ("train", "val")
    workers: int = 0  # rendering processes (0: one per CPU core, at most 16); the output does not depend on it


@dataclass(frozen=True)
class ClevrConfig(TaskConfig):
    families: tuple[int, ...] = ()  # keep only these question_family_index values (empty: all)
    question_types: tuple[str, ...] = ()  # keep these qtypes or outermost functions (empty: all)
    max_questions: int = 0  # per split, after filters: a seeded random subset (0: all)
    subsample_seed: int = 0
    eval_mode: Literal["auto", "generate", "rank", "both"] = "auto"  # auto: both (classify for classifiers)
    synth: SynthDefaults = field(default_factory=SynthDefaults)
    cache_dir: str = ""  # where the default set goes ("" -> $OMNIBYTE_CACHE or ~/.cache/omnibyte)


def cache_root(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("OMNIBYTE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "omnibyte"


@TASKS.register("clevr_vqa")
class ClevrVQA(Task):
    """CLEVR v1.0 visual question answering (real layout; generated on first use when root is empty)."""

    Config = ClevrConfig
    packing = "pad"
    answer_vocab = CLEVR_ANSWERS

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
            with _file_lock(cache.with_suffix(".lock")):
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
            if t not in QTYPES and t not in _QTYPE_OF:
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

    # --- samples ----------------------------------------------------------------------------------
    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        images = self.root / "images" / split
        for rec in self._load_index(split):
            path = images / rec["image_filename"]
            try:
                data = path.read_bytes()
            except OSError as e:
                self._bad(f"question {rec['qindex']} of split {split!r}: cannot read image {path}: "
                          f"{e.strerror or e}")
                continue
            yield self._sample(split, rec, data)

    def _sample(self, split: str, rec: dict[str, Any], image: bytes) -> dict[str, Any]:
        s = {
            "id": f"clevr/{split}/{rec['qindex']}",
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
    def evaluate(self, model: Any, serializer: Any, split: str, run_dir: Any = None, **kwargs: Any) -> dict:
        """VQA accuracy (overall, per question type, per family) and a confusion matrix.

        See :func:`tasks.vqa_eval.evaluate_vqa` for the keyword arguments (``mode`` generate|rank|both,
        default ``task.eval_mode``; ``max_samples``, ``batch_size``, ...). Results also go to ``run_dir/eval/``.
        """
        if not self.is_answered(split):
            raise DataError(f"CLEVR split {split!r} has no answers (like CLEVR's test split); "
                            f"evaluate on a split with answers, e.g. val")
        from .vqa_eval import evaluate_vqa

        kwargs.setdefault("mode", self.config.eval_mode)
        return evaluate_vqa(self, model, serializer, split, run_dir=run_dir, **kwargs)


def _parse_questions(qfile: Path, split: str) -> tuple[bool, list[list[Any]]]:
    """Read a CLEVR questions file into compact records (see :meth:`ClevrVQA._records`)."""
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
        if answered and q.get("answer") is None:
            records.append(["BAD", f"{where}: no answer (the split's other questions have one)"])
            continue
        fam = q.get("question_family_index")
        records.append([int(q.get("question_index", pos)), fname, q.get("image_index"), q["question"],
                        None if q.get("answer") is None else str(q["answer"]), int(fam) if fam is not None else -1,
                        program_function(q.get("program"))])
    return answered, records


# --- the default generated set ------------------------------------------------------------------


def default_set_dir(config: ClevrConfig) -> Path:
    s = config.synth
    w, h = s.size
    name = f"clevr-synth-n{s.images}-q{s.questions_per_image}-s{s.seed}-{w}x{h}-{'+'.join(s.splits)}"
    return cache_root(config.cache_dir) / name


def ensure_default_set(config: ClevrConfig) -> Path:
    """The default generated CLEVR-format set: made once (locked, atomic), then reused."""
    final = default_set_dir(config)
    done = final / ".complete"
    if done.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if done.is_file():  # another process made it while we waited
            return final
        try:
            from omnibyte.tasks import clevr_synth
        except ImportError as e:
            raise DataError(f"task.root is empty and the CLEVR-format generator is unavailable ({e}); "
                            f"set task.root to a CLEVR v1.0 folder") from None
        s = config.synth
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        _rmtree(tmp)
        log.warning("task.root is empty: generating a CLEVR-format set (%d images) into %s", s.images, final)
        import multiprocessing

        workers = s.workers or min(os.cpu_count() or 1, 16)
        if multiprocessing.current_process().daemon:  # e.g. inside a DataLoader worker: no child processes
            workers = 0
        clevr_synth.generate(str(tmp), images=s.images, questions_per_image=s.questions_per_image, seed=s.seed,
                             size=tuple(s.size), splits=tuple(s.splits), progress=True, workers=workers)
        (tmp / ".complete").write_text(json.dumps({"synth": {"images": s.images, "seed": s.seed,
                                                             "questions_per_image": s.questions_per_image,
                                                             "size": list(s.size), "splits": list(s.splits)}}))
        if final.exists():  # a partial folder from an older, unlocked attempt
            _rmtree(final)
        os.rename(tmp, final)
    return final


def _rmtree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


class _file_lock:
    """An exclusive advisory lock on ``path`` (no-op where fcntl is unavailable)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows)
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        return False
