"""VQA scoring over evaluation items: accuracy overall, over answerable questions, per question type and
per family, and a confusion matrix.

Each item is an :class:`omnibyte.data.items.EvalItem`: its ``stream`` is the serialized sample (any ``qa``
``order``, e.g. QIQA) and its ``meta`` the raw sample's fields. The prompt is the stream up to and including
its SOM_ANSWER marker; the gold answer is ``meta["answer"]``; ``meta["qtype"]`` / ``meta["family"]`` group
the results. The model is used only through :class:`omnibyte.model.api.StreamModel`'s ``generate`` and
``score``, so a byte LM and a classifier (the CNN+LSTM baseline) are evaluated the same way (``mode``):

* ``generate``: greedy decoding (temperature 0) after the prompt until EOS or ``max_new_bytes``; the bytes
  before the first special token, decoded as UTF-8 and stripped of surrounding whitespace, must equal the
  gold answer stripped the same way (the ``qa`` serializer trains on the answer exactly as given); the rule
  is :mod:`omnibyte.answers`' (the analysis of the per-question records applies the same one).
* ``rank``: closed-set ranking: ``model.score(prompt, candidates)`` gives the log-likelihood of every answer
  of the closed set ``labels`` (the task's answer vocabulary, each as answer UTF-8 bytes + EOS); the best
  one is the prediction. Questions are ranked ``rank_batch_size`` at a time (default :data:`RANK_BATCH`)
  through ``model.score_batch`` (an MBLM batches them: :mod:`omnibyte.model.inference.scoring`), whatever
  ``batch_size`` (which bounds the rows of each ``generate`` call).
* ``both`` (and ``auto``): generate and rank; ``rank`` is the main mode (``accuracy``).

**Answerable questions.** A question whose gold answer is not in ``labels`` cannot be ranked right. Every
mode reports ``accuracy_<mode>`` over all questions and ``accuracy_answerable_<mode>`` over the answerable
ones (gold in ``labels``), the same per question type, and ``num_unanswerable`` (also per question type).

Results go to ``out_dir/vqa_<split>_<step>.json`` (metrics, confusion matrices, the closed set, ``step`` and
``checkpoint``) and ``vqa_<split>_<step>_predictions.jsonl`` (one record per question: ``id``,
``question_index``, gold, predictions): one pair per evaluated checkpoint (:func:`omnibyte.answers.result_files`; without a step,
``vqa_<split>.json``). They were once named without the step, so evaluating a second checkpoint replaced the
first's predictions, and per-question tables could describe another checkpoint than the accuracy beside them.
Item ids must be unique within a split (a repeated id is a :class:`DataError` naming both positions).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from omnibyte import vocab
from omnibyte.answers import decode_answer, normalize_answer, result_files
from omnibyte.errors import DataError
from omnibyte.logging import show_bar

OTHER = "<other>"
MODES = ("auto", "generate", "rank", "both")
RANK_BATCH = 256  # questions per score_batch call in rank mode (an MBLM prefills prefixes of one length together)


# --- metrics (pure; hand-checked in tests) -----------------------------------------------------------


def accuracy_by(golds: Sequence[str], preds: Sequence[str], groups: Sequence[Any],
                labels: Sequence[str] | None = None) -> dict[str, dict]:
    """``{group: {"accuracy", "correct", "total"}}`` for each distinct group value (keys as strings). With
    ``labels`` (the closed set) each group also has ``answerable`` (gold in ``labels``), ``correct_answerable``
    and ``accuracy_answerable`` (NaN where no question of the group is answerable)."""
    correct: Counter = Counter()
    total: Counter = Counter()
    ans_correct: Counter = Counter()
    ans_total: Counter = Counter()
    known = set(labels) if labels is not None else None
    for g, p, k in zip(golds, preds, groups):
        k = str(k)
        total[k] += 1
        correct[k] += int(g == p)
        if known is not None and g in known:
            ans_total[k] += 1
            ans_correct[k] += int(g == p)
    out = {}
    for k in sorted(total, key=_natural):
        row = {"accuracy": correct[k] / total[k], "correct": correct[k], "total": total[k]}
        if known is not None:
            row.update(answerable=ans_total[k], correct_answerable=ans_correct[k],
                       accuracy_answerable=ans_correct[k] / ans_total[k] if ans_total[k] else float("nan"))
        out[k] = row
    return out


def confusion_matrix(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Counts ``matrix[i][j]`` of gold ``labels[i]`` predicted as ``labels[j]``; anything outside
    ``labels`` (gold or predicted) is counted under a last label ``<other>``."""
    names = list(labels) + [OTHER]
    pos = {a: i for i, a in enumerate(labels)}
    m = [[0] * len(names) for _ in names]
    for g, p in zip(golds, preds):
        m[pos.get(g, len(labels))][pos.get(p, len(labels))] += 1
    return {"labels": names, "matrix": m}


