"""Generation state: one cache per stage block, each holding per-layer tensors.

* Transformer layers keep ``{"k": (N, H, T, hd), "v": ...}`` (the attention KV cache).
* Mamba-2 layers keep ``{"conv": (N, conv_dim, d_conv - 1), "ssm": (N, H, headdim, d_state)}``;
  Mamba-1 layers ``{"conv": ..., "ssm": (N, d_inner, d_state)}``. Their size does not grow with the
  context, so one new byte costs O(1) in the context length for Mamba stages.

A stage's cache covers the positions of the stage sequence now being generated: for the outermost stage
that is the whole stream, for an inner stage the current parent unit (it is reset when the parent advances).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BlockCache:
    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    length: int = 0  # positions already processed in this stage sequence

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        while len(self.layers) <= i:
            self.layers.append({})
        return self.layers[i]

    def reset(self) -> None:
        self.layers = []
        self.length = 0

    def select(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat batch rows (``index`` into dim 0), e.g. to fan one prefix out to candidates."""
        for d in self.layers:
            for k, t in d.items():
                d[k] = t.index_select(0, index)


@dataclass
class StageState:
    cache: BlockCache = field(default_factory=BlockCache)
    parent: int = -1  # index of the parent unit this stage sequence belongs to (-1: none yet)
    ctx: torch.Tensor | None = None  # (N, P_{s+1}, D_{s+1}) context this stage hands to the next one


@dataclass
class GenerationState:
    """Everything needed to continue a byte stream: per-stage caches and the bytes seen so far."""

    stages: list[StageState]
    tokens: torch.Tensor  # (N, n - offset): the tokens fed so far from index ``offset`` on
    offset: int = 0  # tokens before this index are dropped (no stage needs them again)

    @property
    def length(self) -> int:
        return self.offset + int(self.tokens.shape[1])

    def trim(self, keep_from: int) -> None:
        """Drop tokens before absolute index ``keep_from`` (memory stays flat over long generations)."""
        if keep_from > self.offset:
            self.tokens = self.tokens[:, keep_from - self.offset:]
            self.offset = keep_from

    def select(self, index: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, index)
        for st in self.stages:
            st.cache.select(index)
            if st.ctx is not None:
                st.ctx = st.ctx.index_select(0, index)
