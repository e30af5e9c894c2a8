"""``pg19``: the PG19 long-document language-modelling benchmark, read from its own layout.

Layout (the PG19 release, or ``../shared/data/pg19-mini``)::

    <root>/train/<id>.txt  <root>/validation/<id>.txt  <root>/test/<id>.txt
    <root>/metadata.csv    id,short_book_title,publication_date,url   (no header row; optional here)

Raw samples: ``{"id": "pg19/test/1661", "text": str, "book_id": "1661", "title": str, "year": int|None}``,
one per book, books in numeric id order. Books are read one at a time as they are yielded, so a split
is never held in memory whole. A book that is not valid UTF-8 is yielded with ``text`` as its raw
``bytes``: the serializer's ``errors`` policy decides (``utf8``'s ``errors=replace`` decodes it with U+FFFD
replacements, ``errors=error`` raises a SerializationError naming the book). A book that cannot be read is
a bad sample (``on_bad_sample``). ``packing = "concat"``: the loader concatenates the serialized books
(with the serializer's BOS/EOS around each, as document separators) and cuts fixed-length rows.

Evaluation (:meth:`PG19.evaluate`) scores evaluation items (the serialized books of the run's own data
source) with the model's ``nll`` (a model without per-token losses is refused) and reports bits per byte and
word-level perplexity:

* ``bpb = total_nats / (num_bytes * ln 2)`` over the UTF-8 bytes of the books (TEXT-modality tokens;
  markers such as BOS/EOS are neither predicted nor counted);
* ``word_ppl = exp(total_nats / num_words)``, with ``num_words`` the number of whitespace-separated
  words (``len(text.split())``), stated in the results (PG19's test set has 6,966,499 words by this count):
  of the item's ``meta["text"]`` when it is the scored text (same UTF-8 length), else of the stream's text
  bytes decoded (e.g. a book given as bytes, or cut by the serializer).
* Books longer than the context are scored with a sliding window: a window of ``context`` tokens moves
  by ``stride``; each token is scored exactly once, in the first window where it is among the last
  ``stride`` positions, so it sees at least ``context - stride`` tokens of history (except at the very
  start of a book). ``stride == context`` gives disjoint windows (fast, less context per token).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnibyte.errors import DataError

from .base import TASKS, Task, TaskConfig

log = logging.getLogger("omnibyte.tasks.pg19")

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class PG19Config(TaskConfig):
    max_books: int = 0  # per split, the first N books in id order (0: all)
    max_bytes: int = 0  # cut each book to its first N UTF-8 bytes (0: whole books); for quick runs
    eval_context: int = 0  # evaluation window (0: the run's data.seq_len, passed as `context`)
    eval_stride: int = 0  # window step (0: the context, i.e. disjoint windows)


@TASKS.register("pg19")
class PG19(Task):
    """PG19 books (long-document language modelling; bits per byte and word perplexity)."""

    Config = PG19Config
    packing = "concat"
    store_neutral = Task.store_neutral | {"eval_context", "eval_stride"}  # the evaluation's windows

    def __init__(self, config: PG19Config | None = None):
        super().__init__(config)
        self._meta: dict[str, dict[str, Any]] | None = None

    @property
    def root(self) -> Path:
        if not self.config.root:
            raise DataError("pg19 needs its data: set task.root to a folder with train/ validation/ test/ "
                            "of <id>.txt books (e.g. task.root=../shared/data/pg19-mini)")
        root = Path(self.config.root).expanduser()
        if not root.is_dir():
            raise DataError(f"PG19 root {str(root)!r} does not exist")
        return root

    def splits(self) -> list[str]:
        return [s for s in SPLITS if (self.root / s).is_dir()]

    def books(self, split: str) -> list[Path]:
        folder = self.root / split
        if not folder.is_dir():
            raise DataError(f"PG19 split {split!r}: no folder {folder} (found: {', '.join(self.splits()) or 'none'})")
        paths = sorted(folder.glob("*.txt"), key=lambda p: (0, int(p.stem)) if p.stem.isdigit() else (1, p.stem))
        if not paths:
            raise DataError(f"PG19 split {split!r}: {folder} holds no <id>.txt books")
        if self.config.max_books:
            paths = paths[: self.config.max_books]
        return paths

    def num_samples(self, split: str) -> int:
        return len(self.books(split))

    @property
    def metadata(self) -> dict[str, dict[str, Any]]:
        """``metadata.csv`` (no header: id, short_book_title, publication_date, url); empty if absent."""
        if self._meta is None:
            self._meta = {}
            path = self.root / "metadata.csv"
            if path.is_file():
                with open(path, newline="", encoding="utf-8") as f:
                    for n, row in enumerate(csv.reader(f), 1):
                        if not row:
                            continue
                        if len(row) < 4:
                            raise DataError(f"{path} line {n}: expected 4 fields (id, short_book_title, "
                                            f"publication_date, url), got {len(row)}")
                        year = int(row[2]) if row[2].strip().lstrip("-").isdigit() else None
                        self._meta[row[0]] = {"title": row[1], "year": year, "url": row[3]}
        return self._meta

    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        for _, sample in self.samples_at(split, range(len(self.books(split)))):
            yield sample

    def samples_at(self, split: str, positions: Iterable[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """The books at ``positions`` of the split's id order (reading only those)."""
        meta = self.metadata
        books = self.books(split)
        for i in positions:
            path = books[i]
            try:
                raw = path.read_bytes()
            except OSError as e:
                if self.config.on_bad_sample == "fail":
                    raise DataError(f"{path}: {e} (set task.on_bad_sample=skip to skip such books)") from None
                self.skipped += 1
                log.warning("skipping book %s: %s", path, e)
                continue
            if self.config.max_bytes and len(raw) > self.config.max_bytes:
                raw = _cut_utf8(raw, self.config.max_bytes)
            try:
                text: str | bytes = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw  # not UTF-8: the serializer's errors policy decides
            m = meta.get(path.stem, {})
            yield i, {"id": f"pg19/{split}/{path.stem}", "text": text, "book_id": path.stem,
                      "title": m.get("title", ""), "year": m.get("year")}

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model: Any, items: Iterable[Any], *, split: str, out_dir: Any = None,
                 context: int = 0, stride: int = 0, batch_size: int = 8, **_: Any) -> dict:
        """Bits per byte and word perplexity of ``items`` (the serialized books of ``split``; see the module
        docstring for the windows and the word count).

        The window is ``task.eval_context`` when set, else ``context`` (the run passes its ``data.seq_len``),
        else the model's ``stream_meta.max_len``; the step is ``task.eval_stride``, else ``stride``, else the
        window (disjoint windows). Results also go to ``out_dir/pg19_<split>.json``.
        """
        import torch

        meta = model.stream_meta
        if not meta.per_token_losses:
            raise ValueError(f"pg19 evaluation needs per-token losses; {type(model).__name__} gives none "
                             f"(stream_meta.per_token_losses is False)")
        context = int(self.config.eval_context or context or meta.max_len or 0)
        if context < 1:
            raise ValueError("pg19 evaluation needs a window: pass context (the run's data.seq_len) or set "
                             "task.eval_context")
        stride = int(self.config.eval_stride or stride or context)
        if not 0 < stride <= context:
            raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
        totals = {"nats": 0.0, "bytes": 0, "words": 0, "books": 0}
        per_book = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for item in items:
                    nats, n_bytes = score_stream(model, item.stream, context, stride, batch_size)
                    words = item_words(item)
                    totals["nats"] += nats
                    totals["bytes"] += n_bytes
                    totals["words"] += words
                    totals["books"] += 1
                    per_book.append({"id": item.id, "bytes": n_bytes, "words": words,
                                     "bpb": bits_per_byte(nats, n_bytes)})
        finally:
            model.train(was_training)
        results = {
            "split": split,
            "bpb": bits_per_byte(totals["nats"], totals["bytes"]),
            "word_ppl": word_perplexity(totals["nats"], totals["words"]),
            "num_bytes": totals["bytes"],
            "num_words": totals["words"],
            "word_count_rule": "len(text.split()) per book (whitespace split)",
            "bpb_rule": BPB_RULE,
            "word_ppl_rule": WORD_PPL_RULE,
            "num_books": totals["books"],
            "total_nats": totals["nats"],
            "context": context,
            "stride": stride,
        }
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"pg19_{split}.json").write_text(json.dumps({**results, "books": per_book}, indent=1) + "\n")
        return results

    def report(self, results: dict) -> list[str]:
        """The text's bits per byte and word perplexity, each with what it is over (the run-level ``bpb`` of an
        eval record also counts the EOS between books: this is the figure to quote)."""
        r = results
        return [f"{r['split']} text bits per byte {r['bpb']:.4f} over {r['num_bytes']} UTF-8 bytes of "
                f"{r['num_books']} books (BOS/EOS not counted; windows of {r['context']}, stride {r['stride']}); "
                f"word perplexity {r['word_ppl']:.6g} over {r['num_words']} whitespace-separated words"]