def vqa_metrics(golds: Sequence[str], preds: Sequence[str], qtypes: Sequence[str], families: Sequence[int],
                labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy over all questions and over the answerable ones (gold in ``labels``), per question type and
    family, the number of unanswerable questions, and the confusion matrix over ``labels``."""
    n = len(golds)
    known = set(labels)
    correct = sum(int(g == p) for g, p in zip(golds, preds))
    answerable = sum(g in known for g in golds)
    correct_answerable = sum(int(g == p) for g, p in zip(golds, preds) if g in known)
    return {
        "accuracy": correct / n if n else float("nan"),
        "correct": correct,
        "total": n,
        "accuracy_answerable": correct_answerable / answerable if answerable else float("nan"),
        "correct_answerable": correct_answerable,
        "answerable": answerable,
        "unanswerable": n - answerable,
        "by_qtype": accuracy_by(golds, preds, qtypes, labels),
        "by_family": accuracy_by(golds, preds, families, labels),
        "confusion": confusion_matrix(golds, preds, labels),
    }


def _natural(key: str):
    return (0, int(key), "") if key.lstrip("-").isdigit() else (1, 0, key)


def answer_candidates(labels: Sequence[str]) -> list[list[int]]:
    """Each answer of the closed set as the continuation of a prompt: its UTF-8 bytes, then EOS (as
    ``qa``'s ``answer_tokens``; the CNN+LSTM baseline maps these to its classes)."""
    return [[*a.encode("utf-8"), vocab.EOS] for a in labels]


def prompt_of(item: Any) -> Any:
    """The stream of ``item`` up to and including its SOM_ANSWER marker (the generation / ranking prompt)."""
    import numpy as np

    stream = item.stream
    hits = np.flatnonzero(np.asarray(stream.tokens) == vocab.SOM_ANSWER)
    if not len(hits):
        raise DataError(f"evaluation item {item.id!r}: its stream has no SOM_ANSWER marker (not a qa stream)")
    return stream[: int(hits[0]) + 1]


# --- running a model ----------------------------------------------------------------------------------


def answer_prior(train: Iterable[dict[str, Any]], golds: Sequence[str], families: Sequence[Any],
                 qtypes: Sequence[str]) -> dict[str, Any]:
    """What a model that ignores the image reaches: the most frequent training answer of each question family
    (ties: the alphabetically first), scored on the eval questions; overall and per question type. ``train``:
    the training split's samples (or their metadata: ``answer`` and ``family``)."""
    from collections import Counter, defaultdict

    counts: dict[Any, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for s in train:
        if s.get("answer") is not None:
            counts[s.get("family", -1)][s["answer"]] += 1
            overall[s["answer"]] += 1
    if not overall:
        return {}

    def top(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    fallback = top(overall)
    best = {f: top(c) for f, c in counts.items()}
    preds = [best.get(f, fallback) for f in families]
    by = accuracy_by(golds, preds, qtypes)
    # no eval questions: NaN, as the model's own accuracy beside it (0.0 read as a measured prior)
    return {"accuracy": sum(g == p for g, p in zip(golds, preds)) / len(golds) if golds else float("nan"),
            "by_qtype": {k: v["accuracy"] for k, v in by.items()},
            "rule": "the most frequent training answer of the question's family"}


def vqa_report(results: dict[str, Any]) -> list[str]:
    """A short table: accuracy by question type (main mode) beside the per-family answer prior."""
    main = results.get("main_mode", "rank")
    acc = results.get(f"by_qtype_{main}", {})
    prior = (results.get("prior") or {}).get("by_qtype", {})
    lines = [f"VQA {results.get('split')} ({results.get('num_samples')} questions, {main}; prior = most frequent "
             f"training answer per family)", f"  {'question type':<20} {'accuracy':>9} {'prior':>9}"]
    for k in sorted(set(acc) | set(prior)):
        a, p = acc.get(k), prior.get(k)
        lines.append(f"  {k:<20} {a if a is None else f'{a:9.3f}':>9} {p if p is None else f'{p:9.3f}':>9}")
    tot_p = (results.get("prior") or {}).get("accuracy")
    lines.append(f"  {'all':<20} {results.get('accuracy', float('nan')):9.3f} "
                 f"{'' if tot_p is None else f'{tot_p:9.3f}':>9}")
    return lines


def evaluate_vqa(model: Any, items: Iterable[Any], *, split: str, labels: Sequence[str], out_dir: Any = None,
                 mode: str = "auto", batch_size: int = 32, max_new_bytes: int = 0, progress: bool = True,
                 prior_from: Any = None, rank_batch_size: int = RANK_BATCH, step: int | None = None,
                 checkpoint: str | None = None, **_: Any) -> dict[str, Any]:
    """Score ``model`` (a StreamModel) on ``items`` of ``split`` against the closed set ``labels``; see the
    module docstring. ``prior_from``: a callable giving the training split's samples (metadata suffices), to
    report the per-family answer prior beside the model. ``batch_size``: rows per ``generate`` call;
    ``rank_batch_size``: questions per ``score_batch`` call. ``step`` / ``checkpoint``: what was evaluated (in the
    results and the file names). Options it does not use (``context``, ...) are ignored."""
    import torch
    from tqdm.auto import tqdm

    labels = list(labels)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {'|'.join(MODES)}, got {mode!r}")
    modes = ["generate", "rank"] if mode in ("auto", "both") else [mode]
    if not labels:
        raise ValueError("VQA evaluation needs the task's answer vocabulary (task.answers); it is empty")
    if not max_new_bytes:
        max_new_bytes = max(len(a.encode("utf-8")) for a in labels) + 8
    known = set(labels)
    cand_tokens = answer_candidates(labels)
    device = model.device

    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(desc=f"vqa {split}", unit="q", disable=not show_bar(progress))
    try:
        with torch.no_grad():
            for chunk in _chunks(items, max(batch_size, rank_batch_size) if "rank" in modes else batch_size):
                prompts = []
                for item in chunk:
                    rec = _record(item, split, len(records), seen)
                    rec["answerable"] = rec["gold"] in known
                    records.append(rec)
                    prompts.append(prompt_of(item))
                recs = records[len(records) - len(chunk):]
                if "generate" in modes:
                    for r, p in zip(recs, _generate(model, prompts, max_new_bytes, device, batch_size)):
                        r["pred_generate"] = p
                if "rank" in modes:
                    prefixes = [torch.as_tensor(p.tokens.astype("int64"), device=device) for p in prompts]
                    best = model.score_batch(prefixes, cand_tokens, **_modalities(model, prompts, device))
                    best = best.argmax(dim=1).tolist()
                    for r, k in zip(recs, best):
                        r["pred_rank"] = labels[k]
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)

    golds = [r["gold"] for r in records]
    qtypes = [r["qtype"] for r in records]
    families = [r["family"] for r in records]
    def metrics(m: str) -> dict[str, Any]:
        preds = [r[f"pred_{m}"] for r in records]
        if m == "generate":  # the decoded answer is normalized: the gold answers and the closed set are too
            return vqa_metrics([normalize_answer(g) for g in golds], preds, qtypes, families,
                               [normalize_answer(x) for x in labels])
        return vqa_metrics(golds, preds, qtypes, families, labels)

    by_mode = {m: metrics(m) for m in modes}
    main = "rank" if "rank" in modes else modes[0]
    head = by_mode[main]
    results: dict[str, Any] = {
        "split": split,
        "num_samples": len(records),
        "modes": modes,
        "main_mode": main,
        "accuracy": head["accuracy"],
        "accuracy_answerable": head["accuracy_answerable"],
        "num_answerable": head["answerable"],
        "num_unanswerable": head["unanswerable"],
        "unanswerable_by_qtype": {k: v["total"] - v["answerable"] for k, v in head["by_qtype"].items()},
        "num_answers": len(labels),
        **({"step": int(step)} if step is not None else {}),
        **({"checkpoint": str(checkpoint)} if checkpoint is not None else {}),
    }
    if prior_from is not None:
        results["prior"] = answer_prior(prior_from(), golds, families, qtypes)
    for m in modes:
        results[f"accuracy_{m}"] = by_mode[m]["accuracy"]
        results[f"accuracy_answerable_{m}"] = by_mode[m]["accuracy_answerable"]
        results[f"by_qtype_{m}"] = {k: v["accuracy"] for k, v in by_mode[m]["by_qtype"].items()}
        results[f"by_qtype_answerable_{m}"] = {k: v["accuracy_answerable"] for k, v in by_mode[m]["by_qtype"].items()}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        res_file, pred_file = result_files(out, split, step)
        res_file.write_text(json.dumps({**results, "answers": labels, "details": by_mode}, indent=1) + "\n")
        with open(pred_file, "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        results["results_file"] = str(res_file)
    return results


def answer_one(model: Any, prompt: Any, labels: Sequence[str], *, max_new_bytes: int = 0,
               generate: bool = True) -> dict[str, Any]:
    """One question: the log-likelihood of every answer of the closed set ``labels`` after ``prompt`` (a
    serialized prompt stream), their softmax, best first; and the greedy answer (``max_new_bytes``: 0 = the
    longest answer + 8, as evaluation)."""
    import torch

    device = model.device
    prefix = torch.as_tensor(prompt.tokens.astype("int64"), device=device)
    ll = model.score_batch([prefix], answer_candidates(labels), **_modalities(model, [prompt], device))
    ll = ll[0].double().cpu()
    generated = None
    if generate:
        longest = max(len(a.encode("utf-8")) for a in labels)
        generated = _generate(model, [prompt], max_new_bytes or longest + 8, device)[0]
    probs = torch.softmax(ll, dim=0)
    order = sorted(range(len(labels)), key=lambda i: -float(ll[i]))
    return {"answers": [{"answer": labels[i], "prob": float(probs[i]), "logprob": float(ll[i])} for i in order],
            "generated": generated}


def _record(item: Any, split: str, position: int, seen: dict[str, int]) -> dict[str, Any]:
    """The per-question record of an item (gold answer and groups from its meta); ids must be unique."""
    meta = item.meta
    qid = item.id
    if qid in seen:
        raise DataError(f"split {split!r}: evaluation items {seen[qid]} and {position} have the same id {qid!r}; "
                        f"question ids must be unique")
    seen[qid] = position
    gold = meta.get("answer")
    if gold is None:
        raise DataError(f"split {split!r}: question {qid!r} has no answer (like CLEVR's test split); "
                        f"evaluate on a split with answers, e.g. val")
    return {"id": qid, "question_index": meta.get("question_index"), "gold": str(gold),
            "qtype": meta.get("qtype", "unknown"), "family": meta.get("family", -1),
            "question": meta.get("question", ""),
            # the image asked about: questions about one image are not independent draws (clustered errors)
            **({"image": str(meta["image_filename"])} if meta.get("image_filename") is not None else {})}


def _chunks(it: Iterable[Any], n: int):
    it = iter(it)
    while True:
        chunk = list(islice(it, max(1, n)))
        if not chunk:
            return
        yield chunk


def _modalities(model: Any, prompts: Sequence[Any], device: Any) -> dict[str, Any]:
    """``score_batch``'s ``modalities=`` (the prompts' modality tracks) for a modality-aware model, else none."""
    import torch

    if not model.stream_meta.modality_aware:
        return {}
    return {"modalities": [torch.as_tensor(p.modality.astype("int64"), device=device) for p in prompts]}


def _generate(model: Any, prompts: Sequence[Any], max_new_bytes: int, device: Any, batch_size: int = 0
              ) -> list[str]:
    """Greedy answers for a list of prompt streams; prompts of equal length are decoded together, at most
    ``batch_size`` (0: any number) per call."""
    import numpy as np
    import torch

    out: list[str] = [""] * len(prompts)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    step = batch_size if batch_size > 0 else max(1, len(prompts))
    batches = [same[a:a + step] for same in groups.values() for a in range(0, len(same), step)]
    for idx in batches:
        x = torch.as_tensor(np.stack([prompts[i].tokens.astype(np.int64) for i in idx]), device=device)
        kw = {}
        if model.stream_meta.modality_aware:  # the prompts' modality tracks route a modality-aware model
            kw["modality"] = torch.as_tensor(np.stack([prompts[i].modality.astype(np.int64) for i in idx]),
                                             device=device)
        new = model.generate(x, max_new_bytes=max_new_bytes, temperature=0.0, stop_tokens=(vocab.EOS,), **kw)
        for i, row in zip(idx, new.tolist()):
            out[i] = decode_answer(row)
    return out
