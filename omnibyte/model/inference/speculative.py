"""Speculative decoding for an MBLM: a drafter proposes ``k`` bytes, the model checks them in one
teacher-forced pass from its cached state, and the state rolls back to the last byte it kept.

* :func:`verify` -- a ``feed`` that returns the logits at *every* new position, (N, T, V), plus the restore
  points to roll the :class:`~omnibyte.model.cache.GenerationState` back to any prefix of the fed tokens
  (:meth:`Verification.rollback`). Each stage runs the positions it has not seen once: a Transformer stage
  all of a parent unit's new positions in one call, its KV cache cut back on rollback
  (``cache_time_dims``); a recurrent (Mamba) stage one position per call, its state cloned after each
  (for the global stage that is one call per patch, as in plain decoding).
* :func:`speculative_generate` -- the decoding loop behind ``generate(..., draft=..., draft_len=k)``.
  Each round the target feeds the last kept byte and the k drafts in one :func:`verify`, keeps the longest
  accepted prefix and adds one byte of its own (the correction, or a bonus byte when all k are kept).
  Greedy (temperature 0): a draft is kept iff it is the target's argmax, so the output is plain greedy
  decoding's. Sampling: the standard rejection scheme (Leviathan et al. 2023; Chen et al. 2023) over the
  distributions :func:`~omnibyte.model.inference.sampling.sampling_probs` gives for the target (p) and the
  drafter (q) with the same temperature / top-k / top-p: keep draft x with probability min(1, p(x)/q(x));
  on rejection draw from max(0, p - q) renormalised; every emitted byte is then distributed exactly as
  plain sampling's. Rows of a batch advance together: each round every row keeps as many drafts as the row
  that accepted fewest, plus one byte of its own (an accepted draft is as exact as a correction), so the
  cached states stay aligned; a batch's acceptance is therefore that of its least lucky row. A row whose draft
  is shorter than the batch's is padded (``Drafter.draft_lengths``); the pad slots count neither as drafted nor
  as kept. One round loop, :func:`~omnibyte.model.inference.rounds.rounds`, serves the eager passes (backend
  :class:`EagerPasses`) and the static
  ones of :mod:`~omnibyte.model.inference.static_passes` (``StaticPasses``); a backend only feeds, verifies and
  rolls back.
* Drafters: :class:`ModelDrafter`, a smaller byte model with the same vocabulary and token contract (any
  model with an MBLM's ``decoder``); :class:`SelfDrafter`, self-speculation by layer skipping (the model's own
  weights, only the first layers of each stage: no second model, no second tokenizer);
  :class:`~omnibyte.model.inference.drafters.LookupDrafter` (``draft="lookup"``), prompt lookup: drafts copied
  from the context after an earlier occurrence of its last bytes, no model at all; a
  :class:`~omnibyte.model.inference.drafters.Drafter` subclass may draft any other way. A round where the
  drafter proposes nothing is one plain step of the model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch

from ..cache import BlockCache, GenerationState
from .drafters import Drafter, LookupDrafter
from .rounds import accept, accept_greedy, count_round, rounds  # noqa: F401  (the round loop; re-exported)
from .sampling import as_batch, sampling_probs

__all__ = ["Drafter", "LookupDrafter", "ModelDrafter", "SelfDrafter", "accept", "accept_greedy", "as_drafter",
           "skip_layers", "speculative_generate", "verify"]

log = logging.getLogger("omnibyte.model")


def _time_dims(model, s: int):
    # blocks declare append-only cache entries; an unknown block is treated as recurrent (always exact)
    return getattr(model.blocks[s], "cache_time_dims", None)


class Verification:
    """The result of :func:`verify`: ``logits`` (N, T, V), ``logits[:, i]`` predicting the token after the
    i-th fed one, and :meth:`rollback`."""

    def __init__(self, model, state: GenerationState, start: int, logits: torch.Tensor, points: dict, ctxs: dict):
        self.model, self.state, self.start, self.logits = model, state, start, logits
        self._points, self._ctxs = points, ctxs
        self._done = False

    def rollback(self, keep: int) -> None:
        """Leave the state as ``feed`` would after the first ``keep`` (1..T) of the verified tokens."""
        m, state = self.model, self.state
        T = self.logits.shape[1]
        if not 1 <= keep <= T:
            raise ValueError(f"rollback: keep must be in 1..{T}, got {keep}")
        if self._done:
            raise RuntimeError("rollback: this verification was already rolled back (once only: it trims tokens)")
        self._done = True
        n = self.start + keep  # the index the restored state predicts
        state.tokens = state.tokens[:, :n - state.offset]
        for s, st in enumerate(state.stages):
            u = n // m.units[s]
            snap, length = self._points[(s, u)]
            st.cache = snap.truncated(length, _time_dims(m, s))
            st.parent = u // m.lengths[s] if s else 0
            if s + 1 < m.num_stages:
                st.ctx = self._ctxs[(s, u)]
        state.trim(max(0, (n // m.units[0] - 1) * m.units[0]))


@torch.no_grad()
def verify(decoder, state: GenerationState, tokens: torch.Tensor) -> Verification:
    """Append ``tokens`` (N, T), T >= 1, to the stream as ``decoder.feed`` would, returning the logits at all T
    positions and restore points for every prefix. ``logits[:, -1]`` is what ``feed`` would return. The state is
    only usable again after one :meth:`Verification.rollback` (``rollback(T)`` keeps every token)."""
    m = decoder.model
    N, T = tokens.shape
    if T < 1:
        raise ValueError("verify: at least one token")
    a = state.length
    ml = m.stream_meta.max_len
    if ml is not None and a + T + 1 > ml:
        raise ValueError(f"generation past this model's max_len {ml}")
    state.tokens = torch.cat((state.tokens, tokens.to(state.tokens.device)), dim=1)
    toks, off = state.tokens, state.offset
    dtype = m.head.weight.dtype
    S = m.num_stages
    points: dict[tuple[int, int], tuple[BlockCache, int]] = {}  # (stage, unit) -> (cache, length)
    ctxs: dict[tuple[int, int], torch.Tensor] = {}  # (stage, unit) -> context for stage + 1
    outs: list[torch.Tensor] = []
    lo_n, hi_n = a + 1, a + T  # the indices predicted
    for s in range(S):
        Qs, Ps = m.units[s], m.lengths[s]
        st, td = state.stages[s], _time_dims(m, s)
        u, u_hi = lo_n // Qs, hi_n // Qs  # stage-s units (global index) covering the predicted indices
        while u <= u_hi:
            parent = u // Ps if s else 0
            pos = u % Ps if s else u  # position of unit u in its parent's stage-s sequence
            unit0 = u - pos  # global index of position 0
            last = min(u_hi, unit0 + Ps - 1) if s else u_hi
            cache = st.cache if parent == st.parent else BlockCache()
            first = cache.length
            if pos < first:  # the position the last feed ended on: its cache and context are current
                if pos != first - 1 or s + 1 == S:  # pragma: no cover
                    raise RuntimeError("generation state out of sync")
                points[(s, u)] = (cache.snapshot(td), first)
                ctxs[(s, u)] = st.ctx
            p1 = last - unit0
            if p1 >= first:
                parts = [m.start[s].to(dtype).expand(N, 1, -1)] if first == 0 else []
                lo = max(first - 1, 0)  # units lo..p1-1 are the inputs of positions first..p1
                if p1 > lo:
                    i0 = (unit0 + lo) * Qs - off
                    units = toks[:, i0:i0 + (p1 - lo) * Qs].reshape(N, p1 - lo, Qs)
                    parts.append(decoder.unit_embedding(s, units).to(parts[0].dtype if parts else dtype))
                inp = torch.cat(parts, dim=1)  # (N, p1 - first + 1, D_s)
                if s:
                    inp = inp + ctxs[(s - 1, parent)][:, first:p1 + 1]
                if td is not None:  # one call; rollback cuts the cache back
                    h = m.blocks[s](inp, cache)
                    snap = cache.snapshot(td)
                    for q in range(first, p1 + 1):
                        points[(s, unit0 + q)] = (snap, q + 1)
                else:  # recurrent state: one position per call, a clone after each
                    hs = []
                    for j in range(inp.shape[1]):
                        hs.append(m.blocks[s](inp[:, j:j + 1], cache))
                        points[(s, unit0 + first + j)] = (cache.snapshot(None), cache.length)
                    h = torch.cat(hs, dim=1)
                if s + 1 < S:
                    c = m.stage_context(s, h).view(N, h.shape[1], m.lengths[s + 1], m.widths[s + 1])
                    for j in range(h.shape[1]):
                        ctxs[(s, unit0 + first + j)] = c[:, j]
                else:
                    outs.append(m.head(h).float())
            u = last + 1
    logits = torch.cat(outs, dim=1)
    if logits.shape[1] != T:  # pragma: no cover
        raise RuntimeError(f"verify computed {logits.shape[1]} positions for {T} tokens")
    return Verification(m, state, a, logits, points, ctxs)


def snapshot_state(model, state: GenerationState) -> tuple:
    """A copy of ``state`` to return to with :func:`restore_state` (KV shared, recurrent state cloned)."""
    return (state.tokens, state.offset,
            [(st.cache.snapshot(_time_dims(model, s)), st.parent, st.ctx) for s, st in enumerate(state.stages)])


def restore_state(model, state: GenerationState, snap: tuple) -> None:
    state.tokens, state.offset, stages = snap
    for s, (st, (cache, parent, ctx)) in enumerate(zip(state.stages, stages)):
        st.cache, st.parent, st.ctx = cache.truncated(cache.length, _time_dims(model, s)), parent, ctx


class _CachedDrafter(Drafter):
    """A drafter that samples from an MBLM decoder's ``feed``, with a snapshot before each drafted byte."""

    def __init__(self, model):
        super().__init__()
        dec = getattr(model, "decoder", None)
        if dec is None:
            raise TypeError(f"draft model {type(model).__name__} has no cached decoder (an MBLM's model.decoder)")
        self.model, self.dec = model, dec
        self.device = model.head.weight.device

    def reset(self, context: torch.Tensor) -> None:
        self.model.eval()
        self.state = self.dec.new_state(context.shape[0], self.device)
        self.logits = self._feed(context.to(self.device))

    def _feed(self, tokens: torch.Tensor) -> torch.Tensor:
        try:
            return self.dec.feed(self.state, tokens)
        except ValueError as e:  # e.g. past a learned-position drafter's max_len: say which model
            raise ValueError(f"draft model: {e}") from e

    def propose(self, k, temperature, top_k, top_p, generator):
        toks, qs, self.snaps = [], [], []
        if not k:  # no room for drafts this round: the next advance feeds its token alone
            self.drafts = torch.zeros(self.logits.shape[0], 0, dtype=torch.long, device=self.device)
            return self.drafts, None
        for i in range(k):
            if temperature <= 0:
                d = self.logits.float().argmax(-1)
            else:
                q = sampling_probs(self.logits, temperature, top_k, top_p)
                d = torch.multinomial(q, 1, generator=generator).squeeze(1)
                qs.append(q)
            toks.append(d)
            if i + 1 < k:
                self.snaps.append(snapshot_state(self.model, self.state))
                self.logits = self._feed(d[:, None])
        self.drafts = torch.stack(toks, dim=1)
        return self.drafts, (torch.stack(qs, dim=1) if qs else None)

    def advance(self, kept: int, tokens: torch.Tensor) -> None:
        k = self.drafts.shape[1]
        tok = tokens.to(self.device).view(-1, 1)
        if kept == k:
            tok = torch.cat((self.drafts[:, -1:], tok), dim=1)
        elif kept < k - 1:
            restore_state(self.model, self.state, self.snaps[kept])
        self.snaps = []
        self.logits = self._feed(tok)


