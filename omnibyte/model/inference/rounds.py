"""The speculative round loop (:func:`rounds`) and its acceptance rules, one for the eager passes
(:class:`~omnibyte.model.inference.speculative.EagerPasses`) and the static ones
(:class:`~omnibyte.model.inference.static_passes.StaticPasses`): a backend feeds, verifies and rolls back; this
module decides what is kept (:func:`accept`, :func:`accept_greedy`), counts each round's drafts
(:func:`count_round`) and emits the bytes. The scheme: :mod:`~omnibyte.model.inference.speculative`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ... import vocab
from .drafters import Drafter, LookupDrafter
from .sampling import sample, sampling_probs


def accept_greedy(tgt: Sequence[int], drafts: Sequence[int]) -> tuple[int, int]:
    """The greedy rule of :func:`accept` from the target's argmax: one row's tgt (k+1 ints) and drafts (k ints) ->
    (kept, next token): drafts are kept while they equal the argmax, the next token is the argmax after them.
    (Python ints: the round loop's host side, where tiny tensor ops cost more than the comparison.)"""
    kept = 0
    for d, t in zip(drafts, tgt):
        if d != t:
            break
        kept += 1
    return kept, int(tgt[kept])


def accept(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, temperature: float, top_k: int,
           top_p: float, generator) -> tuple[int, int]:
    """One row: target logits (k+1, V), drafts (k,), drafter distributions q (k, V) (None: greedy, or drafts
    that are certain, q one-hot at each) -> (kept, next token). Greedy keeps drafts while they equal the
    target's argmax; sampling keeps draft i with probability min(1, p_i(x)/q_i(x)) and at the first rejection
    draws from max(0, p_i - q_i) renormalised (one-hot q: keep x with probability p_i(x), else draw from p_i
    without x); when all k are kept the next token is drawn from p_k."""
    k = drafts.shape[0]
    if temperature <= 0:
        return accept_greedy(logits.float().argmax(-1).tolist(), drafts.tolist())
    p = sampling_probs(logits, temperature, top_k, top_p)  # (k + 1, V)
    if k:
        idx = torch.arange(k, device=p.device)
        u = torch.rand(k, generator=generator, device=p.device)
        ok = u * (q[idx, drafts] if q is not None else 1.0) < p[idx, drafts]
        miss = (~ok).nonzero()
        if miss.numel():
            i = int(miss[0, 0])
            if q is not None:
                resid = (p[i] - q[i]).clamp_min(0)
            else:  # max(0, p - onehot(x)): p without x
                resid = p[i].index_fill(0, drafts[i:i + 1], 0.0)
            if float(resid.sum()) <= 0:  # p == q to rounding: rejection had probability ~0
                resid = p[i]
            return i, int(torch.multinomial(resid, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def count_round(drafter: Drafter, drafts: torch.Tensor, j: int, live: Sequence[bool]) -> None:
    """A verification round's statistics: per unfinished (``live``) row, its real drafts (``draft_lengths``: the
    slots padding a shorter draft to the batch's length are not drafted bytes) and those of them kept (the batch's
    ``j``, at most the row's own count)."""
    lengths = [int(nb) for nb in drafter.draft_lengths(drafts)]
    B, k = drafts.shape
    if len(lengths) != B or not all(0 <= nb <= k for nb in lengths):
        raise ValueError(f"{type(drafter).__name__}.draft_lengths: {lengths} for drafts of shape ({B}, {k}) (one "
                         f"count in 0..{k} per row)")
    n = [nb for nb, ok in zip(lengths, live) if ok]
    drafter.proposed += sum(n)
    drafter.accepted += sum(min(j, nb) for nb in n)
    drafter.rounds += 1


def rounds(passes, prompt, max_new: int, temperature, top_k, top_p, stop_tokens, generator, drafter,
           draft_len: int) -> torch.Tensor:
    """The speculative round loop, one for the eager and the static passes: ``passes`` (:class:`EagerPasses` or
    :class:`~omnibyte.model.inference.static_passes.StaticPasses`) does the model's work -- ``prefill``, ``step``
    (a plain step), ``room`` (the most drafts the next pass takes, or None), ``verify`` (a pass over the last kept
    byte and the drafts), ``argmax`` (of that pass, for greedy), ``rollback`` (to the kept prefix) -- and this loop
    the rest, on the host (one sync per round):
    emitted bytes, stops, the drafter's rounds and statistics (:func:`count_round`).

    The rows advance together: each round every unfinished row gets its own acceptance, and all rows keep the
    shortest one's count j plus one byte each (that row's correction or bonus; for a row that accepted more, its
    accepted draft j, whose distribution is the model's all the same), so the cached states stay aligned."""
    B, device = prompt.shape[0], prompt.device
    stops = {int(t) for t in stop_tokens}
    done = [False] * B
    rows: list[list[int]] = [[] for _ in range(B)]
    greedy = temperature <= 0

    def emit(cols: list[list[int]]) -> None:  # per row its new tokens; rows past their stop get PAD
        for r in range(B):
            for t in cols[r]:
                t = vocab.PAD if done[r] else t
                rows[r].append(t)
                done[r] = done[r] or t in stops

    def step(xs: list[int]) -> list[int]:  # one plain step of the model
        logits = passes.step(torch.tensor(xs, device=device).view(B, 1))
        return sample(logits, temperature, top_k, top_p, generator).tolist()

    def more() -> bool:
        return len(rows[0]) < max_new and not all(done)

    x = sample(passes.prefill(prompt), temperature, top_k, top_p, generator)  # (B,): as plain decoding
    xs = x.tolist()
    emit([[t] for t in xs])
    if max_new > 1 and not all(done):
        ctx = torch.cat((prompt, x[:, None]), dim=1)
        drafter.reset(ctx.cpu() if isinstance(drafter, LookupDrafter) else ctx)  # host drafts: no device round trip
    while more():
        k = min(draft_len, max_new - len(rows[0]) - 1)  # never predict past where plain decoding would stop
        if not k:  # one byte left: a plain step
            emit([[t] for t in step(xs)])
            break
        room = passes.room()  # the backend's most drafts this round (static passes: patch-aligned; None: any)
        if room is not None:
            k = min(k, room)  # may be 0: asked all the same, so every advance follows a propose
        drafts, q = drafter.propose(k, temperature, top_k, top_p, generator)
        k = drafts.shape[1]  # a drafter may propose fewer (LookupDrafter: where nothing matches)
        if not k:  # nothing to verify: a plain step
            xs = step(xs)
            emit([[t] for t in xs])
            if more():
                drafter.advance(0, torch.tensor(xs))
            continue
        dh = drafts.cpu()
        dl = dh.tolist()  # (the host side works on Python ints: one conversion, not one per use)
        logits = passes.verify(torch.tensor([[x] + d for x, d in zip(xs, dl)]))  # (B, k + 1, V)
        if greedy:  # accept's greedy rule, from the argmax of every row copied to the host at once
            tgt = passes.argmax()[:, :k + 1].tolist()
            acc = [accept_greedy(tgt[r], dl[r]) for r in range(B)]
        else:
            q = q.to(device) if q is not None else None
            dd = drafts.to(device)
            acc = [accept(logits[r], dd[r], q[r] if q is not None else None, temperature, top_k, top_p, generator)
                   for r in range(B)]
        kept = [k if done[r] else j for r, (j, _) in enumerate(acc)]  # finished rows do not hold the others back
        nxt = [t for _, t in acc]
        j = min(kept)
        xs = [dl[r][j] if kept[r] > j else nxt[r] for r in range(B)]
        passes.rollback(j + 1)
        count_round(drafter, dh, j, [not d for d in done])
        emit([dl[r][:j] + [xs[r]] for r in range(B)])
        if more():
            drafter.advance(j, torch.tensor(xs))
    new = torch.tensor(rows, dtype=torch.long, device=device).view(B, -1)
    if stops and all(done):  # end at the last row's stop
        hit = torch.isin(new, torch.tensor(sorted(stops), device=device))
        new = new[:, :int(hit.int().argmax(dim=1).max()) + 1]
    return new