#: what the task's ``bpb`` and ``word_ppl`` are over (recorded in every result)
BPB_RULE = ("total nats of the books' text bytes (TEXT-modality tokens with loss weight > 0) / (their count * ln 2); "
            "BOS, EOS and separators are context only: neither in the nats nor in the byte count")
WORD_PPL_RULE = "exp(the same total nats / whitespace-separated words of the books' text)"


def _cut_utf8(raw: bytes, n: int) -> bytes:
    """The first ``n`` bytes of ``raw``, less a trailing partial UTF-8 character."""
    cut = raw[:n]
    for back in range(1, 4):  # a character is at most 4 bytes: look back for its lead byte
        if len(cut) < back:
            break
        b = cut[-back]
        if b < 0x80:
            break
        if b >= 0xC0:  # lead byte of a character needing this many bytes:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return cut if need == back else cut[:-back]
    return cut


# --- metrics (pure functions, tested on hand-checked cases) -----------------------------------------


def count_words(text: str) -> int:
    """PG19's word count: whitespace-separated tokens."""
    return len(text.split())


def item_words(item: Any) -> int:
    """The word count of an evaluation item: of ``meta["text"]`` when it is the text the stream holds (same
    UTF-8 length), else of the stream's TEXT bytes decoded (U+FFFD for invalid sequences)."""
    from omnibyte.vocab import Modality

    data = item.stream.data_bytes(Modality.TEXT)
    text = item.meta.get("text")
    if isinstance(text, str):
        try:
            if len(text.encode("utf-8")) == len(data):
                return count_words(text)
        except UnicodeEncodeError:
            pass
    return count_words(data.decode("utf-8", errors="replace"))


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    return total_nats / (num_bytes * math.log(2)) if num_bytes else float("nan")


