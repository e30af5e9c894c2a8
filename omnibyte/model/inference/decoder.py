"""Incremental decoding of an MBLM: per-stage caches (``feed``), sampling (``generate``) and closed-set
scoring (``score``). :class:`Decoder` is composed with a model (``MBLM.decoder``): it reads the model's
stages, embeddings and head and holds no weights of its own. The static, CUDA-graph version of the per-byte
step is :mod:`omnibyte.model.inference.graphs`.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections import OrderedDict

import torch

from ... import vocab
from ..cache import GenerationState, StageState
from ..routing import SPECIAL, check_modality, open_segment, routes_from_units, unit_modality
from .sampling import as_batch, sample
from .speculative import speculative_generate

log = logging.getLogger("omnibyte.model")


def check_room(model, prompt_len: int, max_new_bytes: int) -> None:
    """ValueError when a prompt of ``prompt_len`` tokens plus ``max_new_bytes`` passes the model's ``max_len``
    (a global stage with learned positions)."""
    ml = model.stream_meta.max_len
    if ml is not None and prompt_len + max_new_bytes > ml:
        raise ValueError(f"generate: a {prompt_len}-token prompt plus max_new_bytes={max_new_bytes} passes this "
                         f"model's max_len {ml} (learned positions); ask for at most {max(0, ml - prompt_len)} "
                         f"new bytes")


def _weights(model) -> tuple[tuple, tuple]:
    """What a GraphStepper's compiled steps and captured graphs read: every module, parameter and buffer object
    of ``model`` and the address of each tensor's storage (``load_state_dict`` copies into the same storage;
    ``model.to(dtype)``, ``param.data = ...`` or a replaced module changes these)."""
    mods = tuple(model.modules())
    tens = tuple(t for mod in mods for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None)
    return mods + tens, tuple(t.data_ptr() for t in tens)


class StepperCache:
    """The :class:`~omnibyte.model.inference.graphs.GraphStepper` s that ``generate(use_graphs=True)`` keeps
    between calls for one model, by what their graphs depend on (:meth:`Decoder.stepper`). Bounded: the
    ``size`` most recently used keys (each stepper holds its static buffers -- per row, the Mamba states of every
    layer -- and its graphs' memory pool); all are dropped when the model's modules or parameter / buffer tensors
    are replaced. A copy or pickle of the model starts with an empty cache."""

    size = 2

    def __init__(self, owner=None):
        self.owner = weakref.ref(owner) if owner is not None else None
        self.steppers: OrderedDict = OrderedDict()
        self.weights: tuple = ((), ())

    def __deepcopy__(self, memo):  # CUDA graphs and compiled functions are not copied
        return StepperCache()

    def __reduce__(self):
        return StepperCache, ()

    def get(self, key, model):
        objs, ptrs = _weights(model)
        old_objs, old_ptrs = self.weights
        if ptrs != old_ptrs or len(objs) != len(old_objs) or any(a is not b for a, b in zip(objs, old_objs)):
            self.steppers.clear()  # new weights or structure: graphs would read stale tensors
            self.weights = (objs, ptrs)
            return None
        st = self.steppers.get(key)
        if st is not None:
            self.steppers.move_to_end(key)
        return st

    def put(self, key, stepper) -> None:
        self.steppers[key] = stepper
        self.steppers.move_to_end(key)
        while len(self.steppers) > max(self.size, 1):
            self.steppers.popitem(last=False)


class Decoder:
    """``new_state`` / ``feed`` / ``generate`` / ``score`` over an :class:`~omnibyte.model.mblm.MBLM`.

    The model provides ``num_stages``, ``units``, ``lengths``, ``widths``, ``start``, ``blocks``, ``head``,
    ``stream_meta``, ``unit_embeddings(x, first)`` and ``stage_context(s, h)``."""

    # generate(): check for "every row stopped" every this many bytes (None: 8 on CUDA, where the check waits
    # for the GPU, 1 elsewhere); the output is the same either way
    stop_check_every: int | None = None
    # generate(use_graphs=True) off CUDA decodes with eager feed; True runs the GraphStepper's static step there
    # (eagerly, no graphs: what tests use to check the stepper and its reuse without a GPU)
    static_step_off_cuda: bool = False

    def __init__(self, model):
        self.model = model

    def _steppers(self) -> StepperCache:
        m = self.model
        cache = m.__dict__.get("_graph_steppers")
        if cache is None or cache.owner is None or cache.owner() is not m:  # (a shallow copy shares __dict__)
            cache = StepperCache(m)
            m.__dict__["_graph_steppers"] = cache
        return cache

    def stepper(self, state: GenerationState, compile_step: bool | str = False):
        """A :class:`~omnibyte.model.inference.graphs.GraphStepper` continuing ``state``: the one kept from an
        earlier call with the same key -- batch rows, device, parameter dtype, autocast, ``compile_step``,
        ``GraphStepper.fuse_linears`` / ``ssm_kernels`` and the decode kernels' ``use_pdl`` -- reset to ``state`` (its captured graphs
        and compiled steps reused), else a new one, kept (:class:`StepperCache`). NotImplementedError where the
        model has no static step (e.g. a Transformer global stage)."""
        from . import kernels as decode_kernels
        from .graphs import GraphStepper

        m = self.model
        dev = m.head.weight.device
        autocast = torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type)
        key = (int(state.tokens.shape[0]), dev, m.head.weight.dtype, autocast, compile_step,
               GraphStepper.fuse_linears, GraphStepper.ssm_kernels, decode_kernels.use_pdl)
        cache = self._steppers()
        st = cache.get(key, m)
        if st is None:
            st = GraphStepper(m, state, compile=compile_step)
            cache.put(key, st)
        else:
            st.reset(state)
        return st

    def kept_steppers(self) -> list:
        """The GraphSteppers kept for this model, least recently used first (benchmarks read their ``captures``)."""
        return list(self._steppers().steppers.values())

    def clear_steppers(self) -> None:
        """Drop the kept GraphSteppers (their static buffers and CUDA graphs' memory)."""
        self._steppers().steppers.clear()

    def new_state(self, batch: int, device: torch.device | None = None) -> GenerationState:
        m = self.model
        device = device or m.head.weight.device
        state = GenerationState([StageState() for _ in range(m.num_stages)],
                                torch.zeros(batch, 0, dtype=torch.long, device=device))
        if m.modality_aware:
            state.modality = torch.zeros(batch, 0, dtype=torch.long, device=device)
            state.segment = torch.full((batch,), SPECIAL, dtype=torch.long, device=device)
        return state

    def unit_embedding(self, s: int, units: torch.Tensor) -> torch.Tensor:
        """units: (N, T, Q_s) byte ids -> (N, T, D_s)."""
        m = self.model
        N, T, _ = units.shape
        x = units.reshape(N, T, *m.lengths[s + 1:])
        return m.unit_embeddings(x, first=s)[s]

    @torch.no_grad()
    def feed(self, state: GenerationState, new_tokens: torch.Tensor, modality: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Append ``new_tokens`` (N, k), k >= 0, to the stream and return the logits (N, V) predicting the
        next token. Each stage processes only the positions it has not seen (prefill for long prompts,
        one position per new byte afterwards). ``modality`` (N, k): their Modality codes, required by a
        modality-aware model (:meth:`next_modality` gives those of generated tokens)."""
        m = self.model
        if m.modality_aware and new_tokens.numel():
            mod = check_modality(modality, new_tokens.to(state.tokens.device), "feed")
            state.modality = torch.cat((state.modality, mod), dim=1)
            state.segment = open_segment(new_tokens[:, -1].to(mod.device), mod[:, -1], state.base)
        if new_tokens.numel():
            state.tokens = torch.cat((state.tokens, new_tokens.to(state.tokens.device)), dim=1)
        n = state.length  # we predict token index n
        toks = state.tokens
        N = toks.shape[0]
        ml = m.stream_meta.max_len
        if ml is not None and n + 1 > ml:
            raise ValueError(f"generation past this model's max_len {ml}")
        h = None
        for s in range(m.num_stages):
            Qs, Qp = m.units[s], (m.units[s - 1] if s else None)
            st = state.stages[s]
            parent = n // Qp if s else 0
            if st.parent != parent:  # new parent unit: this stage starts a new sequence
                st.cache.reset()
                st.parent = parent
            base = parent * Qp if s else 0
            p = (n - base) // Qs  # position in this stage sequence that covers byte n
            first = st.cache.length
            if first == p + 1:  # nothing new for this stage; its ctx stays valid
                continue
            if first > p + 1:  # pragma: no cover
                raise RuntimeError("generation state out of sync")
            # positions first..p: inputs are start (pos 0) or the embedding of unit q-1
            lo, hi = max(first - 1, 0), p  # units lo..hi-1 are needed
            parts = []
            if first == 0:
                parts.append(m.start[s].to(m.head.weight.dtype).expand(N, 1, -1))
            if hi > lo:
                a = base + lo * Qs - state.offset
                units = toks[:, a: a + (hi - lo) * Qs].reshape(N, hi - lo, Qs)
                parts.append(self.unit_embedding(s, units).to(parts[0].dtype if parts else
                                                                  m.head.weight.dtype))
            inp = torch.cat(parts, dim=1)  # (N, p - first + 1, D_s)
            if s:
                inp = inp + state.stages[s - 1].ctx[:, first:p + 1]
            if m.aware[s]:
                h = m.blocks[s](inp, st.cache, modality=self._routes(state, base // Qs, first, p, Qs))[:, -1]
            else:
                h = m.blocks[s](inp, st.cache)[:, -1]  # (N, D_s)
            if s + 1 < m.num_stages:
                st.ctx = m.stage_context(s, h).view(N, m.lengths[s + 1], m.widths[s + 1])
        if h is None:  # pragma: no cover
            raise RuntimeError("nothing to compute")
        # stage 0 next needs the patch now in progress (and, right at a boundary, the one before)
        state.trim(max(0, (n // m.units[0] - 1) * m.units[0]))
        return m.head(h).float()

    @staticmethod
    def _routes(state: GenerationState, k0: int, first: int, p: int, Qs: int) -> torch.Tensor:
        """Routes of positions first..p of a stage sequence whose position 0 covers stream unit k0 of Q_s
        bytes: the modality of units k0 + first - 1 .. k0 + p - 1 (``special`` before the stream's start),
        as :func:`omnibyte.model.routing.stage_routes` in the full forward."""
        j0, j1 = k0 + first - 1, k0 + p
        a = max(j0, 0) * Qs - state.offset
        if a < 0:  # pragma: no cover - trim keeps the bytes of the unit before the current patch
            raise RuntimeError("generation state out of sync: routing needs dropped tokens")
        mod = state.modality[:, a:a + (j1 - max(j0, 0)) * Qs]
        r = unit_modality(mod.reshape(mod.shape[0], -1, Qs))
        return routes_from_units(r, 0) if j0 < 0 else r

    @staticmethod
    def next_modality(state: GenerationState, tokens: torch.Tensor) -> torch.Tensor | None:
        """(N, 1) Modality codes of new tokens (N, 1) by the generation rule (omnibyte.model.routing);
        None for a dense model."""
        if state.segment is None:
            return None
        # a byte takes the open segment, a special is special (feed then moves the segment on)
        return torch.where(tokens < vocab.NUM_BYTES, state.segment[:, None], SPECIAL)
    @torch.no_grad()
    def generate(self, prompt, max_new_bytes: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, stop_tokens=(), generator: torch.Generator | None = None,
                 use_graphs: bool = False, compile_step: bool = False, draft=None, draft_len: int = 4,
                 modality=None, base_modality: int | None = None, graph_verify: bool | str = False) -> torch.Tensor:
        """Sample up to ``max_new_bytes`` tokens after ``prompt`` ((B, P) LongTensor, list[int] or bytes).
        Returns (B, <= max_new_bytes) new tokens; generation stops early once every row has produced a stop
        token (rows that stopped are padded with PAD). temperature 0 = greedy. ``use_graphs=True`` (CUDA, Mamba-2
        global stage) replays the per-byte step as CUDA graphs (omnibyte.model.inference.graphs; Transformer stages
        through the Triton kernels of omnibyte.model.inference.kernels); ``compile_step=True`` also fuses the
        Mamba stages' step with torch.compile first (~30 s once). The stepper is kept on the model between calls
        (:meth:`stepper`): a call with the same batch rows, dtype and flags as a recent one captures and compiles
        nothing. On an H100, 360M config: 1,600 bytes/s with graphs, 2,500-2,700 with graphs + compile; logits
        tested against the full forward on CPU and GPU.
        ``draft`` (a smaller byte model, a :class:`~omnibyte.model.inference.drafters.Drafter` or ``"lookup"``,
        prompt lookup: :class:`~omnibyte.model.inference.drafters.LookupDrafter`): speculative
        decoding, ``draft_len`` bytes drafted per verification pass; greedy output equals plain greedy, samples
        follow the same distribution (:mod:`omnibyte.model.inference.speculative`). ``modality``: the prompt's
        Modality codes (same shape), required by a modality-aware model; generated tokens follow the rule of
        :mod:`omnibyte.model.routing` (after ``SOM_ANSWER``: answer bytes); ``base_modality``: the stream's base
        modality there (the serializer's for single-modality streams, e.g. text after a utf8 ``BOS``; default
        special). ``graph_verify=True`` (with ``draft``; opt-in; benchmarks/RESULTS.md has its H100 figures):
        verification passes on the kept GraphStepper's static buffers, one CUDA graph per (phase, pass length)
        on CUDA, eagerly elsewhere (:mod:`omnibyte.model.inference.graph_verify`; ``use_graphs`` /
        ``compile_step`` allowed with it); models it does not cover use the eager passes. ``graph_verify="aligned"``:
        the same with patch-aligned passes (drafts end with the current patch, so a pass never runs the local stage
        twice: :class:`~omnibyte.model.inference.static_passes.StaticPasses`)."""
        # refused before any work, not after the last byte
        check_room(self.model, int(prompt.shape[-1]) if torch.is_tensor(prompt) else len(prompt), max_new_bytes)
        if draft is not None and self.model.modality_aware:
            raise NotImplementedError("generate: speculative decoding (draft=) does not route modality-aware "
                                      "models (modality_experts); generate without draft=")
        if graph_verify not in (False, True, "aligned"):
            raise ValueError(f"generate: graph_verify must be False, True or 'aligned', got {graph_verify!r}")
        if graph_verify and draft is None:
            raise ValueError("generate: graph_verify=True is for speculative decoding (draft=)")
        if draft is not None:
            if (use_graphs or compile_step) and not graph_verify:
                raise ValueError("generate: draft= (speculative decoding) runs eager verification passes; "
                                 "it cannot be combined with use_graphs / compile_step (graph_verify=True: "
                                 "static verification passes)")
            loop = None
            if graph_verify:
                from .static_passes import generate_static

                loop = functools.partial(generate_static, compile_step=compile_step,
                                         aligned=graph_verify == "aligned")
            return speculative_generate(self, prompt, max_new_bytes, temperature, top_k, top_p, stop_tokens,
                                        generator, draft=draft, draft_len=draft_len, static_loop=loop)
        m = self.model
        device = m.head.weight.device
        prompt = as_batch(prompt, device)
        was_training = m.training
        m.eval()
        try:
            state = self.new_state(prompt.shape[0], device)
            if base_modality is not None:
                state.base = int(base_modality)
            logits = self.feed(state, prompt, modality)
            step = lambda tok: self.feed(state, tok, self.next_modality(state, tok))  # noqa: E731
            if use_graphs and (device.type == "cuda" or self.static_step_off_cuda):
                try:  # kept between calls: graphs are captured (and steps compiled) once per key, not per call
                    step = self.stepper(state, compile_step).feed
                except NotImplementedError as e:
                    log.info("generate: no CUDA-graph step (%s); eager steps", e)
            out = []
            done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=device)
            stop_at = torch.zeros(prompt.shape[0], dtype=torch.long, device=device)  # step of each row's stop
            stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
            # asking the GPU whether every row has stopped waits for it and leaves it idle until the next
            # launch: ask every 8 bytes there (the extra steps are trimmed below)
            check = self.stop_check_every or (8 if device.type == "cuda" else 1)
            for i in range(max_new_bytes):
                nxt = sample(logits, temperature, top_k, top_p, generator)
                nxt = torch.where(done, torch.full_like(nxt, vocab.PAD), nxt)
                out.append(nxt)
                if stops.numel():
                    hit = torch.isin(nxt, stops) & ~done
                    stop_at = torch.where(hit, i, stop_at)
                    done |= hit
                    if (i + 1) % check == 0 and bool(done.all()):
                        break
                if i + 1 < max_new_bytes:
                    logits = step(nxt[:, None])
            if not out:
                return torch.zeros(prompt.shape[0], 0, dtype=torch.long, device=device)
            new = torch.stack(out, dim=1)
            if stops.numel() and bool(done.all()):  # end at the last row's stop
                new = new[:, :int(stop_at.max()) + 1]
            return new
        finally:
            m.train(was_training)

    @torch.no_grad()
    def score(self, prefix, candidates, modality=None) -> torch.Tensor:
        """Log-likelihood (nats) of each candidate continuation (a list of token lists / bytes) given
        ``prefix`` (1-D tokens); the prefix is processed once and its cache fanned out to all candidates.
        ``modality``: the prefix's Modality codes (modality-aware models; candidates follow the generation
        rule of :mod:`omnibyte.model.routing`)."""
        m = self.model
        device = m.head.weight.device
        prefix = as_batch(prefix, device)
        if prefix.shape[0] != 1:
            raise ValueError("score: prefix must be a single sequence")
        cands = [list(c) for c in candidates]
        K = len(cands)
        if K == 0:
            return torch.zeros(0, device=device)
        T = max(len(c) for c in cands)
        was_training = m.training
        m.eval()
        try:
            state = self.new_state(1, device)
            logits = self.feed(state, prefix, modality)  # (1, V)
            state.select(torch.zeros(K, dtype=torch.long, device=device))
            logits = logits.expand(K, -1)
            cand = torch.zeros(K, T, dtype=torch.long, device=device)
            mask = torch.zeros(K, T, dtype=torch.bool, device=device)
            for i, c in enumerate(cands):
                if c:
                    cand[i, :len(c)] = torch.tensor(c, dtype=torch.long)
                    mask[i, :len(c)] = True
            total = torch.zeros(K, dtype=torch.float32, device=device)
            for t in range(T):
                lp = torch.log_softmax(logits.float(), dim=-1).gather(1, cand[:, t:t + 1]).squeeze(1)
                total += torch.where(mask[:, t], lp, torch.zeros_like(lp))
                if t + 1 < T:
                    tok = cand[:, t:t + 1]
                    logits = self.feed(state, tok, self.next_modality(state, tok))
            return total
        finally:
            m.train(was_training)


