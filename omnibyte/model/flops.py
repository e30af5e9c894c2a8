"""Model FLOPs of one training step of an MBLM: the count behind the benchmarks' MFU and the transfer study's
"FLOPs per step" column, so that both say the same thing.

Forward + backward = 3x forward (no recompute counted): 2 * (matrix-multiply parameters) per position for
every linear layer, plus causal attention's ``QK^T`` and ``AV`` (2 * 2 * T * heads * head_dim / 2 per position
and layer), plus the SSD state products of a Mamba stage. Modality-aware blocks count one expert's weights per
position (each position runs one expert), so their count equals the dense twin's. A Multimodal Pathway layer
multiplies once by ``W + lambda * W'``: its auxiliary weight adds no matrix-multiply FLOPs per position, only
the per-step combination (``W + lambda W'`` forward; ``lambda * g`` and ``sum(g * W')`` backward: 5 FLOPs per
auxiliary weight element).
"""

from __future__ import annotations

from torch import nn

from .blocks.experts import dense_equivalent_numel

PATHWAY_FLOPS_PER_AUX_ELEMENT = 5


def pathway_step_flops(model: nn.Module) -> float:
    """FLOPs per training step of combining every pathway layer's weights (module docstring)."""
    return float(sum(PATHWAY_FLOPS_PER_AUX_ELEMENT * m.aux_weight.numel()
                     for m in model.modules() if hasattr(m, "pathway_lambda")))


def train_flops_per_step(model: nn.Module, batch: int, length: int) -> float:
    """Model FLOPs of one training step on ``batch`` rows of ``length`` bytes (module docstring)."""
    total = 0.0
    S = model.num_stages
    for s in range(S):
        positions = batch * length / model.units[s]
        blk = model.blocks[s]
        mm = dense_equivalent_numel(blk)  # 2-D weights; stacked per-modality weights: one expert; no aux weights
        if s + 1 < S:
            mm += model.to_next[s].weight.numel() + model.patch_embed[s][0].weight.numel()
        total += 2 * mm * positions
        if blk.__class__.__name__ == "TransformerBlock":
            T = model.lengths[s] if s else length / model.units[0]
            for layer in blk.layers:  # QK^T and AV, causal half, at the attention's own width (heads x head_dim,
                # which a block's head_dim may set apart from the stage width; counting the stage width under-
                # stated it, and with it MFU)
                a = layer.attn
                total += 2 * positions * T * a.heads * a.head_dim
        else:  # SSD, recurrent form: per position and layer, the state update (B x) and the readout (C h), each
            # d_inner * d_state multiply-adds: 2 * (2 * d_inner * d_state) FLOPs (until 2026-12-07 twice that,
            # which overstated MFU by 1.6% for mblm360m and 7.5% for pg19_lm)
            cfg = blk.config
            d_inner = getattr(cfg, "expand", 2) * model.widths[s]
            total += 2 * len(blk.layers) * positions * 2 * d_inner * getattr(cfg, "d_state", 16)
    total += 2 * model.head.weight.numel() * batch * length
    return 3 * total + pathway_step_flops(model)


__all__ = ["train_flops_per_step", "pathway_step_flops"]
