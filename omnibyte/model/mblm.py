"""The Multiscale Byte Language Model: a stack of stages over a (B, L) byte sequence.

Length semantics (as in MBLM's ``seq_lens``): ``stages[s].length`` is P_s. Stage 0 (global, outermost)
sees the stream as P_0 patches of Q_0 = P_1 * ... * P_{S-1} bytes; stage s sees each unit of stage s-1 as
P_s units of Q_s bytes; the innermost stage works on single bytes (Q_{S-1} = 1). MBLM's ``[1024, 8]`` is
therefore 1024 patches of 8 bytes = 8,192 bytes. P_0 bounds the context only where the global block needs
it (learned positions); Mamba and RoPE global stages take any number of patches.

Forward (per stage s, outermost first)::

    u_s     = unit embeddings of the stage-s units (bytes: a table; coarser: a linear map of the
              concatenated finer embeddings)                         (N_s, P_s, D_s)
    in_s    = [start_s, u_s[:-1]] + ctx_s                             the causal shift, plus context
    h_s     = block_s(in_s)                                           (N_s, P_s, D_s)
    ctx_s+1 = to_next_s(h_s) viewed as one (P_{s+1}, D_{s+1}) block per stage-s position

where N_s counts the stage-s sequences (B, then B * P_0, ...). The innermost h gives logits with
``logits[:, t]`` predicting ``tokens[:, t]``: position t sees the outer context of all complete units before
its own and the bytes before it inside them. Inputs are padded to a multiple of Q_0 and the output cropped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import vocab
from ..config import ConfigError, Node, poly
from ..registry import MODELS, STAGES
from .api import StreamMeta, StreamModel
from .inference.decoder import Decoder
from .layers import RMSNorm
from .routing import check_modality, pad_modality, stage_routes


@dataclass(frozen=True)
class StageConfig:
    """One stage. ``length``: stage 0 = number of patches (training length = product of all lengths; a
    bound only for learned global positions), inner stages = patch length in units of the next stage."""

    length: int = 8  # stage 0: number of patches; inner stages: patch length in units of the next stage
    width: int = 256  # model width of this stage
    layers: int = 2  # layers of its block
    block: Node = poly("stages", default="transformer")
    checkpoint: bool = False  # activation checkpointing of each layer of this stage (training only)

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.layers < 0:
            raise ValueError(f"layers must be >= 0, got {self.layers}")
        if self.block is None:  # built in code without a block: the registry default, so dumps are complete
            object.__setattr__(self, "block", STAGES.get("transformer").Config())
        check = getattr(self.block, "check_width", None)  # a block's own width constraints (heads, ...)
        if check is not None:
            check(self.width)


def _default_stages() -> tuple[StageConfig, ...]:
    """The framework's default hierarchy: a Mamba-2 global stage over 8-byte patches, a Transformer local one."""
    return (StageConfig(length=1024, width=256, layers=2, block=STAGES.get("mamba2").Config(headdim=32)),
            StageConfig(length=8, width=256, layers=2))


@dataclass(frozen=True)
class MBLMConfig(Node):
    name: str = "mblm"
    vocab_size: int = vocab.VOCAB_SIZE  # 256 bytes + the specials (the token contract)
    stages: tuple[StageConfig, ...] = dataclasses.field(default_factory=_default_stages)
    dropout: float = 0.0  # dropout in every block
    init_std: float = 0.02  # std of the normal weight init (residual outputs scaled by depth)
    tie_embeddings: bool = False  # share the byte embedding and the head (needs equal innermost width)
    inner_chunk_bytes: int = 1 << 20  # training nll path: inner stages + head + loss per chunk of ~this many bytes

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.inner_chunk_bytes < 0:
            raise ValueError("inner_chunk_bytes must be >= 0 (0: no chunking)")
        if not (math.isfinite(self.init_std) and self.init_std > 0):  # inf / nan / 0: a model of nan or zeros
            raise ValueError(f"init_std must be a finite number > 0, got {self.init_std}")
        if self.tie_embeddings and self.stages[-1].width <= 0:
            raise ValueError("tie_embeddings needs an innermost width")

    @property
    def patch_product(self) -> int:
        return math.prod(s.length for s in self.stages[1:])

    @property
    def train_length(self) -> int:
        return math.prod(s.length for s in self.stages)


def _block_node(node: Any) -> Node:
    if node is None:
        return STAGES.get("transformer").Config()
    return node


