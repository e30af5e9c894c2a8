"""``omnibyte robustness``: a trained run scored on clean and corrupted copies of its eval split.

Each copy is scored by :func:`omnibyte.run.evaluate_run` itself, with the run's serializer wrapped by
:class:`CorruptingSerializer` (text and image-file corruptions edit the raw sample before the run's own
serializer; image-byte corruptions edit its output), so a corrupted row goes through exactly the pipeline of
``omnibyte eval`` and the clean row *is* ``omnibyte eval``'s result on the same split and samples.

Per row:

* every run: ``bpb`` (and ``bpb/<modality>``), the run's loss-weighted bits per byte over its eval rows;
* PG19-type runs (task results with ``word_ppl``): ``text_bpb`` = the task's total nats over the **corrupted**
  text bytes (what the model read), and ``word_ppl = exp(total nats / words of the CLEAN text)``: the corrupted
  text's likelihood spread over the clean text's words, so every row is normalised by the same count (a
  corruption that inserts characters makes the text longer and costs nats; it does not add words);
* VQA runs (task results with ``accuracy``): ``accuracy`` (the task's main mode) and ``accuracy_answerable``;
  and ``image_bpb``: the mean bits over **all** image bytes of the eval rows, whatever their loss weight, with
  ``image_loss_weight`` (the loss weight those bytes carry). A run whose loss gives image bytes no weight
  (``serializer.loss=answer``, the CLEVR configs' default) was never trained to predict them: its
  ``image_bpb`` stays in the JSON but the readable table and the plot leave it out and say why;
* ``delta_<metric>``: the row's value minus the clean row's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ..answers import result_files
from ..config import ConfigError
from ..errors import DataError
from .corruptions import (
    CORRUPTIONS,
    IMAGE,
    TEXT,
    Corruption,
    corrupt_image_file,
    corrupt_stream,
    corrupt_text,
    parse,
    rng_for,
)

DEFAULT_TEXT = ("drop:0.05", "drop:0.3", "repeat:0.05", "repeat:0.3", "swap:0.05", "swap:0.3", "uppercase:0.05",
                "uppercase:0.3", "antspeak", "random_case")
DEFAULT_IMAGE = ("image_drop:0.001", "image_drop:0.01", "image_flip:0.001", "image_flip:0.01", "image_swap:0.001",
                 "image_swap:0.01", "jpeg:30", "jpeg:10", "noise:0", "noise:16", "blank")
IMAGE_SERIALIZERS = ("png", "jpeg", "pixels")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run's samples offer to corrupt: the text field (``None``: none) and the image field."""

    serializer: str
    text_field: str | None
    image_field: str | None
    corruptions: tuple[Corruption, ...]

    def allowed(self) -> tuple[str, ...]:
        return (TEXT if self.text_field else ()) + (IMAGE if self.image_field else ())


def plan_for(run, specs: list[str] | tuple[str, ...] | None = None) -> Plan:
    """The corruptions of ``specs`` (default: all that apply to the run) checked against the run's serializer."""
    cfg = run.config
    name = cfg.serializer.name
    ser = run.serializer
    if cfg.data.source == "h5":
        raise ConfigError(f"{run.run_dir}: data.source=h5 holds pre-serialized streams; robustness corrupts raw "
                          f"samples before serialization, so it needs a run on data.source=task or shards")
    if name == "utf8":
        text_field, image_field = ser.config.field, None
    elif name == "qa":
        order = tuple(ser.config.order)
        text_field = ser.config.question_field if "question" in order else None
        image_field = ser.image.config.field if "image" in order else None
    elif name in IMAGE_SERIALIZERS:
        text_field, image_field = None, ser.config.field
    else:
        raise ConfigError(f"serializer {name!r}: robustness knows where the text and images are for "
                          f"utf8, qa, {', '.join(IMAGE_SERIALIZERS)}")
    plan = Plan(name, text_field, image_field, ())
    defaulted = specs is None or not list(specs)
    if defaulted:
        specs = (DEFAULT_TEXT if text_field else ()) + (DEFAULT_IMAGE if image_field else ())
    chosen = [parse(s) for s in specs]
    allowed = plan.allowed()
    for c in chosen:
        if c.name not in allowed:
            what = "text" if c.name in TEXT else "images"
            raise ConfigError(f"corruption {c.label!r} needs {what}, and this run's serializer {name!r} "
                              f"has none; corruptions for this run: {', '.join(allowed)}")
    if not run.model.stream_meta.per_token_losses:  # e.g. the CNN+LSTM: it decodes the image from the stream
        bytewise = [c.label for c in chosen if c.layer == "image_bytes"]
        if defaulted:
            chosen = [c for c in chosen if c.layer != "image_bytes"]
        elif bytewise:
            raise ConfigError(f"corruption(s) {', '.join(bytewise)}: model {cfg.model.name!r} is not a byte model "
                              f"(no per-token losses: it decodes the image from the stream, like the CNN+LSTM), "
                              f"and bytes dropped, flipped or swapped inside an image file may leave nothing to "
                              f"decode; file-level corruptions (jpeg:Q, noise:SIGMA, blank) apply")
    labels = [c.label for c in chosen]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"corruption(s) given twice: {', '.join(dup)}")
    return dataclasses.replace(plan, corruptions=tuple(chosen))


