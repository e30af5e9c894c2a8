"""Ask a trained VQA run a question about one image (``omnibyte ask RUN image.png "question"``).

The raw sample ``{"id": "ask", "image": <file bytes>, "question": q}`` (the field names of the run's ``qa``
serializer) becomes the prompt through the run's own serializer (``prompt()``: everything up to SOM_ANSWER),
as the evaluation prompts do. The model is used as VQA evaluation uses it (``omnibyte.tasks.vqa_eval``, loaded
by name like any plugin module, since the library never imports the task folders):

* ranking: ``model.score_batch`` log-likelihood of every answer of the run's recorded closed set
  (``run.config.task.answers``, each as answer bytes + EOS: ``answer_candidates``); the probabilities are the
  softmax of those log-likelihoods over the closed set;
* generation: greedy decoding until EOS, decoded as evaluation decodes it.

Refusals (:class:`~omnibyte.config.ConfigError` / :class:`~omnibyte.errors.DataError`, one line each): a run
that is not a VQA run, an image file that cannot be read, an image the serializer refuses (naming the file).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .config import ConfigError
from .errors import DataError, SerializationError

#: the VQA scoring module of the shipped tasks (ranking candidates, greedy answers)
VQA_EVAL = "omnibyte.tasks.vqa_eval"


def read_image(path: str | Path) -> bytes:
    """The bytes of an image file; a missing or unreadable file is a DataError naming it."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the image file ({e.strerror or e})") from None


def vqa_answers(run) -> tuple[str, ...]:
    """The closed answer set of a VQA run; a ConfigError when ``run`` is not one (no recorded answers, or a
    serializer without a question/answer ``prompt``)."""
    ser = run.config.serializer
    if not callable(getattr(run.serializer, "prompt", None)) or not hasattr(ser, "question_field"):
        raise ConfigError(f"{run.run_dir}: not a VQA run (its serializer is {ser.name!r}, not qa); "
                          f"use `omnibyte generate` for other runs")
    answers = tuple(getattr(run.config.task, "answers", ()) or ())
    if not answers:
        raise ConfigError(f"{run.run_dir}: not a VQA run (task {run.config.task.name!r} records no answer "
                          f"vocabulary, task.answers)")
    return answers


def prompt_stream(run, image: bytes, question: str, image_name: str = "image"):
    """The run's serializer's prompt for (image, question); a DataError naming ``image_name`` when the
    serializer refuses the image."""
    if not question.strip():
        raise ConfigError("the question is empty")
    ser = run.serializer
    image_field = getattr(getattr(ser, "image", None), "config", None)
    image_field = getattr(image_field, "field", "image")
    sample = {"id": "ask", image_field: image, ser.config.question_field: question}
    try:
        return ser.prompt(sample)
    except SerializationError as e:
        raise DataError(f"{image_name}: the run's {run.config.serializer.name} serializer refuses this "
                        f"image ({e.reason})") from None


def ask(run, image: bytes, question: str, *, image_name: str = "image", max_new_bytes: int = 0,
        generate: bool = True) -> dict[str, Any]:
    """Rank the run's closed answer set for ``question`` about ``image`` (file bytes) and generate a greedy
    answer. Returns ``{"question", "answers": [{"answer", "prob", "logprob"}, ...] (best first, all of the
    closed set), "generated" (None with generate=False), "num_answers"}``. ``max_new_bytes``: 0 = the longest
    answer + 8 (as VQA evaluation)."""
    import torch

    from .precision import autocast, use_bf16

    labels = list(vqa_answers(run))
    vqa = importlib.import_module(VQA_EVAL)
    stream = prompt_stream(run, image, question, image_name)
    model, device = run.model, run.device
    if not max_new_bytes:
        max_new_bytes = max(len(a.encode("utf-8")) for a in labels) + 8
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, use_bf16(run.config.train.precision, device)):
            prefix = torch.as_tensor(stream.tokens.astype("int64"), device=device)
            ll = model.score_batch([prefix], vqa.answer_candidates(labels))[0].double().cpu()
            generated = vqa._generate(model, [stream], max_new_bytes, device)[0] if generate else None
    finally:
        model.train(was_training)
    probs = torch.softmax(ll, dim=0)
    order = sorted(range(len(labels)), key=lambda i: -float(ll[i]))
    return {"question": question,
            "answers": [{"answer": labels[i], "prob": float(probs[i]), "logprob": float(ll[i])} for i in order],
            "generated": generated, "num_answers": len(labels)}


def answer_lines(run, result: dict[str, Any], top: int = 5) -> list[str]:
    """The ranked answers (``top`` best; 0 = all) with their probabilities, and the generated answer."""
    shown = result["answers"] if top <= 0 else result["answers"][:top]
    width = max([len(a["answer"]) for a in shown] + [6])
    lines = [f"{run.run_dir}: {run.which} checkpoint, step {run.step}",
             f"question: {result['question']}",
             f"ranked answers ({len(shown)} of the closed set of {result['num_answers']}; probability = softmax "
             f"of the answers' log-likelihoods):"]
    lines += [f"  {k:>2}. {a['answer']:<{width}}  {a['prob']:.4f}" for k, a in enumerate(shown, 1)]
    if result.get("generated") is not None:
        lines.append(f"generated (greedy): {result['generated'] or '(empty)'}")
    return lines


__all__ = ["ask", "answer_lines", "prompt_stream", "read_image", "vqa_answers"]
