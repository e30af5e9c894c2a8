"""Ask a trained VQA run a question about one image (``omnibyte ask RUN image.png "question"``).

The run's own serializer makes the prompt (``question_prompt``: image and question in its field names, up to
SOM_ANSWER, as evaluation prompts are), and the run's task answers it (``Task.answer``: for VQA, the
log-likelihood of every answer of the run's recorded closed set and their softmax, and the greedy answer, as
evaluation ranks and generates). Both are plugin hooks: the library never imports the task folders.

Refusals (:class:`~omnibyte.config.ConfigError` / :class:`~omnibyte.errors.DataError`, one line each): a run
that is not a VQA run, an image file that cannot be read, an image the serializer refuses (naming the file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError
from .errors import DataError, SerializationError


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


def ask(run, image: bytes, question: str, *, image_name: str = "image", max_new_bytes: int = 0,
        generate: bool = True) -> dict[str, Any]:
    """Rank the run's closed answer set for ``question`` about ``image`` (file bytes) and generate a greedy
    answer. Returns ``{"question", "answers": [{"answer", "prob", "logprob"}, ...] (best first, all of the
    closed set), "generated" (None with generate=False), "num_answers"}``. ``max_new_bytes``: 0 = the longest
    answer + 8 (as VQA evaluation)."""
    import torch

    from .precision import autocast, use_bf16

    if not question.strip():
        raise ConfigError("the question is empty")
    try:
        prompt = run.serializer.question_prompt(image, question)
    except NotImplementedError as e:
        raise ConfigError(f"{run.run_dir}: not a VQA run ({e}); use `omnibyte generate` for other runs") from None
    except SerializationError as e:
        raise DataError(f"{image_name}: the run's {run.config.serializer.name} serializer refuses this "
                        f"image ({e.reason})") from None
    model, device = run.model, run.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, use_bf16(run.config.train.precision, device)):
            out = run.task.answer(model, prompt, max_new_bytes=max_new_bytes, generate=generate)
    except NotImplementedError as e:
        raise ConfigError(f"{run.run_dir}: not a VQA run ({e})") from None
    finally:
        model.train(was_training)
    return {"question": question, **out, "num_answers": len(out["answers"])}


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


__all__ = ["ask", "answer_lines", "read_image"]