class CorruptingSerializer:
    """The run's serializer with one corruption applied, seeded per sample id (see the package docstring).
    ``config`` is the wrapped serializer's: stores and buckets are checked against the run's own config."""

    def __init__(self, inner, corruption: Corruption, plan: Plan, seed: int):
        self.inner, self.corruption, self.plan, self.seed = inner, corruption, plan, seed
        self.config = inner.config
        self.questions: dict[str, str] = {}  # qa runs: sample id -> the corrupted question the model read

    def __getattr__(self, name):  # prompt(), name, ... of the wrapped serializer
        return getattr(self.inner, name)

    def __call__(self, sample):
        c = self.corruption
        sid = sample.get("id")
        if sid is None or str(sid) == "":
            raise DataError(f"corruption {c.label}: a sample without an id (the corruption is seeded per id)")
        # image corruptions are drawn per image file when the sample names one (CLEVR's image_filename): every
        # question about an image sees the same corrupted image, as with one damaged file in the wild
        key = f"image:{sample['image_filename']}" if c.layer != "text" and sample.get("image_filename") else str(sid)
        rng = rng_for(self.seed, c, key)
        if c.layer == "image_bytes":
            return corrupt_stream(self.inner(sample), c, rng)
        field = self.plan.text_field if c.layer == "text" else self.plan.image_field
        if field not in sample:
            raise DataError(f"sample {sid!r}: corruption {c.label}: no {field!r} field")
        value = sample[field]
        s = dict(sample)
        if c.layer == "text":
            if not isinstance(value, str):
                raise DataError(f"sample {sid!r}: corruption {c.label}: field {field!r} is not decoded text "
                                f"({type(value).__name__}; e.g. a PG19 book that is not valid UTF-8)")
            s[field] = corrupt_text(value, c, rng)
            if self.plan.serializer == "qa":
                self.questions[str(sid)] = s[field]
        else:
            s[field] = corrupt_image_file(value, c, rng, str(sid))
        return self.inner(s)


class ImageBits:
    """``visit(batch, nll)`` of :func:`~omnibyte.run.evaluate_run`'s pass: the nats of every image byte (modality
    IMAGE, id < 256) of the eval rows, whatever its loss weight, and the loss weight they carry; :meth:`result`
    gives their mean in bits."""

    def __init__(self):
        self.nats, self.count, self.weight = 0.0, 0, 0.0

    def __call__(self, batch, nll) -> None:
        from ..vocab import NUM_BYTES, Modality

        keep = ((batch.modality == int(Modality.IMAGE)) & (batch.tokens < NUM_BYTES)).to(nll.device)
        self.nats += float(nll.double()[keep].sum())
        self.count += int(keep.sum())
        self.weight += float(batch.loss_mask.to(nll.device).double()[keep].sum())

    def result(self, rows: dict) -> dict[str, Any]:
        return {"image_bpb": self.nats / self.count / math.log(2) if self.count else float("nan"),
                "image_bytes": self.count, "image_loss_weight": self.weight,
                **({"image_rows": dict(rows)} if rows else {})}


