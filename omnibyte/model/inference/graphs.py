"""The per-byte decode step on static buffers, replayable as CUDA graphs (``GraphStepper``).

Eager decoding (:meth:`Decoder.feed <omnibyte.model.inference.decoder.Decoder.feed>`) launches a few hundred small kernels per byte, which at batch 1 costs
more than the arithmetic. Here every cache lives in a buffer allocated once (attention KV of the inner
stages sized to their patch length; Mamba conv/SSM states updated in place), and the step for byte n is
fully determined by its phase ``n mod Q_0`` (which stages advance, at which positions, reading which bytes of
the last Q_0). So there is one static step per phase, captured once as a CUDA graph and replayed.

Requirements: the global stage is an SSM (its step does not depend on the position), inner stages are
Transformer or Mamba-2 blocks; otherwise ``GraphStepper`` raises ``NotImplementedError`` and callers use
``Decoder.feed``. Without CUDA (tests) the same static step runs eagerly.

``compile=True``: each stage's step over all its layers is one ``torch.compile``d function of plain torch ops
(the position enters as tensors -- RoPE rows and slot masks -- so one graph serves every position; the SSM state
update is written out in torch, not mamba-ssm's kernel, so it fuses), compiled before capture.

``kernels=True`` (the default on CUDA when Triton imports): Transformer stages step through the hand-fused
Triton kernels of :mod:`omnibyte.model.inference.kernels` (four per layer) instead of either torch step.

A stepper is reusable: :meth:`GraphStepper.reset` points it at a new :class:`GenerationState` (same batch rows),
whose caches are copied into the *same* static buffers once it has ``Q_0`` bytes, so the graphs captured (and the
steps compiled) for earlier states replay unchanged. ``Decoder.generate`` keeps its steppers between calls this way
(:meth:`Decoder.stepper <omnibyte.model.inference.decoder.Decoder.stepper>`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..blocks.mamba2_ref import Mamba2Mixer
from ..blocks.ssm_stack import SSMStack
from ..blocks.transformer import TransformerBlock
from ..cache import GenerationState
from ..layers import apply_rope, rope_cos_sin

log = logging.getLogger("omnibyte.model")

# the fused form below is a reduction per output element, so it reads the weight once per row of ``x``; over this
# many rows (batch x positions: batches, static verification's segments) a linear is a matrix product, which
# reads it once. (H100, 360M config, batch 4: the compiled torch step, fused, gave 840 bytes/s per sequence; the
# decode kernels, which read each weight block once for all rows, 1,316.)
FUSE_MAX_ROWS = 1


def _fuses(x: torch.Tensor, fuse: bool) -> bool:
    """Whether :func:`_lin` writes ``lin(x)`` as a product and a sum: asked for, traced by torch.compile (eagerly
    the product would be materialised) and at most ``FUSE_MAX_ROWS`` rows (static: compiled with
    ``dynamic=False``)."""
    return fuse and torch.compiler.is_compiling() and x[..., 0].numel() <= FUSE_MAX_ROWS


def _lin(x: torch.Tensor, lin: torch.nn.Linear, fuse: bool) -> torch.Tensor:
    """``lin(x)``; where :func:`_fuses`, as a product and a sum (a matrix-vector product that torch.compile
    fuses with the elementwise work around it instead of calling a separate GEMV kernel)."""
    if not _fuses(x, fuse):
        return lin(x)
    y = (x[..., None, :] * lin.weight).sum(-1, dtype=torch.float32).to(x.dtype)
    return y + lin.bias if lin.bias is not None else y


def _mlp(mlp, x: torch.Tensor, fuse: bool) -> torch.Tensor:
    gate, up = _lin(x, mlp.gate_up, fuse).chunk(2, dim=-1)
    return _lin(F.silu(gate) * up, mlp.down, fuse)


def _mamba2_layer_step(m: Mamba2Mixer, u: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor,
                       fuse: bool = False) -> torch.Tensor:
    """One position (u: (N, 1, D)) of a Mamba-2 mixer in plain torch ops (fusable by torch.compile), updating
    the conv window (N, C, K - 1) and the fp32 SSM state (N, H, P, n) in place."""
    N = u.shape[0]
    z, xBC, dt = m._split(_lin(u, m.in_proj, fuse)[:, 0])  # (N, ...)
    full = torch.cat((conv, xBC[:, :, None].to(conv.dtype)), dim=-1)  # (N, C, K)
    conv.copy_(full[..., 1:])
    xBC = (full * m.conv1d.weight[:, 0].to(full.dtype)).sum(-1)
    if m.conv1d.bias is not None:
        xBC = xBC + m.conv1d.bias.to(xBC.dtype)
    xBC = F.silu(xBC)
    x, B, C = torch.split(xBC, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], -1)
    H, P, n, G = m.nheads, m.headdim, m.d_state, m.ngroups
    dtp = F.softplus(dt.float() + m.dt_bias.float())  # (N, H)
    xh = x.float().reshape(N, H, P)
    Bh = B.float().reshape(N, G, n).repeat_interleave(H // G, 1)
    Ch = C.float().reshape(N, G, n).repeat_interleave(H // G, 1)
    decay = torch.exp(dtp * -torch.exp(m.A_log.float()))  # (N, H)
    S = ssm * decay[:, :, None, None] + (dtp[:, :, None] * xh)[..., None] * Bh[:, :, None]
    ssm.copy_(S)
    y = (S * Ch[:, :, None]).sum(-1) + m.D.float()[:, None] * xh  # (N, H, P)
    y = m.norm(y.reshape(N, 1, m.d_inner).to(u.dtype), z[:, None])
    return _lin(y, m.out_proj, fuse)


def ssm_stage_step(blk: SSMStack, x: torch.Tensor, caches: list[dict], fuse: bool = False) -> torch.Tensor:
    """One position through every layer of a Mamba-2 stage block; x (N, 1, D)."""
    for lay, c in zip(blk.layers, caches):
        x = x + _mamba2_layer_step(lay.mixer, lay.norm(x), c["conv"], c["ssm"], fuse)
        if lay.mlp is not None:
            x = x + _mlp(lay.mlp, lay.norm2(x), fuse)
    return blk.norm(x)


def transformer_stage_step(blk: TransformerBlock, x: torch.Tensor, caches: list[dict], rope: tuple | None,
                           write: torch.Tensor, valid: torch.Tensor, fuse: bool = False) -> torch.Tensor:
    """One position through every layer of a Transformer stage block on static KV buffers (N, H, P, hd).
    The position is given as tensors, so one compiled graph serves them all: ``write`` (P,) bool marks the
    slot of this position, ``valid`` (P,) bool the slots it attends to; ``rope`` = (cos, sin) (1, hd/2)."""
    N = x.shape[0]
    for lay, c in zip(blk.layers, caches):
        at = lay.attn
        q, k, v = _lin(lay.norm1(x), at.qkv, fuse).view(N, 3, at.heads, 1, at.head_dim).unbind(1)  # (N, H, 1, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        kb, vb = c["k"], c["v"]
        slot = write[:, None]  # (P, 1), broadcast over (N, H, P, hd)
        kb.copy_(torch.where(slot, k, kb))
        vb.copy_(torch.where(slot, v, vb))
        # P is a patch length (<= a few dozen): products and sums, which compile fuses with RoPE and softmax
        scores = (q.float() * kb.float()).sum(-1) * at.head_dim ** -0.5  # (N, H, P)
        probs = scores.masked_fill(~valid, float("-inf")).softmax(-1)
        y = (probs[..., None] * vb.float()).sum(-2).to(x.dtype)  # (N, H, hd)
        x = x + _lin(y.reshape(N, 1, at.heads * at.head_dim), at.out, fuse)
        x = x + _mlp(lay.mlp, lay.norm2(x), fuse)
    return blk.norm(x)


def _with_inductor_config(fn, **options):
    """``fn`` called under ``torch._inductor.config.patch(**options)`` (compilation happens at the first call)."""
    def call(*args, **kwargs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(**options):
            return fn(*args, **kwargs)

    return call


def compile_tuned(fn, request, backend: str = "inductor"):
    """``fn`` compiled as the decode steps are (``request``: True, or a torch.compile mode such as
    "max-autotune-no-cudagraphs"): one static graph (``dynamic=False``, ``fullgraph``) and, with inductor,
    coordinate-descent tuning of the generated kernels (as gpt-fast does for decoding: on an H100 1,473 vs 1,361
    bytes/s for the 360M config, two jobs). Other backends (tests: "eager", "aot_eager") take no mode."""
    inductor = backend == "inductor"
    mode = request if isinstance(request, str) and inductor else None
    fn = torch.compile(fn, dynamic=False, fullgraph=True, mode=mode, backend=backend)
    return _with_inductor_config(fn, coordinate_descent_tuning=True) if inductor else fn


class GraphStepper:
    """Continue a :class:`GenerationState` one byte at a time on static buffers / CUDA graphs.

    ``feed(tok (N, 1)) -> logits (N, V)`` matches ``Decoder.feed`` on the same state (the ``state`` object is
    not kept up to date afterwards)."""

    # compiled steps: matrix-vector products as fused products and sums (see _lin); on an H100 (360M config)
    # 1,361 vs 1,207 bytes/s with aten's GEMV in the same job
    fuse_linears = True
    # with the decode kernels, Mamba-2 stages through the Triton kernels of ssm_kernels (three per layer) instead of
    # the compiled torch step. Opt-in and NOT trusted: on an H100 they were 10.6% faster at batch 1 (2,712 vs 2,453
    # bytes/s) but failed their GPU test against the torch step (fp32 under CUDA graphs: 4.1e-3 off, tolerance 1e-3;
    # bf16 eager: 0.217 off, tolerance 0.083; cause not found), so turning them on logs a warning
    ssm_kernels = False

    def __init__(self, model, state: GenerationState, use_graphs: bool | None = None,
                 compile: bool | str = False, kernels: bool | None = None):
        self.model, self.state = model, state
        self.decoder = model.decoder
        blocks = model.blocks
        aware = [s for s, b in enumerate(blocks) if getattr(b, "modality_aware", False)]
        if aware:  # the static step has one set of weights per layer: it would route every byte to one expert
            raise NotImplementedError(f"GraphStepper: stages {aware} are modality-aware (modality_experts); "
                                      f"their per-modality weights run in the eager step")
        if not isinstance(blocks[0], SSMStack) or not all(isinstance(m, Mamba2Mixer) for m in
                                                          (lay.mixer for lay in blocks[0].layers)):
            raise NotImplementedError("GraphStepper needs a Mamba-2 global stage")
        for b in blocks[1:]:
            if isinstance(b, SSMStack) and not all(isinstance(lay.mixer, Mamba2Mixer) for lay in b.layers):
                raise NotImplementedError("GraphStepper supports Transformer and Mamba-2 inner stages")
            if isinstance(b, TransformerBlock) and b.max_len is not None:
                raise NotImplementedError("GraphStepper: learned positions in inner stages")
        dev = model.head.weight.device
        self.use_graphs = dev.type == "cuda" if use_graphs is None else use_graphs
        self.Q0 = model.units[0]
        self.ready = False  # the current state's caches are in the static buffers
        self.allocated = False  # the static buffers exist (allocated once: the graphs read their addresses)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.captures = 0  # CUDA graphs captured by this stepper (a benchmark's warm-up should do them all)
        self.N = state.tokens.shape[0]
        self.dev = dev
        from . import kernels as decode_kernels

        fits = all(decode_kernels.supports(b) for b in blocks if isinstance(b, TransformerBlock))
        if kernels is None:  # larger batches: the torch step's matrix products
            kernels = decode_kernels.available(dev) and fits and decode_kernels.by_default(self.N)
        elif kernels and not decode_kernels.available(dev):
            raise NotImplementedError(f"GraphStepper: the Triton decode kernels cannot run on {dev}")
        elif kernels and not fits:
            raise NotImplementedError(f"GraphStepper: the Triton decode kernels need contiguous weights and "
                                      f"layer widths <= {decode_kernels.MAX_K}")
        self.kernels = bool(kernels)
        # the per-stage steps; compiled, each stage's layers become a few fused kernels (one graph for all
        # positions: they differ only in tensor arguments)
        self.tf_step, self.ssm_step = transformer_stage_step, ssm_stage_step
        self.compiled = compile  # False, or the torch.compile request (True / a mode): the static passes follow it
        if compile:
            self.tf_step = compile_tuned(transformer_stage_step, compile)
            self.ssm_step = compile_tuned(ssm_stage_step, compile)
        if self.kernels:  # (blk, x, caches, rope, pos): the position as an int, one graph per phase anyway
            self.tf_step = decode_kernels.transformer_stage_step
        from . import ssm_kernels

        # instance attribute: whether this stepper's SSM stages run the kernels (all of them fit, and asked for)
        self.ssm_kernels = bool(self.kernels and type(self).ssm_kernels and all(
            ssm_kernels.supports(b) for b in blocks if isinstance(b, SSMStack)))
        if self.ssm_kernels:
            log.warning("GraphStepper.ssm_kernels: the Mamba-2 decode kernels failed their GPU test against the torch "
                        "step (benchmarks/RESULTS.md, eleventh session): outputs may differ beyond rounding")
            self.ssm_step = ssm_kernels.ssm_stage_step

    def reset(self, state: GenerationState) -> None:
        """Continue ``state`` (a new stream of the same ``N`` rows) from now on. The static buffers, compiled steps
        and captured graphs are kept: the state's caches are copied into the buffers once it holds ``Q_0`` bytes
        (after which ``feed`` gives exactly what a new stepper on ``state`` would)."""
        if state.tokens.shape[0] != self.N:
            raise ValueError(f"GraphStepper.reset: a state of {state.tokens.shape[0]} rows for a stepper of {self.N}")
        self.state = state
        self.ready = False

    # -- conversion of the eager state to static buffers ------------------------------------------
    def _allocate(self) -> None:
        """The static buffers (once per stepper: captured graphs read and write these addresses)."""
        m, N = self.model, self.N
        dtype = m.head.weight.dtype
        self.window = torch.zeros(N, self.Q0, dtype=torch.long, device=self.dev)  # (N, Q0) the last Q0 tokens
        self.tok = torch.zeros(N, 1, dtype=torch.long, device=self.dev)
        self.out = torch.zeros(N, m.config.vocab_size, dtype=torch.float32, device=self.dev)
        self.ctx = [None] + [torch.zeros(N, m.lengths[s], m.widths[s], dtype=dtype, device=self.dev)
                             for s in range(1, m.num_stages)]
        self.caches: list[list[dict]] = []
        self.rope: list[list | None] = []  # per Transformer stage: (cos, sin) per position
        self.slots: list[list | None] = []  # per Transformer stage: (write, valid) masks per position
        for s, blk in enumerate(m.blocks):
            layers = []
            if isinstance(blk, TransformerBlock):
                P = m.lengths[s]
                at = blk.layers[0].attn
                for _ in range(len(blk.layers)):
                    kb = torch.zeros(N, at.heads, P, at.head_dim, dtype=dtype, device=self.dev)
                    layers.append({"k": kb, "v": torch.zeros_like(kb)})
                pos = torch.arange(P, device=self.dev)
                cos, sin = rope_cos_sin(pos, at.head_dim, at.rope_base)
                self.rope.append([(cos[p:p + 1].clone(), sin[p:p + 1].clone()) for p in range(P)]
                                 if at.rope else None)
                self.slots.append([(pos == p, pos <= p) for p in range(P)])
            else:
                for lay in blk.layers:
                    mx = lay.mixer
                    layers.append({"conv": torch.zeros(N, mx.conv_dim, mx.d_conv - 1, dtype=dtype, device=self.dev),
                                   "ssm": torch.zeros(N, mx.nheads, mx.headdim, mx.d_state, dtype=torch.float32,
                                                      device=self.dev)})
                self.rope.append(None)
                self.slots.append(None)
            self.caches.append(layers)
        self.allocated = True

    def _convert(self) -> None:
        """Copy the eager state into the static buffers (in place; zeros where the state has nothing yet)."""
        if not self.allocated:
            self._allocate()
        m, st = self.model, self.state
        self.window.copy_(st.tokens[:, -self.Q0:])
        self.n = st.length
        for s in range(1, m.num_stages):
            c = st.stages[s - 1].ctx
            if c is None:
                self.ctx[s].zero_()
            else:
                self.ctx[s].copy_(c)
        for s, blk in enumerate(m.blocks):
            cache = st.stages[s].cache
            for i, bufs in enumerate(self.caches[s]):
                d = cache.layer(i)
                for b in bufs.values():
                    b.zero_()
                if isinstance(blk, TransformerBlock):
                    if "k" in d:
                        L = d["k"].shape[2]
                        bufs["k"][:, :, :L].copy_(d["k"])
                        bufs["v"][:, :, :L].copy_(d["v"])
                elif "conv" in d:
                    bufs["conv"].copy_(d["conv"])
                    bufs["ssm"].copy_(d["ssm"])
        self.ready = True
        self.state = None  # not used again (nor kept up to date): a kept stepper holds no call's eager caches

    # -- the static step ---------------------------------------------------------------------------
    def _block_step(self, s: int, x: torch.Tensor, pos: int) -> torch.Tensor:
        blk, caches = self.model.blocks[s], self.caches[s]
        if isinstance(blk, TransformerBlock):
            rope = self.rope[s][pos] if self.rope[s] is not None else None
            if self.kernels:
                return self.tf_step(blk, x, caches, rope, pos)
            return self.tf_step(blk, x, caches, rope, *self.slots[s][pos], self.fuse_linears)
        if pos == 0 and s > 0:  # a new inner sequence: fresh states
            for c in caches:
                c["conv"].zero_()
                c["ssm"].zero_()
        return self.ssm_step(blk, x, caches, self.fuse_linears)

    def _step(self, phase: int) -> None:
        m, N, Q0 = self.model, self.N, self.Q0
        self.window.copy_(torch.cat((self.window[:, 1:], self.tok), dim=1))
        dtype = m.head.weight.dtype
        h = None
        for s in range(m.num_stages):
            Qs = m.units[s]
            if phase % Qs:
                continue  # this stage does not advance at this phase
            if s == 0:
                units = self.window.view(N, 1, Q0)  # the patch just completed
                inp = self.decoder.unit_embedding(0, units).to(dtype)
                pos = 0
            else:
                Qp = m.units[s - 1]
                pos = (phase // Qs) % m.lengths[s]
                if pos == 0:
                    inp = m.start[s].to(dtype).expand(N, 1, -1)
                else:
                    parent_rel = (phase // Qp) * Qp  # start of the parent unit, relative to the patch start
                    a = Q0 - phase + parent_rel + (pos - 1) * Qs  # window index of unit pos - 1
                    inp = self.decoder.unit_embedding(s, self.window[:, a:a + Qs].view(N, 1, Qs)).to(dtype)
                inp = inp + self.ctx[s][:, pos:pos + 1]
            h = self._block_step(s, inp, pos)[:, -1]
            if s + 1 < m.num_stages:
                self.ctx[s + 1].copy_(m.stage_context(s, h).view(N, m.lengths[s + 1], m.widths[s + 1]))
        self.out.copy_(m.head(h).float())

    @torch.no_grad()
    def feed(self, tok: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            logits = self.decoder.feed(self.state, tok)
            if self.state.length >= self.Q0:
                self._convert()
            return logits
        self.n += 1
        phase = self.n % self.Q0
        self.tok.copy_(tok.view(self.N, 1))
        if not self.use_graphs:
            self._step(phase)
            return self.out.clone()
        g = self.graphs.get(phase)
        if g is None:
            g = self.graphs[phase] = self.capture(lambda: self._step(phase))
            self.captures += 1
        g.replay()
        return self.out.clone()

    def capture(self, run) -> torch.cuda.CUDAGraph:
        """``run()`` (work on the static buffers) captured as a CUDA graph: warmed up on a side stream first; the
        warm-up must not change the state, so every buffer is saved and restored around it (and around the
        capture, which runs no kernels). Also serves the static verification passes (graph_verify)."""
        bufs = [self.window, *self.ctx[1:], *(t for c in self.caches for d in c for t in d.values())]
        saved = [b.clone() for b in bufs]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        torch.cuda.current_stream().wait_stream(s)
        for b, v in zip(bufs, saved):
            b.copy_(v)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        for b, v in zip(bufs, saved):  # capture does not run the kernels; state is as before
            b.copy_(v)
        return g
