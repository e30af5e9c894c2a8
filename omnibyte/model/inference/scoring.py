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
from .sampling import as_batch

MAX_ROWS = 2048  # (prefix, candidate) rows per chunk of steps 2-3 (bounds the inner stages' activations)
STATE_BYTES = 1 << 30  # and the fanned-out outer-stage states per chunk (Mamba-2: ~0.5 MB per layer and row)
# prefixes are prefilled to a multiple of this many outer units, so one call serves every prefix whose complete
# units round down to the same multiple; each row's remaining prefix units then run with its candidates
# (K-fold work on at most BUCKET_UNITS - 1 positions, against one launch-bound call per distinct length)
BUCKET_UNITS = 8


@torch.no_grad()
def score_batch(model, prefixes: Sequence, candidates: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, K) fp32 log-likelihoods (nats): row b = ``model.score(prefixes[b], candidates)``. ``prefixes``: 1-D
    token sequences (tensors, lists or bytes) of any lengths; ``candidates``: token lists (may be empty)."""
    m = model
    if getattr(m.stream_meta, "modality_aware", False):  # its blocks route by modality: not computed here
        raise NotImplementedError("scoring.score_batch: a modality-aware model (modality_experts) is scored prefix "
                                  "by prefix (StreamModel.score_batch with modalities=)")
    device = m.head.weight.device
    rows = []
    for i, p in enumerate(prefixes):
        t = as_batch(p, device)
        if t.shape[0] != 1:
            raise ValueError(f"score_batch: prefix {i} must be a single sequence, got shape {tuple(t.shape)}")
        rows.append(t[0])
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
        return _score(m, rows, cands, T, device)
    finally:
        m.train(was_training)


def _score(m, rows: list[torch.Tensor], cands: list[list[int]], T: int, device) -> torch.Tensor:
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
    window = _window(rows, cands, lead, max(o + w for o, w in zip(off, need)) * Q, device)  # (B, K, W * Q)

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
            parts.append(_unit_embedding(m, 0, units).to(wdtype))
        cache = BlockCache()
        h = block0(torch.cat(parts, dim=1), cache)[:, -1]
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
                inp = _unit_embedding(m, 0, win.reshape(G * K, W, Q)[:, : W - 1]).to(wdtype)
                hs.append(block0(inp, c))
            h0 = torch.cat(hs, dim=1).view(G, K, W, -1)
            if any(off[b] for b in sub):  # each row's units p_0 .. p_0 + Wc - 1 (past its need: unread)
                at = (torch.tensor([off[b] for b in sub], device=device)[:, None] +
                      torch.arange(Wc, device=device)).clamp(max=W - 1)[:, None, :, None].expand(G, K, Wc, 1)
                h0 = h0.gather(2, at.expand(G, K, Wc, h0.shape[-1]))
                win = win.view(G, K, W, Q).gather(2, at.expand(G, K, Wc, Q)).view(G, K, Wc * Q)
            else:
                win = win[..., : Wc * Q]
            lp = _inner_logprobs(m, h0.reshape(G * K, Wc, -1), win, [tail[b] for b in sub], T, wdtype)
            acc = torch.zeros(G, K, dtype=torch.float32, device=device)
            for t in range(T):  # summed in byte order, as the reference
                acc += torch.where(mask[:, t], lp[..., t], torch.zeros_like(lp[..., t]))
            total[sub] = acc
    return total


def _inner_logprobs(m, h0: torch.Tensor, window: torch.Tensor, tail: list[int], T: int, wdtype) -> torch.Tensor:
    """h0: (G * K, W, D_0) outer outputs over the window; window: (G, K, W * Q_0) ids; tail: each row's prefix
    bytes in the window. -> (G, K, T) fp32 log-probabilities of window[..., tail + t] (clamped at the end)."""
    G, K, width = window.shape
    N, W = G * K, h0.shape[1]
    h = h0
    if m.num_stages > 1:  # the inner stages, teacher-forced over whole outer units (as MBLM.hidden)
        u = m.unit_embeddings(window.view(N, W, *m.lengths[1:]), first=1)
        for s in range(1, m.num_stages):
            ctx = m.stage_context(s - 1, h)  # (N_s, P_s, D_s)
            us = u[s].reshape(ctx.shape).to(wdtype)
            inp = torch.cat((m.start[s].to(wdtype).expand(ctx.shape[0], 1, -1), us[:, :-1]), dim=1) + ctx
            h = m.blocks[s](inp)
    h = h.reshape(N, width, -1)
    offs = torch.arange(T, device=h.device)
    pos = (torch.tensor(tail, device=h.device)[:, None, None] + offs).expand(G, K, T).reshape(N, T)
    pos = pos.clamp(max=width - 1)  # past a short candidate: masked by the caller
    target = window.view(N, width).gather(1, pos)
    hid = h.gather(1, pos[..., None].expand(N, T, h.shape[-1]))
    lp = torch.log_softmax(m.head(hid).float(), dim=-1).gather(2, target[..., None])
    return lp.view(G, K, T)


def _unit_embedding(m, s: int, units: torch.Tensor) -> torch.Tensor:
    """units: (N, T, Q_s) ids -> (N, T, D_s) (as Decoder.unit_embedding)."""
    N, T, _ = units.shape
    return m.unit_embeddings(units.reshape(N, T, *m.lengths[s + 1:]), first=s)[s]


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