def _row(label: str, res: dict[str, Any], img: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"corruption": label, "bpb": res.get("bpb")}
    row.update({k: v for k, v in res.items() if k.startswith("bpb/")})
    task = res.get("task") or {}
    if "word_ppl" in task:
        row.update(text_bpb=task["bpb"], total_nats=task["total_nats"], num_bytes=task["num_bytes"],
                   num_books=task.get("num_books"))
    if "accuracy" in task:
        mode = task.get("main_mode")
        row.update(accuracy=task["accuracy"], accuracy_answerable=task.get("accuracy_answerable"),
                   num_questions=task.get("num_samples"), mode=mode, by_qtype=task.get(f"by_qtype_{mode}"))
    if img is not None:
        row.update(img)
    if res.get("skipped"):
        row["skipped"] = res["skipped"]
    if res.get("bpb_rows"):  # streams cropped to data.seq_len (or skipped) in the bpb pass: a lengthened question
        row["bpb_rows"] = dict(res["bpb_rows"])
    row["detail"] = res.get("results_file")
    return row


def _show_corrupted_questions(path: Path, questions: dict[str, str]) -> None:
    """The task writes each question's text from the clean sample; in a corrupted row's predictions file the
    ``question`` is the corrupted text the model read (``question_clean`` keeps the original)."""
    if not path.is_file():
        return
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if str(rec.get("id")) in questions:
            rec = {**rec, "question_clean": rec.get("question", ""), "question": questions[str(rec["id"])]}
        lines.append(json.dumps(rec, ensure_ascii=False))
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")


def headline(rows: list[dict]) -> list[str]:
    """The metrics a table shows, in order, present in the clean row (not ``image_bpb`` of a run never trained
    to predict image bytes: :func:`untrained_image_bytes`)."""
    keys = ["text_bpb", "clean_byte_bpb", "word_ppl", "accuracy", "image_bpb", "bpb"]
    clean = rows[0]
    out = [k for k in keys if clean.get(k) is not None and not (k == "image_bpb" and untrained_image_bytes(rows))]
    if "text_bpb" in out:
        out.remove("bpb")  # the task's sliding-window text bpb is the headline of a text run
    return out


