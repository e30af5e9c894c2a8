"""Closed-set scoring of many prefixes at once: ``MBLM.score_batch`` (VQA ranking of every question of a batch).

:meth:`Decoder.score <.decoder.Decoder.score>` (the reference) prefills one prefix, fans its cache out to the
K candidates and then feeds them byte by byte: T sequential steps per question. This module computes the same
log-likelihoods for B prefixes with a handful of calls, from the structure of the hierarchy:

* The outermost stage sees units of Q_0 bytes, causally: its output at unit p depends only on the units before
  p. With a prefix of n bytes, p_0 = n // Q_0, its output at p_0 depends on the prefix alone (shared by the
  candidates); its outputs at p_0 + 1, ... depend on the candidate bytes.
* The inner stages see one outer unit at a time (plus the outer stage's output there), so the logits of every
  byte of a unit come from one teacher-forced pass of the inner stages over that unit, as in the full forward.

So, per batch of prefixes:

1. **Prefill** (outer stage, cached): the start vector and the prefix's complete units rounded down to a
   multiple of :data:`BUCKET_UNITS` (p_g), one call per group of prefixes with the same p_g. On a GPU each call
   is launch-bound, so the number of calls, not their length, is the cost.
2. **Window through the outer stage**: the caches fanned out to the K candidates; then one cached call over the
   window's units p_g .. (each row's remaining prefix units, the unit holding its prefix tail and first
   candidate bytes, the candidate's later units; PAD after). Caches of SSM blocks (fixed-size states that never
   read the position) are merged across groups first, so this is one call per chunk of rows.
3. **Inner stages** over each row's units from p_0 on (those holding candidate bytes) in one teacher-forced
   call per stage, then the head at the candidate positions only; log-probabilities summed per candidate in
   byte order, as the reference.

**Modality-aware models** (blocks with ``modality_experts``, :mod:`omnibyte.model.routing`) take the prefixes'
modality tracks (``modalities=``). Every call above routes its positions as the reference does: the prefill by
the prefix's units; the window by a track of the unit before it, the prefix's tail and each candidate's bytes,
whose modality follows the generation rule from the segment open at the prefix's end
(:func:`~omnibyte.model.routing.next_modality`, the function the reference calls per fed byte); inner stages
by the unit before each of their positions (for a row's first, the prefix's last bytes or ``special`` at the
stream's start). Positions past a short candidate route as ``special`` (PAD); they are masked and, the stages
being causal, never read by a counted position.

Same computation as the reference up to float rounding (the tests compare them to 1e-5 in fp32 and compare
argmax predictions); under bf16 autocast the two differ by bf16 rounding only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from ... import vocab
from ..blocks.ssm_stack import SSMStack
from ..cache import BlockCache
from ..routing import SPECIAL, next_modality, open_segment, unit_modality
from .sampling import as_batch

MAX_ROWS = 2048  # (prefix, candidate) rows per chunk of steps 2-3 (bounds the inner stages' activations)
STATE_BYTES = 1 << 30  # and the fanned-out outer-stage states per chunk (Mamba-2: ~0.5 MB per layer and row)
# prefixes are prefilled to a multiple of this many outer units, so one call serves every prefix whose complete
# units round down to the same multiple; each row's remaining prefix units then run with its candidates
# (K-fold work on at most BUCKET_UNITS - 1 positions, against one launch-bound call per distinct length)
BUCKET_UNITS = 8


@torch.no_grad()
def score_batch(model, prefixes: Sequence, candidates: Sequence[Sequence[int]], modalities: Sequence | None = None
                ) -> torch.Tensor:
    """(B, K) fp32 log-likelihoods (nats): row b = ``model.score(prefixes[b], candidates, modality=modalities[b])``.
    ``prefixes``: 1-D token sequences (tensors, lists or bytes) of any lengths; ``candidates``: token lists (may be
    empty); ``modalities``: one Modality-code track per prefix (same length), required by a modality-aware model
    (ValueError naming the prefix otherwise), ignored by a dense one (as the reference ignores it)."""
    m = model
    device = m.head.weight.device
    rows = []
    for i, p in enumerate(prefixes):
        t = as_batch(p, device)
        if t.shape[0] != 1:
            raise ValueError(f"score_batch: prefix {i} must be a single sequence, got shape {tuple(t.shape)}")
        rows.append(t[0])
    mods = _tracks(m, rows, modalities, device) if m.stream_meta.modality_aware else None
    cands = [[int(x) for x in c] for c in candidates]
    B, K = len(rows), len(cands)
    if B == 0 or K == 0:
        return torch.zeros(B, K, device=device)
    T = max(len(c) for c in cands)
    ml = m.stream_meta.max_len
    for i, r in enumerate(rows):  # the reference feeds prefix + all but the last byte of the longest candidate
        if ml is not None and len(r) + max(T, 1) > ml:
            raise ValueError(f"score_batch: prefix {i} ({len(r)} tokens) + the longest candidate ({T}) goes past "
                             f"this model's max_len {ml}")
    if T == 0:
        return torch.zeros(B, K, device=device)
    was_training = m.training
    m.eval()
    try:
        return _score(m, rows, cands, T, device, mods)
    finally:
        m.train(was_training)


def _tracks(m, rows: list[torch.Tensor], modalities, device) -> list[torch.Tensor]:
    """The prefixes' modality tracks, checked: one per prefix, 1-D, as long as it (a modality-aware model never
    guesses a route)."""
    if modalities is None:
        raise ValueError("score_batch: this model has modality-aware blocks (modality_experts) and needs the "
                         "modality track of every prefix (modalities=[...], e.g. each prompt's .modality); "
                         "refusing to route every token to one expert")
    mods = list(modalities)
    if len(mods) != len(rows):
        raise ValueError(f"score_batch: {len(mods)} modality tracks for {len(rows)} prefixes")
    out = []
    for i, (r, x) in enumerate(zip(rows, mods)):
        t = torch.as_tensor(x, device=device).long()
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if tuple(t.shape) != tuple(r.shape):
            raise ValueError(f"score_batch: the modality track of prefix {i} has shape {tuple(t.shape)}, the "
                             f"prefix {tuple(r.shape)}")
        out.append(t)
    return out


def _score(m, rows: list[torch.Tensor], cands: list[list[int]], T: int, device,
           mods: list[torch.Tensor] | None) -> torch.Tensor:
    B, K = len(rows), len(cands)
    Q = m.units[0]
    wdtype = m.head.weight.dtype
    # rows of one chunk share a prefill length, so a chunk's last outer position is some row's own last needed
    # one: a stage with learned positions never runs past its length
    G_units = BUCKET_UNITS
    n = [int(r.shape[0]) for r in rows]
    p0 = [x // Q for x in n]  # the outer unit holding the first candidate byte
    tail = [x - p * Q for x, p in zip(n, p0)]  # prefix bytes inside unit p_0
    pg = [p - p % G_units for p in p0]  # complete units prefilled (a multiple of the bucket)
    off = [p - q for p, q in zip(p0, pg)]  # units from the prefill's end to unit p_0
    need = [(r + T - 1) // Q + 1 for r in tail]  # units from p_0 holding candidate bytes
    lead = [o * Q + r for o, r in zip(off, tail)]  # prefix bytes in the window (from unit p_g on)
    width = max(o + w for o, w in zip(off, need)) * Q
    window = _window(rows, cands, lead, width, device)  # (B, K, W * Q)
    # modality-aware: the track of the unit before the window (p_g - 1) and of the window, (B, K, (W + 1) * Q)
    mwin = None if mods is None else _modality_window(rows, mods, cands, lead, width + Q, Q, device)

    # 1. prefill of the outer stage, one call per group of prefixes with the same number of units prefilled
    groups: dict[int, list[int]] = defaultdict(list)
    for b, p in enumerate(pg):
        groups[p].append(b)
    block0 = m.blocks[0]
    done = []  # (row indices, cache, outer output at p_g (G, D_0))
    for p, idx in groups.items():
        G = len(idx)
        parts = [m.start[0].to(wdtype).expand(G, 1, -1)]
        if p:
            units = torch.stack([rows[b][: p * Q] for b in idx]).view(G, p, Q)
            parts.append(m.decoder.unit_embedding(0, units).to(wdtype))
        cache = BlockCache()
        kw = {}
        if m.aware[0]:  # position 0 routes as special, position j by the prefix's unit j - 1
            r = [torch.full((G, 1), SPECIAL, dtype=torch.long, device=device)]
            if p:
                r.append(unit_modality(torch.stack([mods[b][: p * Q] for b in idx]).view(G, p, Q)))
            kw["modality"] = torch.cat(r, dim=1)
        h = block0(torch.cat(parts, dim=1), cache, **kw)[:, -1]
        done.append((idx, cache, h))

    # 2. + 3. per chunk of questions: fan out to the candidates, the window's later units through the outer
    # stage (one call), then the inner stages over the units holding candidate bytes, and the head
    if max(o + w for o, w in zip(off, need)) > 1:
        done = _merge(block0, done)
    total = torch.zeros(B, K, dtype=torch.float32, device=device)
    lens = torch.tensor([len(c) for c in cands], device=device)
    mask = (torch.arange(T, device=device)[None, :] < lens[:, None])  # (K, T)
    for idx, cache, h in done:
        per_row = sum(t[0].numel() * t.element_size() for d in cache.layers for t in d.values()) * K
        per_call = max(1, min(MAX_ROWS // K, STATE_BYTES // max(per_row, 1)))
        for a in range(0, len(idx), per_call):
            sub = idx[a:a + per_call]
            G = len(sub)
            W = max(off[b] + need[b] for b in sub)  # outer positions p_g .. p_g + W - 1 of this chunk
            Wc = max(need[b] for b in sub)
            win = window[sub][..., : W * Q]  # (G, K, W * Q)
            hs = [h[a:a + G].repeat_interleave(K, dim=0)[:, None]]  # (G * K, 1, D_0)
            if W > 1:
                c = BlockCache([dict(d) for d in cache.layers], cache.length)
                c.select(torch.arange(a, a + G, device=device).repeat_interleave(K))
                inp = m.decoder.unit_embedding(0, win.reshape(G * K, W, Q)[:, : W - 1]).to(wdtype)
                kw = {}
                if m.aware[0]:  # positions p_g + 1 .. route by units p_g .. (units 1 .. of the modality window)
                    kw["modality"] = unit_modality(mwin[sub][..., Q:W * Q].reshape(G * K, W - 1, Q))
                hs.append(block0(inp, c, **kw))
            h0 = torch.cat(hs, dim=1).view(G, K, W, -1)
            mw = None if mwin is None else mwin[sub][..., :(W + 1) * Q]  # units p_g - 1 .. p_g + W - 1
            if any(off[b] for b in sub):  # each row's units p_0 .. p_0 + Wc - 1 (past its need: unread)
                o = torch.tensor([off[b] for b in sub], device=device)[:, None]
                at = (o + torch.arange(Wc, device=device)).clamp(max=W - 1)[:, None, :, None].expand(G, K, Wc, 1)
                h0 = h0.gather(2, at.expand(G, K, Wc, h0.shape[-1]))
                win = win.view(G, K, W, Q).gather(2, at.expand(G, K, Wc, Q)).view(G, K, Wc * Q)
                if mw is not None:  # and the modality of units p_0 - 1 .. p_0 + Wc - 1
                    at = (o + torch.arange(Wc + 1, device=device)).clamp(max=W)[:, None, :, None]
                    mw = mw.view(G, K, W + 1, Q).gather(2, at.expand(G, K, Wc + 1, Q)).view(G, K, (Wc + 1) * Q)
            else:
                win = win[..., : Wc * Q]
                mw = None if mw is None else mw[..., :(Wc + 1) * Q]
            lp = _inner_logprobs(m, h0.reshape(G * K, Wc, -1), win, [tail[b] for b in sub], T, wdtype, mw)
            acc = torch.zeros(G, K, dtype=torch.float32, device=device)
            for t in range(T):  # summed in byte order, as the reference
                acc += torch.where(mask[:, t], lp[..., t], torch.zeros_like(lp[..., t]))
            total[sub] = acc
    return total


def _inner_logprobs(m, h0: torch.Tensor, window: torch.Tensor, tail: list[int], T: int, wdtype,
                    mw: torch.Tensor | None) -> torch.Tensor:
    """h0: (G * K, W, D_0) outer outputs over the window; window: (G, K, W * Q_0) ids; tail: each row's prefix
    bytes in the window; mw: None or (G, K, (W + 1) * Q_0) the modality of the unit before the window and of the
    window. -> (G, K, T) fp32 log-probabilities of window[..., tail + t] (clamped at the end)."""
    G, K, width = window.shape
    N, W = G * K, h0.shape[1]
    h = h0
    if m.num_stages > 1:  # the inner stages, teacher-forced over whole outer units (as MBLM.hidden)
        u = m.unit_embeddings(window.view(N, W, *m.lengths[1:]), first=1)
        for s in range(1, m.num_stages):
            ctx = m.stage_context(s - 1, h)  # (N_s, P_s, D_s)
            us = u[s].reshape(ctx.shape).to(wdtype)
            inp = torch.cat((m.start[s].to(wdtype).expand(ctx.shape[0], 1, -1), us[:, :-1]), dim=1) + ctx
            kw = {}
            if m.aware[s]:  # the position covering unit j of Q_s bytes routes by unit j - 1 (routing.stage_routes)
                Q, Qs = m.units[0], m.units[s]
                um = unit_modality(mw.reshape(N, (W + 1) * Q // Qs, Qs))
                kw["modality"] = um[:, Q // Qs - 1:-1].reshape(ctx.shape[:2])
            h = m.blocks[s](inp, **kw)
    h = h.reshape(N, width, -1)
    offs = torch.arange(T, device=h.device)
    pos = (torch.tensor(tail, device=h.device)[:, None, None] + offs).expand(G, K, T).reshape(N, T)
    pos = pos.clamp(max=width - 1)  # past a short candidate: masked by the caller
    target = window.view(N, width).gather(1, pos)
    hid = h.gather(1, pos[..., None].expand(N, T, h.shape[-1]))
    lp = torch.log_softmax(m.head(hid).float(), dim=-1).gather(2, target[..., None])
    return lp.view(G, K, T)


def _window(rows, cands, lead: list[int], width: int, device) -> torch.Tensor:
    """(B, K, width) ids: the last ``lead[b]`` bytes of each prefix, then each candidate, then PAD."""
    B, K, T = len(rows), len(cands), max(len(c) for c in cands)
    padded = torch.full((K, T), vocab.PAD, dtype=torch.long)
    for k, c in enumerate(cands):
        padded[k, :len(c)] = torch.tensor(c, dtype=torch.long)
    padded = padded.to(device)
    out = torch.full((B, K, width), vocab.PAD, dtype=torch.long, device=device)
    for b, r in enumerate(lead):
        if r:
            out[b, :, :r] = rows[b][len(rows[b]) - r:]
        out[b, :, r:r + T] = padded
    return out


def _modality_window(rows, mods, cands, lead: list[int], width: int, Q: int, device) -> torch.Tensor:
    """(B, K, width) Modality codes of the unit before the window (``special`` before the stream's start), the
    last ``lead[b]`` bytes of each prefix, then each candidate's tokens by the generation rule from the segment
    open after its prefix (routing.next_modality, as Decoder.score feeds them), then ``special`` (PAD)."""
    B, K, T = len(rows), len(cands), max(len(c) for c in cands)
    padded = torch.full((K, T), vocab.PAD, dtype=torch.long)
    for k, c in enumerate(cands):
        padded[k, :len(c)] = torch.tensor(c, dtype=torch.long)
    seg = torch.full((B,), SPECIAL, dtype=torch.long, device=device)  # the segment open after an empty prefix
    full = [b for b, r in enumerate(rows) if len(r)]
    if full:
        i = torch.tensor(full, device=device)
        seg[i] = open_segment(torch.stack([rows[b][-1] for b in full]), torch.stack([mods[b][-1] for b in full]))
    seg = seg.repeat_interleave(K)
    tok = padded.to(device).repeat(B, 1)  # (B * K, T)
    cm = []
    for t in range(T):
        mod, seg = next_modality(tok[:, t], seg)
        cm.append(mod)
    cm = torch.stack(cm, dim=1).view(B, K, T)
    out = torch.full((B, K, width), SPECIAL, dtype=torch.long, device=device)
    for b, r in enumerate(lead):
        n = len(rows[b])
        before = min(Q, n - r)  # the unit before the window: Q prefix bytes, none at the stream's start
        out[b, :, Q - before:Q + r] = mods[b][n - r - before:]
        out[b, :, Q + r:Q + r + T] = cm[b]
    return out


def _merge(block, done):
    """One group from several when their caches can be stacked: same tensors (shapes past the batch dim,
    dtypes) in every layer and either the same length or a block whose forward never reads it (SSM stacks: the
    state has a fixed size and no position). Otherwise the groups as they are (e.g. attention KV caches of
    different lengths)."""
    if len(done) < 2:
        return done
    caches = [c for _, c, _ in done]
    lengths = {c.length for c in caches}
    if len(lengths) > 1 and type(block).forward is not SSMStack.forward:
        return done
    first = caches[0].layers
    for c in caches[1:]:
        if len(c.layers) != len(first):
            return done
        for a, b in zip(c.layers, first):
            if a.keys() != b.keys() or any(a[k].shape[1:] != b[k].shape[1:] or a[k].dtype != b[k].dtype for k in a):
                return done
    layers = [{k: torch.cat([c.layers[i][k] for c in caches]) for k in first[i]} for i in range(len(first))]
    idx = [b for i, _, _ in done for b in i]
    h = torch.cat([x for _, _, x in done])
    return [(idx, BlockCache(layers, max(lengths)), h)]


__all__ = ["score_batch", "MAX_ROWS", "STATE_BYTES", "BUCKET_UNITS"]