class ModelDrafter(_CachedDrafter):
    """A smaller byte model drafts (an MBLM with the target's vocabulary and token contract)."""

    def __init__(self, model, target=None):
        super().__init__(model)
        if target is not None:
            a, b = model.stream_meta, target.stream_meta
            if (a.vocab_size, a.contract_version) != (b.vocab_size, b.contract_version):
                raise ValueError(f"draft model: vocabulary {a.vocab_size} / token contract {a.contract_version} "
                                 f"differ from the target's {b.vocab_size} / {b.contract_version}")


def skip_layers(model, keep: Sequence[int]):
    """A view of an MBLM that runs only the first ``keep[s]`` layers of each stage s (then the stage's final
    norm, the head as usual). Weights are shared, nothing is copied."""
    keep = [int(k) for k in keep]
    if len(keep) != model.num_stages:
        raise ValueError(f"draft layers: {len(keep)} numbers for a model of {model.num_stages} stages "
                         f"(one per stage, outermost first)")
    blocks = []
    for s, (blk, n) in enumerate(zip(model.blocks, keep)):
        if not 1 <= n <= len(blk.layers):
            raise ValueError(f"draft layers: stage {s} has {len(blk.layers)} layers; keep 1..{len(blk.layers)}, "
                             f"got {n}")
        view = copy.copy(blk)
        view._modules = dict(blk._modules)
        view._modules["layers"] = blk.layers[:n]
        blocks.append(view)
    out = copy.copy(model)
    out._modules = dict(model._modules)
    out._modules["blocks"] = torch.nn.ModuleList(blocks)
    return out


