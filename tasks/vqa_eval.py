"""VQA scoring: accuracy overall, per question type and per family, and a confusion matrix.

Three ways to get a model's answer to a sample (``mode``):

* ``generate``: greedy decoding (temperature 0) after the serializer's ``prompt`` (everything up to and
  including SOM_ANSWER) until EOS or ``max_new_bytes``; the bytes before the first special token, decoded
  as UTF-8 and stripped of surrounding whitespace, must equal the gold answer exactly.
* ``rank``: closed-set ranking: ``model.score(prompt, candidates)`` gives the log-likelihood of every
  answer in the task's vocabulary (CLEVR's 28, each as answer bytes + EOS); the best one is the prediction.
* ``classify``: models that are classifiers (the CNN+LSTM baseline) expose ``predict_answers(batch)``
  returning answer strings; chosen automatically for them.

``mode=both`` (the default for byte models) runs generate and rank. Results go to
``run_dir/eval/vqa_<split>.json`` (metrics and confusion matrices) and ``vqa_<split>_predictions.jsonl``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from omnibyte import vocab

OTHER = "<other>"


# --- metrics (pure; hand-checked in tests) -----------------------------------------------------------


def accuracy_by(golds: Sequence[str], preds: Sequence[str], groups: Sequence[Any]) -> dict[str, dict]:
    """``{group: {"accuracy", "correct", "total"}}`` for each distinct group value (keys as strings)."""
    correct: Counter = Counter()
    total: Counter = Counter()
    for g, p, k in zip(golds, preds, groups):
        total[str(k)] += 1
        correct[str(k)] += int(g == p)
    return {k: {"accuracy": correct[k] / total[k], "correct": correct[k], "total": total[k]}
            for k in sorted(total, key=_natural)}


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
    n = len(golds)
    correct = sum(int(g == p) for g, p in zip(golds, preds))
    return {
        "accuracy": correct / n if n else float("nan"),
        "correct": correct,
        "total": n,
        "by_qtype": accuracy_by(golds, preds, qtypes),
        "by_family": accuracy_by(golds, preds, families),
        "confusion": confusion_matrix(golds, preds, labels),
    }


def _natural(key: str):
    return (0, int(key), "") if key.lstrip("-").isdigit() else (1, 0, key)


def decode_answer(tokens: Iterable[int]) -> str:
    """Generated tokens -> answer text: the bytes before the first special token, stripped."""
    out = bytearray()
    for t in tokens:
        t = int(t)
        if t >= vocab.NUM_BYTES:
            break
        out.append(t)
    return out.decode("utf-8", errors="replace").strip()


# --- running a model ----------------------------------------------------------------------------------


def evaluate_vqa(task: Any, model: Any, serializer: Any, split: str, run_dir: Any = None, *, mode: str = "auto",
                 max_samples: int = 0, batch_size: int = 32, max_new_bytes: int = 0, device: Any = None,
                 progress: bool = True, **_: Any) -> dict[str, Any]:
    """Score ``model`` on ``split`` of ``task`` (a VQA task with ``answer_vocab``); see the module doc."""
    import torch
    from tqdm.auto import tqdm

    labels = list(getattr(task, "answer_vocab", ()))
    is_classifier = hasattr(model, "predict_answers")
    if mode == "auto":
        mode = "classify" if is_classifier else "both"
    modes = ["generate", "rank"] if mode == "both" else [mode]
    for m in modes:
        if m not in ("generate", "rank", "classify"):
            raise ValueError(f"mode must be auto|generate|rank|both|classify, got {mode!r}")
        if m == "classify" and not is_classifier:
            raise ValueError("mode=classify needs a model with predict_answers(batch)")
        if m in ("generate", "rank") and is_classifier:
            raise ValueError(f"mode={m} needs a byte model; {type(model).__name__} is a classifier (use classify)")
    if "rank" in modes and not labels:
        raise ValueError("mode=rank needs the task's answer_vocab")
    if device is None:
        try:
            device = next(model.parameters()).device
        except (StopIteration, AttributeError):
            device = torch.device("cpu")
    if not max_new_bytes:
        max_new_bytes = max((len(a.encode("utf-8")) for a in labels), default=16) + 8

    samples = task.samples(split)
    if max_samples:
        samples = islice(samples, max_samples)
    total = task.num_samples(split) if hasattr(task, "num_samples") else None
    if total is not None and max_samples:
        total = min(total, max_samples)
    cand_tokens = [serializer.answer_tokens(a) for a in labels] if "rank" in modes else []

    records: list[dict[str, Any]] = []
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    bar = tqdm(total=total, desc=f"vqa {split}", unit="q", disable=not progress)
    try:
        with torch.no_grad():
            for chunk in _chunks(samples, batch_size):
                prompts = [serializer.prompt(s) for s in chunk]
                recs = [{"id": s["id"], "gold": s.get("answer"), "qtype": s.get("qtype", "unknown"),
                         "family": s.get("family", -1), "question": s.get("question", "")} for s in chunk]
                if "classify" in modes:
                    from omnibyte.stream import Batch

                    batch = Batch.collate(prompts).to(device)
                    for r, p in zip(recs, model.predict_answers(batch)):
                        r["pred_classify"] = p
                if "generate" in modes:
                    for r, p in zip(recs, _generate(model, prompts, max_new_bytes, device)):
                        r["pred_generate"] = p
                if "rank" in modes:
                    for r, prompt in zip(recs, prompts):
                        prefix = torch.as_tensor(prompt.tokens.astype("int64"), device=device)
                        scores = model.score(prefix, cand_tokens)
                        r["pred_rank"] = labels[int(torch.argmax(scores))]
                records.extend(recs)
                bar.update(len(chunk))
    finally:
        bar.close()
        if hasattr(model, "train"):
            model.train(was_training)

    golds = [r["gold"] for r in records]
    if any(g is None for g in golds):
        raise ValueError(f"split {split!r} has samples without answers; cannot score it")
    qtypes = [r["qtype"] for r in records]
    families = [r["family"] for r in records]
    by_mode = {m: vqa_metrics(golds, [r[f"pred_{m}"] for r in records], qtypes, families, labels) for m in modes}
    main = "rank" if "rank" in modes else modes[0]
    results: dict[str, Any] = {
        "split": split,
        "num_samples": len(records),
        "modes": modes,
        "accuracy": by_mode[main]["accuracy"],
        "main_mode": main,
        "gold_outside_vocab": sum(g not in labels for g in golds),
    }
    for m in modes:
        results[f"accuracy_{m}"] = by_mode[m]["accuracy"]
        results[f"by_qtype_{m}"] = {k: v["accuracy"] for k, v in by_mode[m]["by_qtype"].items()}
    if run_dir is not None:
        out = Path(run_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"vqa_{split}.json").write_text(json.dumps({**results, "details": by_mode}, indent=1) + "\n")
        with open(out / f"vqa_{split}_predictions.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        results["results_file"] = str(out / f"vqa_{split}.json")
    return results


def _chunks(it: Iterable[Any], n: int):
    it = iter(it)
    while True:
        chunk = list(islice(it, max(1, n)))
        if not chunk:
            return
        yield chunk


def _generate(model: Any, prompts: Sequence[Any], max_new_bytes: int, device: Any) -> list[str]:
    """Greedy answers for a list of prompt streams; prompts of equal length are decoded together."""
    import numpy as np
    import torch

    out: list[str] = [""] * len(prompts)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    for idx in groups.values():
        x = torch.as_tensor(np.stack([prompts[i].tokens.astype(np.int64) for i in idx]), device=device)
        new = model.generate(x, max_new_bytes=max_new_bytes, temperature=0.0, stop_tokens=(vocab.EOS,))
        for i, row in zip(idx, new.tolist()):
            out[i] = decode_answer(row)
    return out