def word_perplexity(total_nats: float, num_words: int) -> float:
    """``exp(total_nats / num_words)``: the byte-level likelihood of the text, spread over its words."""
    if not num_words:
        return float("nan")
    x = total_nats / num_words
    return math.exp(x) if x < 700 else float("inf")


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over ``n`` tokens: ``(begin, end, first_scored)``; every token scored exactly once.

    The first window scores all of its tokens; each later one scores only its tokens past the previous
    window's end (at most ``stride`` of them), which have at least ``context - stride`` tokens of history.
    """
    out = []
    prev_end = 0
    begin = 0
    while prev_end < n:
        end = min(begin + context, n)
        out.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return out


def score_stream(model: Any, stream: Any, context: int, stride: int, batch_size: int = 8) -> tuple[float, int]:
    """Total nats over the TEXT-modality tokens of ``stream`` under sliding windows (``model.nll`` of each
    window), and their count."""
    import numpy as np
    import torch

    from omnibyte.loss import per_token_nll
    from omnibyte.vocab import Modality

    tokens = np.asarray(stream.tokens, dtype=np.int64)
    counted = (np.asarray(stream.modality) == int(Modality.TEXT)) & (np.asarray(stream.loss_mask) > 0)
    n = len(tokens)
    wins = windows(n, context, stride)
    total = 0.0
    device = model.device
    # windows of equal length are batched together (all but the last few have length `context`)
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:
        by_len.setdefault(w[1] - w[0], []).append(w)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i: i + batch_size]
            x = torch.from_numpy(np.stack([tokens[b:e] for b, e, _ in chunk])).to(device)
            mods = None
            if model.stream_meta.modality_aware:  # the windows' modality tracks route the model
                track = np.asarray(stream.modality, dtype=np.int64)
                mods = torch.from_numpy(np.stack([track[b:e] for b, e, _ in chunk])).to(device)
            nll = per_token_nll(model, x, modality=mods).cpu().numpy()  # (B, length) nats
            for row, (b, e, first) in zip(nll, chunk):
                keep = counted[first:e]
                total += float(row[first - b:][keep].sum(dtype=np.float64))
    return total, int(counted.sum())
