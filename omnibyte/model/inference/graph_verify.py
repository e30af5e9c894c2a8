"""Speculative verification on a :class:`~omnibyte.model.inference.graphs.GraphStepper`'s static buffers,
replayable as one CUDA graph per (start phase, T) (``generate(..., draft=..., graph_verify=True)``).

The eager :func:`~omnibyte.model.inference.speculative.verify` clones states and grows KV caches by
concatenation, a few hundred small launches and several host syncs per pass. Here a pass of T tokens (fixed T
= 1 + draft length; shorter drafts are padded and their logits ignored) runs on the stepper's buffers: the
local Transformer stage runs each within-patch segment of the T positions in one multi-position call on the
static KV buffers (causal within the segment, attending to the patch's earlier slots; RoPE rows by position),
and the global Mamba-2 stage steps once per patch boundary crossed (the stepper's own SSM step). Before each
boundary after the first token, everything a rollback needs -- the global conv / SSM states, the local stage's
context and the local KV of the patch being left -- is copied into preallocated snapshot buffers inside the
pass. The kernel sequence depends only on (start phase, T): captured once per pair like ``GraphStepper.feed``'s
per-phase step (warm-up on a side stream, buffers saved and restored around capture), on CUDA only; elsewhere
the same code runs eagerly. :meth:`StaticVerifier.rollback` then leaves the stepper as if only the first
``keep`` tokens had been fed (snapshot restored where a boundary was not kept; token window and position set).
The decoding loop is the eager one's (:func:`~omnibyte.model.inference.speculative.rounds`), with
:class:`StaticPasses` as its backend (:func:`generate_static`).

Where the stepper's steps are compiled (``GraphStepper(..., compile=...)``, ``generate(..., compile_step=True)``;
``stepper.compiled``), each within-patch segment's local work -- input embeddings, the Transformer stage on the
static KV, head and argmax -- is one ``torch.compile``d function (the stepper's mode, ``fullgraph``, coordinate-
descent tuning, ``GraphStepper.fuse_linears``), compiled at its first pass, i.e. before capture, so that the graph
replays a few fused kernels per segment rather than the eager ops' several hundred per pass; the global step is the
stepper's own compiled ``ssm_step``. Dynamo specialises on the segment's ints (first step, length, local
position), so each segment gets a function with a code object of its own (up to ~2 Q_0 per T: more than dynamo's
recompile limit if they shared one), compiled exactly once. Uncompiled steppers run the same ops eagerly.

Supported: a Mamba-2 global stage and ONE inner Transformer stage of one-byte units (the shipped pg19_lm and
mblm360m shapes); otherwise :class:`StaticVerifier` raises ``NotImplementedError`` and
:func:`speculative_generate <omnibyte.model.inference.speculative.speculative_generate>` falls back to the eager
path. The compiled pass is not yet measured on a GPU.
"""

from __future__ import annotations

import logging
import types

import torch

from ... import vocab
from ..blocks.transformer import TransformerBlock
from ..layers import apply_rope, rope_cos_sin
from .graphs import _lin, _mlp, compile_tuned
from .speculative import rounds, verify

log = logging.getLogger("omnibyte.model")


def check_supported(model) -> None:
    """NotImplementedError unless ``model`` has the shape the static verification handles (the GraphStepper's
    own checks -- a Mamba-2 global stage, no modality-aware stages -- come on top)."""
    blocks = model.blocks
    if len(blocks) != 2 or not isinstance(blocks[1], TransformerBlock) or model.units[1] != 1:
        raise NotImplementedError("static verification needs exactly two stages, the inner one a Transformer over "
                                  "single bytes")
    if blocks[1].max_len is not None:
        raise NotImplementedError("static verification: learned positions in the inner stage")


def static_support(model, passes: bool = True) -> str | None:
    """Why ``model`` has no CUDA-graph step (``passes``: or no static verification passes), as the message of the
    NotImplementedError ``generate(..., use_graphs=True)`` / ``graph_verify=True`` falls back on (to eager steps /
    eager passes); None where it has them. The checks of :func:`check_supported` and the GraphStepper's constructor,
    on a one-row state: no static buffers are allocated, nothing is captured or kept."""
    from .graphs import GraphStepper

    dec = getattr(model, "decoder", None)
    if dec is None:
        return f"{type(model).__name__} has no cached byte decoder"
    try:
        if passes:
            check_supported(model)
        GraphStepper(model, dec.new_state(1))
    except NotImplementedError as e:
        return str(e)
    return None


