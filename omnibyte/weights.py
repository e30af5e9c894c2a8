"""Model weights as files and by stage: safetensors with omnibyte's metadata, and the weights of chosen stages
(``train.init_stages``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from . import vocab

# weights of model stage i: ``blocks.i.*``, ``start.i``, ``patch_embed.i.*`` (its unit embedding), ``to_next.i.*``
# (its context projection); the byte embedding and the head belong to the innermost stage
STAGE_KEY_RE = re.compile(r"^(?:blocks|start|patch_embed|to_next|stages)\.(\d+)(?:\.|$)")
INNER_KEY_RE = re.compile(r"^(?:embed|head)(?:\.|$)")


def save_weights(path: Path, model_state: dict[str, torch.Tensor], step: int,
                 extra: dict[str, str] | None = None) -> None:
    """Weights as safetensors, with the step and the token-contract version in the file's metadata (and ``extra``
    string entries, e.g. an export's config)."""
    from safetensors.torch import save_file

    meta = {**(extra or {}), "step": str(step), "contract_version": str(vocab.CONTRACT_VERSION),
            "format": "omnibyte-1"}
    save_file(_unshare(model_state), str(path), metadata=meta)


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses tied weights; load copies back)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in state.items():
        t = t.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (0, id(t))
        if key in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(key)
        out[k] = t
    return out


def stage_count(weights: dict[str, torch.Tensor]) -> int:
    """How many model stages a state dict holds (the highest stage index in its keys, plus one)."""
    return 1 + max((int(m.group(1)) for k in weights if (m := STAGE_KEY_RE.match(k))), default=0)


def select_stages(weights: dict[str, torch.Tensor], stages: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The weights of the given model stages only (see STAGE_KEY_RE); all weights when ``stages`` is empty.
    Negative indices count from the innermost stage (-1 = the byte-level stage with embedding and head)."""
    if not stages:
        return dict(weights)
    num = stage_count(weights)
    if any(not -num <= s < num for s in stages):
        raise ValueError(f"init_stages={list(stages)}: the checkpoint has stages 0..{num - 1}")
    wanted = {s % num for s in stages}
    out = {}
    for k, v in weights.items():
        m = STAGE_KEY_RE.match(k)
        stage = int(m.group(1)) if m else (num - 1 if INNER_KEY_RE.match(k) else None)
        if stage in wanted:
            out[k] = v
    if not out:
        raise ValueError(f"init_stages={list(stages)}: no weights of those stages in the checkpoint")
    return out