class SelfDrafter(_CachedDrafter):
    """Self-speculation by layer skipping (as Draft & Verify, Zhang et al. 2024; LayerSkip, Elhoushi et al.
    2024): the model drafts with only the first ``keep[s]`` layers of each stage s, its own weights and
    vocabulary. How often the shallow model agrees depends on the trained model (measure it: ``acceptance``)."""

    def __init__(self, model, keep: Sequence[int]):
        super().__init__(skip_layers(model, keep))
        self.keep = list(keep)


DRAFTERS = {"lookup": LookupDrafter}  # drafters that need nothing but their name: generate(..., draft="lookup")


def as_drafter(draft, target) -> Drafter:
    """``draft``: a :class:`Drafter`, a model (wrapped in a :class:`ModelDrafter`) or a name in ``DRAFTERS``
    (a new drafter of that class with its defaults)."""
    if isinstance(draft, Drafter):
        return draft
    if isinstance(draft, torch.nn.Module):
        return ModelDrafter(draft, target)
    if isinstance(draft, str) and draft in DRAFTERS:
        return DRAFTERS[draft]()
    got = repr(draft) if isinstance(draft, str) else type(draft).__name__
    raise TypeError(f"draft must be a Drafter, a byte model or one of {sorted(DRAFTERS)}, got {got}")