def transformer_multi_step(blk: TransformerBlock, x: torch.Tensor, caches: list[dict], p0: int, rope,
                           allowed: torch.Tensor, fuse: bool = False) -> torch.Tensor:
    """Positions p0..p0+L-1 (x: (N, L, D)) of a patch through every layer of a Transformer stage on static KV
    buffers (N, H, P, hd): their k, v written into slots p0.., each attending to slots <= its own position
    (``allowed`` (L, P) bool). ``rope``: (cos, sin) (L, hd/2) or None. ``fuse``: under torch.compile the
    linears as products and sums, as the GraphStepper's compiled steps (graphs._lin; eagerly the same ops either
    way)."""
    N, L, _ = x.shape
    for lay, c in zip(blk.layers, caches):
        at = lay.attn
        qkv = _lin(lay.norm1(x), at.qkv, fuse)
        q, k, v = qkv.view(N, L, 3, at.heads, at.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        kb, vb = c["k"], c["v"]
        kb[:, :, p0:p0 + L].copy_(k)
        vb[:, :, p0:p0 + L].copy_(v)
        scores = (q.float() @ kb.float().transpose(-1, -2)) * at.head_dim ** -0.5  # (N, H, L, P)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = (probs @ vb.float()).to(x.dtype)  # (N, H, L, hd)
        x = x + _lin(y.transpose(1, 2).reshape(N, L, at.heads * at.head_dim), at.out, fuse)
        x = x + _mlp(lay.mlp, lay.norm2(x), fuse)
    return blk.norm(x)


def _own_code(fn):
    """A copy of function ``fn`` with a code object of its own. Dynamo keeps compiled graphs, and counts them
    against its recompile limit, per code object: each copy compiled once holds one graph and counts against no
    other copy's limit."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compiled_local(ver: StaticVerifier, b: dict, i0: int, i1: int, p0: int) -> None:
    """What :meth:`StaticVerifier._segment_fn` compiles: one segment's local work, head and argmax."""
    ver._local(b, i0, i1, p0, True)


def segments(phase0: int, T: int, Q0: int) -> list[tuple[int, int, int]]:
    """The T steps of a pass starting at phase ``phase0`` (of the first index predicted) as within-patch
    segments (first step, last step, local position of the first); a segment at local position 0 starts with a
    global step."""
    out, i = [], 0
    while i < T:
        p0 = (phase0 + i) % Q0
        L = min(T - i, Q0 - p0)
        out.append((i, i + L - 1, p0))
        i += L
    return out


class StaticVerifier:
    """Verification passes of T tokens on ``stepper``'s static buffers (see the module docstring). ``run``
    returns the logits (N, T, V) in a static buffer (overwritten by the next pass); every ``run`` must be
    followed by one ``rollback``.

    Where the stepper's steps are compiled (``stepper.compiled``: ``GraphStepper(..., compile=...)``), each
    segment's local-stage work, head and argmax is one ``torch.compile``d function (same mode, ``fullgraph``,
    coordinate-descent tuning), compiled at its first pass (before capture on CUDA); the global step is the stepper's
    own (compiled) ``ssm_step``."""

    compile_backend = "inductor"  # (tests: "eager" / "aot_eager" check the dynamo path alone)
    compile_pass = True  # False: the passes run their eager torch ops even where the stepper is compiled (to compare)

    def __init__(self, stepper):
        check_supported(stepper.model)
        self.st, self.model = stepper, stepper.model
        self.compile = getattr(stepper, "compiled", False) if self.compile_pass else False
        # per segment (T, first step, last step, local position): its compiled function. The ints are
        # specialised (different slices and shapes): one function per segment, each with a code object of its own,
        # so none of the (up to ~2 Q_0 per T) segments counts against another's recompile limit or falls back
        self.local_fns: dict[tuple[int, int, int, int], object] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.bufs: dict[int, dict] = {}
        self.captures = 0
        self.pending: tuple[int, int, int] | None = None  # (stream length before, T, phase0) of the last pass
        self.passes = 0

    # -- buffers --------------------------------------------------------------------------------
    def _live(self) -> list[torch.Tensor]:
        """What a rollback restores: global conv / SSM states, the local context, the local KV."""
        st = self.st
        return [*(t for d in st.caches[0] for t in d.values()), st.ctx[1], *(t for d in st.caches[1] for t in
                                                                             d.values())]

    def _buffers(self, T: int) -> dict:
        b = self.bufs.get(T)
        if b is None:
            st, m, N, Q0 = self.st, self.model, self.st.N, self.st.Q0
            dev = st.dev
            at = m.blocks[1].layers[0].attn
            pos = torch.arange(Q0, device=dev)
            cos, sin = rope_cos_sin(pos, at.head_dim, at.rope_base)
            nsnap = (T - 1) // Q0 + 1  # boundaries at steps >= 1 (a boundary at step 0 is always kept)
            b = dict(tok=torch.full((N, T), vocab.PAD, dtype=torch.long, device=dev),
                     hist=torch.zeros(N, Q0 + T, dtype=torch.long, device=dev),  # window before, then the T tokens
                     out=torch.zeros(N, T, m.config.vocab_size, dtype=torch.float32, device=dev),
                     arg=torch.zeros(N, T, dtype=torch.long, device=dev),
                     snaps=[[t.clone() for t in self._live()] for _ in range(nsnap)],
                     rope=(cos, sin) if at.rope else None,
                     allowed=pos[None, :] <= pos[:, None])  # (position, slot)
            self.bufs[T] = b
        return b

    # -- the pass ---------------------------------------------------------------------------------
    def _local(self, b: dict, i0: int, i1: int, p0: int, arg: bool) -> None:
        """Steps i0..i1 (local positions p0..) through the local stage on the static KV, their logits into
        ``b["out"]`` (``arg``: and their argmax into ``b["arg"]``)."""
        st, m, N, Q0 = self.st, self.model, self.st.N, self.st.Q0
        dec, dtype, hist = st.decoder, m.head.weight.dtype, b["hist"]
        L = i1 - i0 + 1
        # inputs: the start vector at position 0, else the embedding of the token fed at that step
        parts = [m.start[1].to(dtype).expand(N, 1, -1)] if p0 == 0 else []
        a = i0 + (p0 == 0)
        if a <= i1:
            parts.append(dec.unit_embedding(1, hist[:, Q0 + a:Q0 + i1 + 1].reshape(N, i1 + 1 - a, 1)).to(dtype))
        inp = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]) + st.ctx[1][:, p0:p0 + L]
        rope = (b["rope"][0][p0:p0 + L], b["rope"][1][p0:p0 + L]) if b["rope"] is not None else None
        h = transformer_multi_step(m.blocks[1], inp, st.caches[1], p0, rope, b["allowed"][p0:p0 + L],
                                   st.fuse_linears)
        logits = m.head(h).float()
        b["out"][:, i0:i1 + 1].copy_(logits)
        if arg:
            b["arg"][:, i0:i1 + 1].copy_(logits.argmax(-1))

    def _segment_fn(self, T: int, i0: int, i1: int, p0: int):
        """The compiled ``_local`` of one segment (compiled at its first call)."""
        key = (T, i0, i1, p0)
        fn = self.local_fns.get(key)
        if fn is None:  # compiled as the stepper's own steps are
            fn = self.local_fns[key] = compile_tuned(_own_code(_compiled_local), self.compile, self.compile_backend)
        return fn

    def _pass(self, phase0: int, T: int) -> None:
        st, m, N, Q0 = self.st, self.model, self.st.N, self.st.Q0
        b = self.bufs[T]
        dec, dtype = st.decoder, m.head.weight.dtype
        hist = b["hist"]
        hist[:, :Q0].copy_(st.window)
        hist[:, Q0:].copy_(b["tok"])
        nsnap = 0
        for i0, i1, p0 in segments(phase0, T, Q0):
            if p0 == 0:  # a boundary: the global stage steps over the patch completed by token i0
                if i0 > 0:
                    torch._foreach_copy_(b["snaps"][nsnap], self._live())
                    nsnap += 1
                inp = dec.unit_embedding(0, hist[:, i0 + 1:i0 + 1 + Q0].reshape(N, 1, Q0)).to(dtype)
                h = st.ssm_step(m.blocks[0], inp, st.caches[0], st.fuse_linears)[:, -1]
                st.ctx[1].copy_(m.stage_context(0, h).view(N, m.lengths[1], m.widths[1]))
            if self.compile:  # local stage, head and argmax as a few fused kernels
                self._segment_fn(T, i0, i1, p0)(self, b, i0, i1, p0)
            else:
                self._local(b, i0, i1, p0, False)
        if not self.compile:
            b["arg"].copy_(b["out"].argmax(-1))

    @torch.no_grad()
    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (N, T) from the stepper's current position; (N, T, V) logits (a static buffer)."""
        st = self.st
        if not st.ready:
            raise RuntimeError("StaticVerifier.run: the stepper holds no state yet (fewer than Q_0 bytes fed)")
        if self.pending is not None:
            raise RuntimeError("StaticVerifier.run: the previous pass was not rolled back")
        N, T = tokens.shape
        b = self._buffers(T)
        b["tok"].copy_(tokens, non_blocking=True)  # (from pinned host memory: the caller syncs every round)
        phase0 = (st.n + 1) % st.Q0
        if not st.use_graphs:
            self._pass(phase0, T)
        else:
            g = self.graphs.get((phase0, T))
            if g is None:
                g = self._capture(phase0, T)
            g.replay()
        self.pending = (st.n, T, phase0)
        self.passes += 1
        return b["out"]

    def _capture(self, phase0: int, T: int):
        """The pass captured with the stepper's own capture (side-stream warm-up, its buffers as before)."""
        g = self.graphs[(phase0, T)] = self.st.capture(lambda: self._pass(phase0, T))
        self.captures += 1
        return g

    @property
    def argmax(self) -> torch.Tensor:
        """(N, T) argmax of the last pass's logits (computed inside the pass)."""
        return self.bufs[self.pending[1]]["arg"]

    @torch.no_grad()
    def rollback(self, keep: int) -> None:
        """Leave the stepper as if only the first ``keep`` (1..T) tokens of the last pass had been fed."""
        if self.pending is None:
            raise RuntimeError("StaticVerifier.rollback: no pass to roll back")
        a, T, phase0 = self.pending
        if not 1 <= keep <= T:
            raise ValueError(f"rollback: keep must be in 1..{T}, got {keep}")
        st, b = self.st, self.bufs[T]
        bounds = [i0 for i0, _, p0 in segments(phase0, T, st.Q0) if p0 == 0 and i0 > 0]
        for j, i in enumerate(bounds):
            if i >= keep:  # the first boundary not kept: its state from before it
                torch._foreach_copy_(self._live(), b["snaps"][j])
                break
        st.window.copy_(b["hist"][:, keep:keep + st.Q0])
        st.n = a + keep
        self.pending = None


