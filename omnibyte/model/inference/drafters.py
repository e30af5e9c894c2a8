"""The drafter interface of speculative decoding (:class:`Drafter`) and a drafter that needs no model at all,
:class:`LookupDrafter` (prompt lookup: drafts copied from the context). The drafters that run a byte model
(``ModelDrafter``, ``SelfDrafter``) and the decoding loop are in :mod:`omnibyte.model.inference.speculative`.
"""

from __future__ import annotations

import numpy as np
import torch

from ... import vocab


class Drafter:
    """Proposes bytes for speculative decoding. ``reset(context)`` starts from (B, L) streams;
    ``propose(k, temperature, top_k, top_p, generator)`` returns (B, j) tokens, j <= k (j = 0: nothing to
    propose, the model then steps by itself as in plain decoding; k may be 0, where the pass has no room for
    drafts, e.g. patch-aligned static passes at a patch's last phase), and the distributions they were drawn from,
    (B, j, V) after the same temperature / top-k / top-p as the target's, or None: greedy, or a drafter whose
    drafts are certain (q one-hot at each draft, as :class:`LookupDrafter`'s); ``advance(kept, tokens)``: every row
    kept its first ``kept`` proposals, then ``tokens`` (B,) (a CPU tensor) followed. A row with fewer real drafts
    than the batch's j pads its row; ``draft_lengths`` says how many are real (default: all j). ``proposed`` /
    ``accepted`` count real drafted bytes of unfinished rows and those of them kept (pad slots are neither: the
    acceptance rate is their ratio, None before any draft), ``rounds`` the verification passes."""

    def __init__(self):
        self.proposed = 0
        self.accepted = 0
        self.rounds = 0

    @property
    def acceptance(self) -> float | None:
        """``accepted / proposed``; None while nothing was drafted (a rate over no draft is no number: not NaN, which
        formats as "nan%" and compares false with everything, nor 0, which would read as every draft rejected)."""
        return self.accepted / self.proposed if self.proposed else None

    def draft_lengths(self, drafts: torch.Tensor) -> list[int]:
        """Per row, how many of the (B, j) ``drafts`` the last ``propose`` returned are real (the rest pad the row
        to j). This default: every row drafted all j."""
        return [int(drafts.shape[1])] * int(drafts.shape[0])

    def reset(self, context: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def propose(self, k: int, temperature: float, top_k: int, top_p: float, generator):  # pragma: no cover
        raise NotImplementedError

    def advance(self, kept: int, tokens: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


_SHIFT = 9  # a 2-gram (a, b) of ids < 512 as one int key: a << 9 | b


class LookupDrafter(Drafter):
    """Prompt-lookup drafting (Saxena 2023; LLMA, Yang et al. 2023): no model, no tokenizer, no GPU work.

    Each row's context (prompt and everything generated since) is indexed by its 2-grams. To draft, the
    drafter finds an earlier occurrence of the context's last bytes: among the ``candidates`` most recent earlier
    occurrences of the last 2 bytes, the one whose match extends furthest back (up to ``max_ngram`` bytes; the
    more recent on ties), and proposes the k bytes that followed it (copied as an overlapping copy, so a match
    just before the end continues a repeating pattern). A match shorter than ``min_ngram`` bytes is not used;
    with ``min_ngram=1`` the fallback is the bytes after the last byte's most recent earlier occurrence. No match:
    the row proposes nothing. Rows of a batch with fewer drafts than the longest are padded with ``PAD`` (verified
    like any draft: exact, rarely kept; not counted as drafted, ``draft_lengths``); when no row has a draft, the
    model steps by itself.

    The drafts are certain, so their distribution q is one-hot at each draft (``propose`` returns None for it):
    under sampling a draft x is kept with probability p(x), else a byte is drawn from p without x, renormalised,
    which is exactly p (:func:`~omnibyte.model.inference.speculative.accept`). It pays off where the output
    repeats its context (quoting, code, structured records, long repetitive streams); on other text it drafts
    little and costs the verification of what it drafts. Reset costs O(context) once (numpy)."""

    def __init__(self, max_ngram: int = 8, min_ngram: int = 2, candidates: int = 32):
        super().__init__()
        if not 1 <= min_ngram <= max_ngram or max_ngram < 2 or candidates < 1:
            raise ValueError(f"LookupDrafter: need 1 <= min_ngram <= max_ngram, max_ngram >= 2, candidates >= 1; "
                             f"got min_ngram={min_ngram}, max_ngram={max_ngram}, candidates={candidates}")
        self.max_ngram, self.min_ngram, self.candidates = int(max_ngram), int(min_ngram), int(candidates)

    def reset(self, context: torch.Tensor) -> None:
        self.device = context.device
        self.hist: list[list[int]] = []
        self.grams: list[dict[int, list[int]]] = []  # 2-gram -> starts of the bytes that followed it, oldest first
        self.after: list[dict[int, int]] = []  # byte -> start of what followed its most recent occurrence
        for row in context.long().cpu().numpy():
            h = row.astype(np.int64)
            L = len(h)
            grams: dict[int, list[int]] = {}
            if L >= 3:  # the 2-gram ending at t - 1 is followed by the byte at t, for t = 2 .. L - 1
                keys = (h[:L - 2] << _SHIFT) | h[1:L - 1]
                order = np.argsort(keys, kind="stable")
                ks, starts = keys[order], np.arange(2, L)[order]
                uniq, first = np.unique(ks, return_index=True)
                ends = np.append(first[1:], len(ks))
                grams = {int(k): starts[a:b].tolist() for k, a, b in zip(uniq, first, ends)}
            self.hist.append(h.tolist())
            self.grams.append(grams)
            # byte -> its most recent continuation (a later occurrence overwrites); only the min_ngram=1 fallback reads it
            self.after.append(dict(zip(h[:L - 1].tolist(), range(1, L))) if self.min_ngram <= 1 else {})

    def _append(self, b: int, tok: int) -> None:
        h = self.hist[b]
        t = len(h)  # tok lands at index t: it follows the 2-gram ending at t - 1 and the byte at t - 1
        if t >= 2:
            self.grams[b].setdefault((h[t - 2] << _SHIFT) | h[t - 1], []).append(t)
        if t >= 1 and self.min_ngram <= 1:
            self.after[b][h[t - 1]] = t
        h.append(tok)

    def _match(self, b: int) -> int | None:
        """Start of the continuation of the best earlier match of row b's suffix (None: no match)."""
        h = self.hist[b]
        L = len(h)
        best, best_len = None, 0
        if L >= 2:
            starts = self.grams[b].get((h[L - 2] << _SHIFT) | h[L - 1], ())
            for p in reversed(starts[-self.candidates:]):  # most recent first
                n = 2
                while n < self.max_ngram and p - n - 1 >= 0 and h[p - n - 1] == h[L - n - 1]:
                    n += 1
                if n > best_len:
                    best, best_len = p, n
                    if n == self.max_ngram:
                        break
        if best is not None and best_len >= self.min_ngram:
            return best
        if self.min_ngram <= 1 and L >= 1:
            return self.after[b].get(h[L - 1])
        return None

    def propose(self, k, temperature, top_k, top_p, generator):
        rows = []
        for b, h in enumerate(self.hist):
            p, out = self._match(b), []
            if p is not None:
                L = len(h)
                for i in range(k):  # an overlapping copy: past the context's end it copies its own drafts
                    out.append(h[p + i] if p + i < L else out[p + i - L])
            rows.append(out)
        j = max(map(len, rows))
        self.lengths = [len(r) for r in rows]
        self.drafts = [r + [vocab.PAD] * (j - len(r)) for r in rows]
        return torch.tensor(self.drafts, dtype=torch.long, device=self.device).view(len(rows), j), None

    def draft_lengths(self, drafts: torch.Tensor) -> list[int]:
        return list(self.lengths)

    def advance(self, kept: int, tokens: torch.Tensor) -> None:
        for b, t in enumerate(tokens.view(-1).tolist()):
            for d in self.drafts[b][:kept]:
                self._append(b, d)
            self._append(b, int(t))
        self.drafts = [[] for _ in self.hist]