def untrained_image_bytes(rows: list[dict]) -> bool:
    """True when the clean rows' image bytes carry no loss weight: the run never learned to predict them."""
    return rows[0].get("image_bytes", 0) > 0 and rows[0].get("image_loss_weight") == 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_robustness(run, split: str | None = None, *, corruptions=None, seed: int = 0, limit: int | None = None,
                   out: str | Path | None = None, progress: bool = True, log=None) -> dict[str, Any]:
    """Score ``run`` clean and under each corruption; returns (and writes to ``out``) the table as JSON."""
    from ..run import evaluate_run

    plan = plan_for(run, corruptions)
    cfg = run.config
    split = split or cfg.eval.split
    n = cfg.eval.max_samples if limit is None else int(limit)
    if n < 0:
        raise ConfigError(f"--limit must be >= 0 (0: the whole split), got {n}")
    # one folder per (split, step, seed, sample count): a later call with another seed or --limit writes beside it,
    # so the "detail" paths in an earlier call's JSON keep pointing at that call's own records
    key = f"{split}_{run.step}_seed{seed}_n{n}"
    detail = run.run_dir / "eval" / "robustness" / key
    # the table: named by the same key; another corruption set under that key is refused before any scoring
    # (the name once had no seed, --limit or set, so a second call replaced the first call's table)
    path = Path(out) if out else run.run_dir / "eval" / f"robustness_{key}.json"
    labels = ["clean", *(c.label for c in plan.corruptions)]
    if path.is_file():  # --out FILE too: its table is not replaced by another set's
        try:
            before = [r.get("corruption") for r in json.loads(path.read_text()).get("rows", [])]
        except (ValueError, OSError, AttributeError):
            before = None
        if before != labels:
            raise ConfigError(f"{path} holds a table of {before or 'unreadable rows'}, not of {labels}: this call "
                              f"would replace it; pass {'another ' if out else ''}--out FILE for this one (or remove "
                              f"that file)")
    rows: list[dict[str, Any]] = []
    clean_words = None
    for c in (None, *plan.corruptions):
        label = "clean" if c is None else c.label
        if log is not None:
            log.info("robustness %s: %s", split, label)
        ser = run.serializer if c is None else CorruptingSerializer(run.serializer, c, plan, seed)
        variant = dataclasses.replace(run, serializer=ser)
        # image bits from the bpb pass's own forward (a model without per-token losses has none)
        img = ImageBits() if plan.image_field and run.model.stream_meta.per_token_losses else None
        res = evaluate_run(variant, split, max_samples=n, per_token=False, task_metrics=True, progress=progress,
                           out_dir=detail / label.replace(":", "_"), visit=img)
        if c is None:
            clean_words = (res.get("task") or {}).get("num_words")
        elif ser.questions:
            _show_corrupted_questions(result_files(detail / label.replace(":", "_"), split, run.step)[1],
                                      ser.questions)
        rows.append(_row(label, res, img.result(res.get("bpb_rows") or {}) if img is not None else None))
    clean_bytes = rows[0].get("num_bytes")
    for r in rows:
        if "total_nats" in r and clean_words is not None:
            x = r["total_nats"] / clean_words if clean_words else None
            r["word_ppl"] = float("nan") if x is None else math.exp(x) if x < 700 else float("inf")
            r["clean_words"] = clean_words
            # beside word_ppl, on the same footing: the nats over the clean text's bytes (drop scores fewer bytes,
            # so both fall with it; text_bpb, over the corrupted bytes, does not)
            r["clean_byte_bpb"] = r["total_nats"] / (clean_bytes * math.log(2)) if clean_bytes else float("nan")
            r["clean_bytes"] = clean_bytes
    clean = rows[0]
    _pair_with_clean(rows, detail, split, run.step, log)
    for r in rows[1:]:
        count = "num_books" if "num_books" in clean else "num_questions" if "num_questions" in clean else None
        if count and r.get(count) != clean.get(count):  # e.g. on_bad_sample=skip dropped corrupted samples
            r["warning"] = (f"{r.get(count)} samples scored against {clean.get(count)} clean "
                            f"(skipped: {r.get('skipped') or {}}); this row does not compare the same samples")
            if log is not None:
                log.warning("robustness %s: %s", r["corruption"], r["warning"])
        for key, what in (("bpb_rows", "bpb"), ("image_rows", "image_bpb")):
            mine, theirs = r.get(key) or {}, clean.get(key) or {}
            if mine != theirs:  # overlong_cropped / overlong_skipped: not the same bytes as the clean row's
                note = (f"{what} pass: eval streams over data.seq_len {mine} against {theirs} clean (cropped: their "
                        f"tails unscored; skipped: not scored): this row's {what} is not over the same bytes")
                r["warning"] = f"{r['warning']}; {note}" if r.get("warning") else note
                if log is not None:
                    log.warning("robustness %s: %s", r["corruption"], note)
        for k in headline(rows):
            if _finite(r.get(k)) and _finite(clean.get(k)):
                r[f"delta_{k}"] = r[k] - clean[k]
    result = {
        "run": str(run.run_dir), "checkpoint": str(run.checkpoint), "which": run.which, "step": run.step,
        "split": split, "seed": seed, "max_samples": n, "serializer": plan.serializer,
        "text_field": plan.text_field, "image_field": plan.image_field,
        "normalisation": {
            "bpb": "the run's loss-weighted bits per byte over its eval rows (as omnibyte eval)",
            "text_bpb": "task total nats / (corrupted text bytes * ln 2)",
            "clean_byte_bpb": "task total nats / (CLEAN text bytes * ln 2), the same count in every row (as word_ppl)",
            "word_ppl": "exp(task total nats / whitespace words of the CLEAN text), the same count in every row",
            "accuracy": "VQA accuracy of the task's main mode (questions corrupted by text corruptions)",
            "image_bpb": "mean bits over all image bytes of the eval rows, whatever their loss weight",
            "image_loss_weight": "the loss weight the run gives those bytes (0: never trained to predict them)",
        },
        "definitions": {c.label: CORRUPTIONS[c.name][2] for c in plan.corruptions},
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["results_file"] = str(path)
    return result


def _pair_with_clean(rows: list[dict[str, Any]], detail: Path, split: str, step: int, log=None) -> None:
    """VQA rows: each corrupted row's accuracy change per question type, paired question by question against the
    clean row (``paired``: mean, paired stderr, n), from the per-question records the passes wrote."""
    from ..analysis.transfer import paired_records

    def records(r):
        path = result_files(detail / r["corruption"].replace(":", "_"), split, step)[1]
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    clean = rows[0]
    if "accuracy" not in clean or not (base := records(clean)):
        return
    for r in rows[1:]:
        try:
            r["paired"] = paired_records(records(r), base, clean.get("mode") or "rank",
                                         names=(r["corruption"], "clean"))
        except ValueError as e:  # e.g. samples skipped under this corruption: no pairing, and the row says why
            r["paired_error"] = str(e)
            if log is not None:
                log.warning("robustness %s: no paired change: %s", r["corruption"], e)