def verifier(stepper) -> StaticVerifier:
    """The StaticVerifier kept on ``stepper`` (its captured graphs live as long as the kept stepper)."""
    v = stepper.__dict__.get("_static_verifier")
    if v is None:
        v = StaticVerifier(stepper)
        stepper.__dict__["_static_verifier"] = v
    return v


class StaticPasses:
    """The round loop's backend (:func:`~omnibyte.model.inference.speculative.rounds`) on the kept GraphStepper:
    plain steps as the stepper's (graphed) step, verification passes of fixed T = 1 + ``draft_len`` through the
    :class:`StaticVerifier` (shorter drafts padded, their logits ignored), and until the stepper holds Q_0 bytes the
    eager pass on its state. The prefill runs eagerly on ``state`` (the stepper's), as plain decoding's.

    ``aligned`` (``generate(..., graph_verify="aligned")``): patch-aligned passes. A pass that
    crosses a patch boundary runs the local stage twice (once per within-patch segment) and the global step
    between; where the weights' reads are the cost (a large model) each local segment costs about one plain byte's
    step, so a pass of T = 9 over 8-byte patches costs two bytes' steps and a global step, whatever is kept. Aligned,
    each round drafts at most up to the end of the current patch (``room``): every pass is one local segment (after
    a global step where it starts a patch), T = 1 + min(draft_len, room) for its start phase (so still one CUDA
    graph per phase), and a phase with no room takes a plain step. The output is the same either way (the drafts
    are only shorter)."""

    def __init__(self, decoder, state, stepper, ver: StaticVerifier, draft_len: int, aligned: bool = False):
        self.decoder, self.state, self.stepper, self.ver = decoder, state, stepper, ver
        self.aligned = aligned
        self.device = decoder.model.head.weight.device
        self.B, self.draft_len = state.tokens.shape[0], draft_len
        self.toks: dict[int, torch.Tensor] = {}  # per pass length T: pinned host tokens (B, T)
        self.eager = None  # the eager Verification of the last pass, where the stepper held fewer than Q_0 bytes

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.decoder.feed(self.state, prompt)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:  # the stepper: eager until it holds Q_0 bytes
        return self.stepper.feed(tokens)

    def _convert(self) -> None:  # the eager state into the static buffers once it holds Q_0 bytes
        st = self.stepper
        if not st.ready and st.state.length >= st.Q0:
            st._convert()

    def room(self) -> int | None:
        """Aligned: the drafts that fit before the current patch ends (the next pass's steps all in one patch);
        else None (any number)."""
        self._convert()
        st = self.stepper
        if not (self.aligned and st.ready):
            return None
        return st.Q0 - 1 - (st.n + 1) % st.Q0

    def _length(self, n: int) -> int:
        """The static pass length for ``n`` tokens (the last kept byte and n - 1 drafts)."""
        room = self.room()
        T = 1 + (self.draft_len if room is None else min(self.draft_len, room))
        if n > T:
            raise ValueError(f"StaticPasses.verify: {n} tokens for a pass of {T} (draft_len {self.draft_len}, "
                             f"room {room})")
        return T

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        self._convert()
        n = tokens.shape[1]
        T = self._length(n)
        toks = self.toks.get(T)
        if toks is None:
            toks = self.toks[T] = torch.full((self.B, T), vocab.PAD, dtype=torch.long,
                                             pin_memory=self.device.type == "cuda")
        toks.fill_(vocab.PAD)
        toks[:, :n] = tokens
        if self.stepper.ready:
            self.eager = None
            return self.ver.run(toks)[:, :n]
        self.eager = verify(self.decoder, self.stepper.state, toks[:, :n].to(self.device))
        return self.eager.logits

    def argmax(self) -> torch.Tensor:  # computed inside the static pass
        return self.ver.argmax if self.eager is None else self.eager.logits.argmax(-1)

    def rollback(self, keep: int) -> None:
        if self.eager is None:
            self.ver.rollback(keep)
        else:
            self.eager.rollback(keep)
            self.eager = None
        self._convert()