@MODELS.register("mblm")
class MBLM(StreamModel):
    """Multiscale Byte Language Model: stages of registered blocks over patches of bytes, cached generation.

    See the module docstring. Inference (caches, ``generate``, ``score``, the CUDA-graph step) is a component,
    :attr:`decoder` (:class:`~omnibyte.model.inference.decoder.Decoder`); the methods that decode delegate to it."""

    Config = MBLMConfig

    def __init__(self, config: MBLMConfig):
        super().__init__()
        if isinstance(config, dict):
            from ..config import from_dict

            config = from_dict(MBLMConfig, config, path="model")
        self.config = config
        st = config.stages
        self.num_stages = S = len(st)
        self.lengths = [s.length for s in st]  # P_s
        self.units = [math.prod(self.lengths[s + 1:]) for s in range(S)]  # Q_s bytes per stage-s position
        self.widths = [s.width for s in st]
        std = config.init_std

        self.embed = nn.Embedding(config.vocab_size, self.widths[-1])
        nn.init.normal_(self.embed.weight, std=std)
        # coarser unit embeddings: (P_{s+1} * D_{s+1}) -> D_s, then RMSNorm
        self.patch_embed = nn.ModuleList()
        for s in range(S - 1):
            lin = nn.Linear(self.lengths[s + 1] * self.widths[s + 1], self.widths[s], bias=False)
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))
            self.patch_embed.append(nn.Sequential(lin, RMSNorm(self.widths[s])))
        self.start = nn.ParameterList(nn.Parameter(torch.randn(d) * std) for d in self.widths)
        self.blocks = nn.ModuleList()
        for sc in st:
            blk = STAGES.build(_block_node(sc.block), dim=sc.width, layers=sc.layers, max_len=sc.length,
                               dropout=config.dropout, init_std=std)
            if sc.checkpoint:
                blk.checkpoint_layers = True
            self.blocks.append(blk)
        self.to_next = nn.ModuleList()
        for s in range(S - 1):
            lin = nn.Linear(self.widths[s], self.lengths[s + 1] * self.widths[s + 1], bias=False)
            nn.init.normal_(lin.weight, std=std)
            self.to_next.append(lin)
        self.head = nn.Linear(self.widths[-1], config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=std)
        bounded = not getattr(self.blocks[0], "unbounded", True)
        # stages with modality_experts route every position by a modality (omnibyte.model.routing)
        self.aware = [bool(getattr(b, "modality_aware", False)) for b in self.blocks]
        self.modality_aware = any(self.aware)
        self.stream_meta = StreamMeta(
            vocab_size=config.vocab_size,
            patch_product=self.units[0],
            max_len=self.lengths[0] * self.units[0] if bounded else None,
            modality_aware=self.modality_aware,
        )

    # ------------------------------------------------------------------------------------------
    # helpers

    def stage_blocks(self) -> list[nn.Module]:
        """The per-layer modules of every stage (what parallel.py wraps for checkpointing / FSDP)."""
        out: list[nn.Module] = []
        for blk in self.blocks:
            out.extend(blk.layers)
        return out

    def unit_embeddings(self, x: torch.Tensor, first: int = 0) -> list[torch.Tensor | None]:
        """x: (B, n0, P_1, ..., P_{S-1}) ids -> u[s]: (B, n0, P_1, ..., P_s, D_s) for s >= first."""
        S = self.num_stages
        u: list[torch.Tensor | None] = [None] * S
        cur = self.embed(x)  # (B, n0, P_1, ..., P_{S-1}, D_{S-1})
        u[S - 1] = cur
        for s in range(S - 2, first - 1, -1):
            cur = self.patch_embed[s](cur.flatten(-2))  # (..., P_{s+1} * D_{s+1}) -> (..., D_s)
            u[s] = cur
        return u

    def _run_stage(self, s: int, u: torch.Tensor, ctx: torch.Tensor | None,
                   route: torch.Tensor | None = None) -> torch.Tensor:
        """u: (N_s, T, D_s) unit embeddings; ctx: (N_s, T, D_s) or None -> block output (N_s, T, D_s).
        ``route``: the routing modality of the stage's positions in stream order (modality-aware stages)."""
        N, T, D = u.shape
        start = self.start[s].to(u.dtype).expand(N, 1, D)
        inp = torch.cat((start, u[:, :-1]), dim=1)  # causal shift: position p sees units < p
        if ctx is not None:
            inp = inp + ctx
        if self.aware[s]:
            return self.blocks[s](inp, modality=route.reshape(N, T))
        return self.blocks[s](inp)

    def _routes(self, tokens: torch.Tensor, modality: torch.Tensor | None, padded_len: int, who: str):
        """Per-stage routes (see omnibyte.model.routing) of a (B, L) modality track; Nones for a dense model."""
        if not self.modality_aware:
            return [None] * self.num_stages
        mod = check_modality(modality, tokens, who)
        return stage_routes(pad_modality(mod, padded_len), self.units, self.aware)

    def stage_context(self, s: int, h: torch.Tensor) -> torch.Tensor:
        """h: (..., D_s) -> context for stage s+1: (prod(...), P_{s+1}, D_{s+1})."""
        return self.to_next[s](h).view(-1, self.lengths[s + 1], self.widths[s + 1])

    def _pad(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, L), got shape {tuple(tokens.shape)}")
        B, L = tokens.shape
        if L < 1:
            raise ValueError("tokens must have at least one position (L >= 1)")
        ml = self.stream_meta.max_len
        if ml is not None and L > ml:
            raise ValueError(f"sequence of {L} tokens exceeds this model's max_len {ml} (global stage with "
                             f"learned positions: {self.lengths[0]} patches x {self.units[0]} bytes)")
        Q = self.units[0]
        n0 = -(-L // Q)
        if n0 * Q != L:
            tokens = F.pad(tokens, (0, n0 * Q - L), value=vocab.PAD)
        return tokens.view(B, n0, *self.lengths[1:]), n0

    # ------------------------------------------------------------------------------------------
    # forward

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L) long -> logits (B, L, V). Training and evaluation use :meth:`nll` (through
        :meth:`batch_loss`), which never materialises the full fp32 logits. ``modality``: (B, L) Modality
        codes, required by a modality-aware model (ignored by a dense one)."""
        return self.logits(self.hidden(tokens, modality))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def hidden(self, tokens: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        B, L = tokens.shape[0], tokens.shape[-1]
        x, n0 = self._pad(tokens)
        r = self._routes(tokens, modality, n0 * self.units[0], "MBLM.forward")
        u = self.unit_embeddings(x)
        h = self._run_stage(0, u[0].reshape(B, n0, -1), None, r[0])  # (B, n0, D_0)
        for s in range(1, self.num_stages):
            ctx = self.stage_context(s - 1, h)  # (N_s, P_s, D_s)
            h = self._run_stage(s, u[s].reshape(ctx.shape), ctx, r[s])
        return h.reshape(B, n0 * self.units[0], self.widths[-1])[:, :L]

    def _inner_nll(self, h0: torch.Tensor, x: torch.Tensor, *routes: torch.Tensor | None) -> torch.Tensor:
        """Stages 1.. + head + NLL for a chunk. h0: (B, c, D_0) global outputs, x: (B, c, P_1, ...) ids
        -> (B, c * Q_0) fp32 nats. ``routes``: the chunk's routes of stages 1.. (modality-aware model)."""
        B = x.shape[0]
        u = self.unit_embeddings(x, first=1)
        h = h0
        for s in range(1, self.num_stages):
            ctx = self.stage_context(s - 1, h)
            h = self._run_stage(s, u[s].reshape(ctx.shape), ctx, routes[s - 1] if routes else None)
        logits = self.head(h).float().view(-1, self.config.vocab_size)
        return F.cross_entropy(logits, x.reshape(-1), reduction="none").view(B, -1)

    def _global_inputs(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """Stage-0 unit embeddings (B, n0, D_0), computed in checkpointed chunks of ``chunk`` patches so the
        byte-level embeddings of a long stream are never all alive at once."""
        if self.num_stages == 1:
            return self.embed(x)
        fn = lambda xc: self.unit_embeddings(xc)[0]  # noqa: E731
        n0 = x.shape[1]
        if chunk >= n0 or not torch.is_grad_enabled():
            return fn(x)
        parts = [checkpoint(fn, x[:, a:a + chunk], use_reentrant=False) for a in range(0, n0, chunk)]
        return torch.cat(parts, dim=1)

    def nll(self, tokens: torch.Tensor, chunk_size: int | None = None, modality: torch.Tensor | None = None
            ) -> torch.Tensor:
        """(B, L) fp32 nats of ``-log p(tokens[t] | tokens[<t])``, computed in checkpointed chunks of about
        ``chunk_size`` bytes (default ``inner_chunk_bytes``), so no full fp32 (B, L, V) tensor exists.
        ``modality``: (B, L) Modality codes, required by a modality-aware model (ignored by a dense one)."""
        if isinstance(chunk_size, torch.Tensor):
            raise TypeError("nll(tokens, chunk_size, modality): pass the modality track as modality=...")
        B, L = tokens.shape
        chunk_bytes = chunk_size or self.config.inner_chunk_bytes or L
        if self.num_stages == 1:
            h = self.hidden(tokens, modality)
            step = max(1, chunk_bytes // max(B, 1))

            def head_nll(hc, tc):
                return F.cross_entropy(self.head(hc).float().flatten(0, 1), tc.reshape(-1),
                                       reduction="none").view(tc.shape)

            parts = []
            for a in range(0, L, step):
                hc, tc = h[:, a:a + step], tokens[:, a:a + step]
                use_ckpt = torch.is_grad_enabled() and step < L
                parts.append(checkpoint(head_nll, hc, tc, use_reentrant=False) if use_ckpt else head_nll(hc, tc))
            return torch.cat(parts, dim=1)
        x, n0 = self._pad(tokens)
        Q = self.units[0]
        r = self._routes(tokens, modality, n0 * Q, "MBLM.nll")
        c = max(1, chunk_bytes // (Q * max(B, 1)))  # global patches per chunk
        e0 = self._global_inputs(x, c)  # (B, n0, D_0)
        h0 = self._run_stage(0, e0, None, r[0])
        inner = r[1:] if self.modality_aware else []
        if c >= n0:
            return self._inner_nll(h0, x, *inner).reshape(B, -1)[:, :L]
        parts = []
        for a in range(0, n0, c):
            hc, xc = h0[:, a:a + c], x[:, a:a + c]
            rc = [None if t is None else t[:, a * Q // Qs:(a + c) * Q // Qs] for t, Qs in zip(inner, self.units[1:])]
            if torch.is_grad_enabled():
                parts.append(checkpoint(self._inner_nll, hc, xc, *rc, use_reentrant=False))
            else:
                parts.append(self._inner_nll(hc, xc, *rc))
        return torch.cat(parts, dim=1)[:, :L]


    # ------------------------------------------------------------------------------------------
    # inference (the Decoder component)

    @property
    def decoder(self) -> Decoder:
        """The inference component over this model's weights (stateless; cheap to make)."""
        return Decoder(self)

    def new_state(self, batch: int, device: torch.device | None = None):
        return self.decoder.new_state(batch, device)

    def feed(self, state, new_tokens: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.feed(state, new_tokens, modality)

    def generate(self, prompt, max_new_bytes: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 stop_tokens=(), generator: torch.Generator | None = None, use_graphs: bool = False,
                 compile_step: bool = False, draft=None, draft_len: int = 4, modality=None,
                 base_modality: int | None = None, graph_verify: bool | str = False) -> torch.Tensor:
        """See :meth:`Decoder.generate <omnibyte.model.inference.decoder.Decoder.generate>` (``draft``:
        speculative decoding, :mod:`omnibyte.model.inference.speculative`)."""
        return self.decoder.generate(prompt, max_new_bytes, temperature, top_k, top_p, stop_tokens, generator,
                                     use_graphs=use_graphs, compile_step=compile_step, draft=draft,
                                     draft_len=draft_len, modality=modality, base_modality=base_modality,
                                     graph_verify=graph_verify)

    def score(self, prefix, candidates, modality=None) -> torch.Tensor:
        """See :meth:`Decoder.score <omnibyte.model.inference.decoder.Decoder.score>`."""
        return self.decoder.score(prefix, candidates, modality)

    def score_batch(self, prefixes, candidates, modalities=None) -> torch.Tensor:
        """(B, K): row b = :meth:`score` of ``prefixes[b]`` (any lengths), all rows at once; see
        :mod:`omnibyte.model.inference.scoring` (``StreamModel.score_batch(model, ...)`` is the per-prefix loop).
        A modality-aware model needs ``modalities`` (one track per prefix; candidates follow the generation rule)."""
        from .inference.scoring import score_batch

        return score_batch(self, prefixes, candidates, modalities)


def build_model(config: Any) -> nn.Module:
    """Build a model from an MBLMConfig (or any registered model Config), a dict (a model node, with or
    without ``name:``, or a whole run config with a ``model:`` key) or a YAML path / config name."""
    from ..config import from_dict, load_yaml

    if isinstance(config, Node):
        return MODELS.build(config)
    if isinstance(config, (str,)) or hasattr(config, "__fspath__"):
        from pathlib import Path

        if Path(config).is_dir():  # a run directory (or any folder): never a fresh model in silence
            raise ConfigError(f"build_model({str(config)!r}): that is a folder, not a config; build_model builds an "
                              f"untrained model from a config. Load a trained run with "
                              f"omnibyte.load_run({str(config)!r}, checkpoint='best' | 'latest' | step)")
        data = load_yaml(config)
        if "model" not in data:
            raise ConfigError(f"{config}: no 'model:' section")
        config = data["model"]
    if not isinstance(config, dict):
        raise TypeError(f"build_model takes a config node, dict or YAML path, got {type(config).__name__}")
    if "model" in config and "stages" not in config:
        config = config["model"]
    if isinstance(config, str):
        config = {"name": config}
    config = dict(config)
    config.setdefault("name", "mblm")
    cls = MODELS.get(config["name"])
    return cls(from_dict(cls.Config, config, path="model"))
