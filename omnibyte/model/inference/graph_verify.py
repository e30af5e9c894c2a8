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
:class:`~omnibyte.model.inference.static_passes.StaticPasses` as its backend
(:func:`~omnibyte.model.inference.static_passes.generate_static`).

Every within-patch segment runs the local stage over a patch's worth of rows (Q_0: the segment's positions, then
padding rows, computed and ignored), its positions, token columns, cache slots and attention mask given as index
tensors, so all segments of all pass lengths share one set of shapes. Where the stepper's steps are compiled
(``GraphStepper(..., compile=...)``, ``generate(..., compile_step=True)``; ``stepper.compiled``), that work -- input
embeddings, the Transformer stage on the static KV, head and argmax -- is one ``torch.compile``d function (the
stepper's mode, ``fullgraph``, coordinate-descent tuning, ``GraphStepper.fuse_linears``) compiled ONCE, at the first
pass (before capture), so the graph replays a few fused kernels per segment rather than the eager ops' several
hundred per pass; the global step is the stepper's own compiled ``ssm_step``. (Compiling one function per segment,
as before, meant up to 16 compiles for passes of 9 over patches of 8: more than a 170-s benchmark had on an H100.)
Uncompiled steppers run the same ops eagerly.

Supported: a Mamba-2 global stage and ONE inner Transformer stage of one-byte units (the shipped pg19_lm and
mblm360m shapes); otherwise :class:`StaticVerifier` raises ``NotImplementedError`` and
:func:`speculative_generate <omnibyte.model.inference.speculative.speculative_generate>` falls back to the eager
path. On an H100 (360M shape) segments through the decode kernels made rounds cost ~4.5 plain steps per segment
(1.05x plain decoding); the compiled torch segment, now the default for segments of more than ``kernels.MAX_ROWS``
rows, is not yet timed (``benchmarks/verify_pass.py``).
"""

from __future__ import annotations

import types

import torch

from ... import vocab
from ..blocks.transformer import TransformerBlock
from ..layers import apply_rope, rope_cos_sin
from .graphs import _lin, _mlp, compile_tuned


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


def transformer_segment(blk: TransformerBlock, x: torch.Tensor, caches: list[dict], rope, write: torch.Tensor,
                        src: torch.Tensor, allowed: torch.Tensor, fuse: bool = False) -> torch.Tensor:
    """The rows of a within-patch segment (x: (N, R, D), R = the patch length: the segment's positions, then rows
    that pad it, computed and ignored) through every layer of a Transformer stage on static KV buffers (N, H, P,
    hd): cache slot s takes row ``src[s]``'s k and v where ``write[s]`` ((P,) long / bool), row r attends to the
    slots ``allowed[r]`` ((R, P) bool: up to its own position). ``rope``: (cos, sin) (R, hd/2) per row, or None.
    Every index is a tensor, so one compiled graph serves every segment. ``fuse``: under torch.compile, linears
    over one row as products and sums (graphs._lin; a segment's R rows are matrix products)."""
    N, R, _ = x.shape
    wm = write.view(1, 1, -1, 1)
    for lay, c in zip(blk.layers, caches):
        at = lay.attn
        qkv = _lin(lay.norm1(x), at.qkv, fuse)
        q, k, v = qkv.view(N, R, 3, at.heads, at.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, R, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        kb, vb = c["k"], c["v"]
        kb.copy_(torch.where(wm, k.index_select(2, src), kb))
        vb.copy_(torch.where(wm, v.index_select(2, src), vb))
        scores = (q.float() @ kb.float().transpose(-1, -2)) * at.head_dim ** -0.5  # (N, H, R, P)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = (probs @ vb.float()).to(x.dtype)  # (N, H, R, hd)
        x = x + _lin(y.transpose(1, 2).reshape(N, R, at.heads * at.head_dim), at.out, fuse)
        x = x + _mlp(lay.mlp, lay.norm2(x), fuse)
    return blk.norm(x)


def _inputs(ver: StaticVerifier, toks: torch.Tensor, seg: dict) -> torch.Tensor:
    """A segment's rows' inputs (N, R, D): the start vector at local position 0, else the embedding of the token fed
    at that step (``toks`` (N, R)), plus the global stage's context at the row's position."""
    st, m = ver.st, ver.model
    N, R = toks.shape
    dtype = m.head.weight.dtype
    emb = st.decoder.unit_embedding(1, toks.view(N, R, 1)).to(dtype)
    start = m.start[1].to(dtype).view(1, 1, -1)
    return torch.where(seg["start"].view(1, R, 1), start, emb) + st.ctx[1].index_select(1, seg["pos"])


def _head(ver: StaticVerifier, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = ver.model.head(h).float()
    return logits, logits.argmax(-1)


def _segment(ver: StaticVerifier, toks: torch.Tensor, seg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment's local work in torch ops: inputs, the Transformer stage on the static KV, head and argmax.
    ``toks`` (N, R): each row's token; ``seg``: the segment's index tensors (:meth:`StaticVerifier._seg`). What the
    compiled pass compiles, once (every segment has the same shapes)."""
    st = ver.st
    rope = (ver.cos.index_select(0, seg["pos"]), ver.sin.index_select(0, seg["pos"])) if ver.cos is not None else None
    h = transformer_segment(ver.model.blocks[1], _inputs(ver, toks, seg), st.caches[1], rope, seg["write"],
                            seg["src"], seg["allowed"], st.fuse_linears)
    return _head(ver, h)


def _segment_kernels(ver: StaticVerifier, toks: torch.Tensor, seg: dict, p0: int, L: int):
    """The same with the stepper's decode kernels (``StaticVerifier.kernels``): the Transformer stage through
    :func:`~omnibyte.model.inference.segment_kernels.transformer_segment` (positions p0.. as ints: each captured
    graph serves one segment anyway), nothing to compile."""
    from .segment_kernels import transformer_segment as kernel_segment

    rope = (ver.cos, ver.sin) if ver.cos is not None else None
    h = kernel_segment(ver.model.blocks[1], _inputs(ver, toks, seg), ver.st.caches[1], rope, p0, L)
    return _head(ver, h)


def _own_code(fn):
    """A copy of function ``fn`` with a code object of its own. Dynamo keeps compiled graphs, and counts them
    against its recompile limit, per code object: each copy compiled once holds one graph and counts against no
    other copy's limit."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


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

    Each within-patch segment runs the local stage over a patch's worth of rows (Q_0: its positions, then padding
    rows, computed and ignored), driven by index tensors (:meth:`_seg`): every segment has the same shapes. Where the
    stepper's steps are compiled (``stepper.compiled``: ``GraphStepper(..., compile=...)``), that work (inputs,
    Transformer stage on the static KV, head and argmax) is one ``torch.compile``d function (same mode,
    ``fullgraph``, coordinate-descent tuning) compiled once, at the first pass (before capture on CUDA), for every
    segment of every pass length; the global step is the stepper's own (compiled) ``ssm_step``."""

    compile_backend = "inductor"  # (tests: "eager" / "aot_eager" check the dynamo path alone)
    compile_pass = True  # False: the passes run their eager torch ops even where the stepper is compiled (to compare)
    # segments through the stepper's decode kernels (segment_kernels) where its steps use them: None (default) only
    # while a segment's rows (batch x Q_0) are within kernels.MAX_ROWS, the row count up to which the kernels beat
    # the torch step's matrix products; True / False: always / never. (The kernels loop over rows: on an H100 a
    # segment of 8 rows of the 360M shape took ~2.4 ms through them, ~4.5 plain steps, so verification cost more
    # than it saved.)
    kernel_segments: bool | None = None

    def __init__(self, stepper):
        check_supported(stepper.model)
        self.st, self.model = stepper, stepper.model
        self.compile = getattr(stepper, "compiled", False) if self.compile_pass else False
        from . import kernels as decode_kernels

        self.rule = rule = type(self).kernel_segments
        self.kernels = bool(stepper.kernels and (decode_kernels.by_default(stepper.N * stepper.Q0) if rule is None
                                                 else rule))
        # the segment's local work: compiled once (a code object of its own, so that verifiers of other steppers do
        # not count against its recompile limit), or eager
        self.segment = (compile_tuned(_own_code(_segment), self.compile, self.compile_backend) if self.compile
                        else _segment)
        # per segment run so far, (T, first step, last step, position): its index tensors (_seg)
        self.segs: dict[tuple[int, int, int, int], dict] = {}
        at = self.model.blocks[1].layers[0].attn
        self.cos = self.sin = None
        if at.rope:
            cos, sin = rope_cos_sin(torch.arange(stepper.Q0, device=stepper.dev), at.head_dim, at.rope_base)
            self.cos, self.sin = cos.contiguous(), sin.contiguous()
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
            nsnap = (T - 1) // Q0 + 1  # boundaries at steps >= 1 (a boundary at step 0 is always kept)
            # logits and argmax: T steps, then Q_0 columns the padding rows of a segment write into
            out = torch.zeros(N, T + Q0, m.config.vocab_size, dtype=torch.float32, device=dev)
            arg = torch.zeros(N, T + Q0, dtype=torch.long, device=dev)
            b = dict(tok=torch.full((N, T), vocab.PAD, dtype=torch.long, device=dev),
                     hist=torch.zeros(N, Q0 + T, dtype=torch.long, device=dev),  # window before, then the T tokens
                     out_all=out, arg_all=arg, out=out[:, :T], arg=arg[:, :T],
                     snaps=[[t.clone() for t in self._live()] for _ in range(nsnap)])
            self.bufs[T] = b
        return b

    def _seg(self, T: int, i0: int, i1: int, p0: int) -> dict:
        """The index tensors of the segment of steps i0..i1 at local positions p0.. of a pass of T (made once, before
        any capture): per row r < R = Q_0 its position (``pos``; padding rows: the last), the column of ``hist``
        holding its token (``tok``), whether it takes the start vector (``start``), its column of the pass's logits
        (``dest``; padding rows: past T); per cache slot whether it is written (``write``) and from which row
        (``src``); per row the slots it attends to (``allowed``)."""
        key = (T, i0, i1, p0)
        seg = self.segs.get(key)
        if seg is None:
            Q0, dev = self.st.Q0, self.st.dev
            r = torch.arange(Q0, device=dev)
            L = i1 - i0 + 1
            valid = r < L
            pos = torch.where(valid, p0 + r, Q0 - 1)
            seg = self.segs[key] = dict(
                pos=pos, tok=torch.where(valid, Q0 + i0 + r, 0), start=valid & (pos == 0),
                dest=torch.where(valid, i0 + r, T + r), write=(r >= p0) & (r < p0 + L),
                src=(r - p0).clamp(0, Q0 - 1), allowed=r[None, :] <= pos[:, None])
        return seg

    # -- the pass ---------------------------------------------------------------------------------
    def _local(self, b: dict, T: int, i0: int, i1: int, p0: int) -> None:
        """Steps i0..i1 (local positions p0..) through the local stage on the static KV: their logits and argmax
        into ``b["out"]`` / ``b["arg"]``."""
        seg = self._seg(T, i0, i1, p0)
        toks = b["hist"].index_select(1, seg["tok"])
        if self.kernels:  # the decode kernels, every row of the segment as a batch row
            logits, arg = _segment_kernels(self, toks, seg, p0, i1 - i0 + 1)
        else:
            logits, arg = self.segment(self, toks, seg)
        b["out_all"].index_copy_(1, seg["dest"], logits)
        b["arg_all"].index_copy_(1, seg["dest"], arg)

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
            self._local(b, T, i0, i1, p0)

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
    if v is None or v.rule is not StaticVerifier.kernel_segments:  # (asked for kernel segments or not since)
        v = StaticVerifier(stepper)
        stepper.__dict__["_static_verifier"] = v
    return v