def generate_static(decoder, prompt, max_new: int, temperature, top_k, top_p, stop_tokens, generator, drafter,
                    draft_len: int, compile_step=False, aligned: bool = False) -> torch.Tensor:
    """The speculative loop (:func:`~omnibyte.model.inference.speculative.rounds`, the eager loop's) on the kept
    GraphStepper through :class:`StaticPasses`: verification passes of fixed T = 1 + ``draft_len`` through
    :class:`StaticVerifier` (``aligned``: patch-aligned, see :class:`StaticPasses`), rounds without drafts as the
    stepper's graphed step. None, before any work, where the
    model has no static verification (the caller then runs the eager passes)."""
    m = decoder.model
    B, device = prompt.shape[0], prompt.device
    state = decoder.new_state(B, device)
    try:
        check_supported(m)
        stepper = decoder.stepper(state, compile_step)  # NotImplementedError: no static step
        ver = verifier(stepper)
    except NotImplementedError as e:
        log.info("speculative decoding: no static verification (%s); eager passes", e)
        return None
    ver.pending = None  # (a pass interrupted by an exception in an earlier call)
    passes = StaticPasses(decoder, state, stepper, ver, draft_len, aligned)
    return rounds(passes, prompt, max_new, temperature, top_k, top_p, stop_tokens, generator, drafter, draft_len)