@torch.no_grad()
def speculative_generate(decoder, prompt, max_new_bytes: int, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, stop_tokens=(), generator: torch.Generator | None = None,
                         draft=None, draft_len: int = 4, static_loop=None) -> torch.Tensor:
    """``Decoder.generate`` with a drafter (same arguments and output: (B, <= max_new_bytes), rows that stop
    early padded with PAD, ending at the last row's stop when every row stopped). See the module docstring.
    ``static_loop``: :func:`~omnibyte.model.inference.static_passes.generate_static` (static passes; None: eager)."""
    m = decoder.model
    if getattr(m, "modality_aware", False):
        raise NotImplementedError("speculative decoding: modality-aware stages (modality_experts) are not "
                                  "supported yet; generate without draft=")
    device = m.head.weight.device
    prompt = as_batch(prompt, device)
    if int(draft_len) != draft_len or draft_len < 1:
        raise ValueError(f"draft_len must be an integer >= 1, got {draft_len}")
    drafter = as_drafter(draft, m)
    if max_new_bytes <= 0:
        return torch.zeros(prompt.shape[0], 0, dtype=torch.long, device=device)
    # both models decode in eval mode and are handed back in the mode they came in (the drafter's reset sets it)
    modes = [(x, x.training) for x in (m, getattr(drafter, "model", None)) if isinstance(x, torch.nn.Module)]
    m.eval()
    try:
        args = decoder, prompt, max_new_bytes, temperature, top_k, top_p, stop_tokens, generator, drafter, int(draft_len)
        out = static_loop(*args) if static_loop is not None else None  # None: the model has no static passes
        if out is None:
            out = _generate(*args)
    finally:
        for x, was_training in reversed(modes):
            x.train(was_training)
    a = drafter.acceptance  # None: nothing drafted, no rate
    log.debug("speculative decoding: %d rounds, %d drafted, %d kept (%s)", drafter.rounds, drafter.proposed,
              drafter.accepted, "no acceptance rate" if a is None else f"{100 * a:.1f}%")
    return out


class EagerPasses:
    """The backend of :func:`rounds` on a :class:`GenerationState`: ``prefill`` (prompt (B, P)) and ``step``
    (tokens (B, 1)) -> logits (B, V) through ``Decoder.feed``; ``verify`` (tokens (B, T), the last kept byte then
    the drafts) -> logits (B, T, V) through :func:`verify`, then ``argmax`` (B, T) of them and one ``rollback(keep)``
    to the first ``keep`` tokens. The static backend: :class:`~omnibyte.model.inference.static_passes.StaticPasses`."""

    def __init__(self, decoder, state: GenerationState):
        self.decoder, self.state = decoder, state
        self.ver: Verification | None = None

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.decoder.feed(self.state, prompt)

    step = prefill

    def room(self) -> None:  # a pass takes any number of drafts
        return None

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ver = verify(self.decoder, self.state, tokens)
        return self.ver.logits

    def argmax(self) -> torch.Tensor:
        return self.ver.logits.argmax(-1)

    def rollback(self, keep: int) -> None:
        self.ver.rollback(keep)
        self.ver = None


def _generate(decoder, prompt, max_new: int, temperature, top_k, top_p, stop_tokens, generator, drafter,
              draft_len) -> torch.Tensor:
    """The eager loop: :func:`rounds` on :class:`EagerPasses` over a new state."""
    passes = EagerPasses(decoder, decoder.new_state(prompt.shape[0], prompt.device))
    return rounds(passes, prompt, max_new, temperature, top_k, top_p, stop_tokens, generator, drafter, draft_len)
