"""Questions for a whole split: which families each image tries, in which order, and the answer balancing
across images (:class:`QuestionGenerator`); and the template searches of an image run ahead in a worker
process (:func:`speculate`) with the same questions as a result, whatever ``--workers``.

The searches themselves (one template on one scene) are :mod:`.templates`'.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from . import programs as P
from .templates import accept_answer, answer_domain, candidates, first_accepted, render_text


def family_order(families: list[dict], key: str, index: int, family_counts: Mapping[int, int]) -> list[dict]:
    """The order image ``index`` tries the families in: least used so far first, ties in a random order drawn
    from (key, index) alone."""
    order = list(families)
    random.Random(f"{key}/{index}/order").shuffle(order)
    order.sort(key=lambda f: family_counts[f["family_index"]])
    return order


def _family_rng(key: str, index: int, family_index: int, what: str = "search") -> random.Random:
    return random.Random(f"{key}/{index}/{family_index}/{what}")


def speculate(families: list[dict], scene: Mapping[str, Any], key: str, k: int, hint: tuple[Mapping, Mapping],
              extra: int = 4, max_states: int = 800) -> dict[int, tuple[list[dict], bool]]:
    """:func:`candidates` of the families image ``scene`` will likely try, for a worker process: in the order
    the guessed family counts give, until ``k + extra`` families gave some. ``hint``: (family counts, answer
    counts), guesses from :meth:`QuestionGenerator.hint`. The result only saves
    :meth:`QuestionGenerator.questions_for` work: its questions are the same with it, without it, whatever
    the guesses."""
    family_counts, answer_counts = hint
    idx = P.SceneIndex(scene)
    i = scene["image_index"]
    out: dict[int, tuple[list[dict], bool]] = {}
    found = 0
    for fam in family_order(families, key, i, family_counts):
        if found >= k + extra:
            break
        fi = fam["family_index"]
        out[fi] = candidates(fam, idx, _family_rng(key, i, fi), answer_counts[fi], max_states)
        found += bool(out[fi][0])
    return out


class QuestionGenerator:
    """Questions for a stream of scenes, balancing families and answers across the whole split.

    Per image, families are tried from the least used so far (ties in a random order) until
    ``questions_per_image`` of them gave a question (one question per family and image, like CLEVR's
    ``--templates_per_image`` with ``--instances_per_template 1``).

    Randomness comes from (``key``, image index, family) alone: the tie order of image ``i``, the search of
    family ``f`` on image ``i`` and its text each have their own generator. What depends on earlier images
    is only the family and answer counts, which this object keeps, so the expensive part (the searches) can
    run ahead in other processes (:func:`speculate`) and give the same questions.
    """

    def __init__(self, families: list[dict], key: str = "questions", max_states: int = 800):
        self.families = families
        self.key = key
        self.max_states = max_states
        self.images = 0
        self.family_counts = {f["family_index"]: 0 for f in families}
        self.answer_counts = {f["family_index"]: {a: 0 for a in answer_domain(f)} for f in families}
        self.tries = dict.fromkeys(self.family_counts, 0)  # images that tried the family
        self.successes = dict.fromkeys(self.family_counts, 0)  # ... and got a question from it
        self._ahead: dict[int, list[int]] = {}  # image handed out -> families expected to give it questions

    def hint(self, index: int, k: int) -> tuple[dict[int, int], dict[int, dict]]:
        """Guesses of the (family counts, answer counts) image ``index`` will see, for :func:`speculate`: today's,
        plus what the images handed out before it (with ``hint``, and not yet through :meth:`questions_for`)
        should add, from each family's success rate so far. Guesses only steer the work done ahead."""
        counts = dict(self.family_counts)
        for inc in self._ahead.values():
            for f in inc:
                counts[f] += 1
        inc = []  # the families this image should get questions from: the first k likely to give one
        for fam in family_order(self.families, self.key, index, counts):
            if len(inc) >= k:
                break
            fi = fam["family_index"]
            if 2 * self.successes[fi] >= self.tries[fi]:
                inc.append(fi)
        self._ahead[index] = inc
        return counts, {f: dict(c) for f, c in self.answer_counts.items()}

    def questions_for(self, scene: Mapping[str, Any], k: int,
                      speculated: Mapping[int, tuple[list[dict], bool]] | None = None) -> list[dict]:
        """Up to ``k`` questions on ``scene`` (its ``image_index``, else the number of scenes seen so far, picks
        the random streams); ``speculated``: :func:`speculate`'s result for this scene, if any."""
        i = scene.get("image_index", self.images)
        self.images += 1
        self._ahead.pop(i, None)
        idx = P.SceneIndex(scene)
        speculated = speculated or {}
        out = []
        for fam in family_order(self.families, self.key, i, self.family_counts):
            if len(out) >= k:
                break
            fi = fam["family_index"]
            counts = self.answer_counts[fi]
            q, done = None, False
            if fi in speculated:
                cands, done = speculated[fi]
                q = next((c for c in cands if accept_answer(counts, c["answer"])), None)
            if q is None and not done:
                q = first_accepted(fam, idx, _family_rng(self.key, i, fi), counts, self.max_states)
            self.tries[fi] += 1
            if q is None:
                continue
            self.successes[fi] += 1
            counts[q["answer"]] += 1
            self.family_counts[fi] += 1
            out.append({
                "question": render_text(fam, q["vals"], _family_rng(self.key, i, fi, "text")),
                "answer": P.to_answer(q["answer"]),
                "question_family_index": fi,
                "template_filename": fam["filename"],
                "program": [P.to_release(n) for n in q["nodes"]],
            })
        return out
