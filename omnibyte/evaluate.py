"""Generic evaluation: bits per byte overall and per modality, and per-token losses for notebooks.

Bits per byte comes from nats summed across every batch and rank (:mod:`omnibyte.metrics`); per-modality
figures use each token's modality code. The run-level orchestration (which checkpoint, which data) is
:func:`omnibyte.run.evaluate_run`.

Per-token output (``eval/<split>_<step>.h5``): ``tokens`` uint16 (N, L) PAD-filled, ``nll`` float32
(N, L) nats of predicting each token, ``loss_mask`` float32, ``modality`` uint8, ``lengths`` int64,
``ids`` (strings); attributes ``split``, ``step``, ``contract_version``, ``bpb``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .loss import LossModule
from .metrics import LN2, summarize
from .precision import autocast
from .stream import Batch, ByteStream
from .vocab import CONTRACT_VERSION, PAD, Modality


def _dummy_like(batches: list[Batch], seq_len: int) -> Batch:
    """A zero-weight PAD batch for ranks with fewer eval batches (FSDP2 needs every rank in every forward)."""
    L = batches[0].tokens.shape[1] if batches else seq_len
    pad = ByteStream.special(*([PAD] * L), loss=0.0)
    return Batch.collate([pad], length=L)


@torch.no_grad()
def evaluate_bpb(loss_module: nn.Module, batches: list[Batch], device: torch.device, *, bf16: bool = False,
                 info=None, seq_len: int = 1) -> dict[str, Any]:
    """Bits per byte of ``batches`` (this rank's share), summed over ranks when distributed."""
    from .parallel import all_reduce_sum

    was_training = loss_module.training
    loss_module.eval()
    n_local = torch.tensor([len(batches)], device=device)
    if info is not None and info.distributed:
        torch.distributed.all_reduce(n_local, op=torch.distributed.ReduceOp.MAX)
    n_batches = int(n_local.item())
    sums = _new_sums(device)
    for i in range(n_batches):
        batch = batches[i] if i < len(batches) else _dummy_like(batches, seq_len)
        with autocast(device, bf16):
            out = LossModule.unpack(loss_module(batch.to(device)))
        _add(sums, out)
    if info is not None:
        all_reduce_sum(sums, info)
    loss_module.train(was_training)
    return _summary(sums)


_CODES = [int(m) for m in Modality]


def _new_sums(device) -> torch.Tensor:
    """nats, weight, then (nats, weight) per modality code: the sums behind bits per byte."""
    return torch.zeros(2 + 2 * len(_CODES), dtype=torch.float64, device=device)


def _add(sums: torch.Tensor, out) -> None:
    sums[0] += out.nats_sum.double()
    sums[1] += out.weight_sum.double()
    for j, code in enumerate(_CODES):
        if code in out.per_modality:
            n, w = out.per_modality[code]
            sums[2 + 2 * j] += torch.as_tensor(n, device=sums.device).double()
            sums[3 + 2 * j] += torch.as_tensor(w, device=sums.device).double()


def _summary(sums: torch.Tensor) -> dict[str, Any]:
    s = sums.tolist()
    return summarize(s[0], s[1], {code: (s[2 + 2 * j], s[3 + 2 * j]) for j, code in enumerate(_CODES)})


@torch.no_grad()
def evaluate_bpb_per_token(model: nn.Module, batches: list[Batch], device: torch.device, *, bf16: bool = False,
                           visit=None) -> dict[str, Any]:
    """:func:`evaluate_bpb` of a model with per-token losses (one process), from one forward pass per batch that
    also hands its per-token nats to ``visit(batch, nll)`` (``nll`` (B, L) fp32 on the device): per-token files
    and image bits read the same pass instead of running the model again. The sums are :func:`masked_loss`'s
    over the model's ``nll``, as ``batch_loss`` computes them: the same bits per byte."""
    from .loss import masked_loss, per_token_nll

    was_training = model.training
    model.eval()
    sums = _new_sums(device)
    for batch in batches:
        b = batch.to(device)
        with autocast(device, bf16):
            nll = per_token_nll(model, b.tokens, modality=b.modality)
            _add(sums, masked_loss(nll, b.loss_mask, b.modality))
        if visit is not None:
            visit(batch, nll)
    model.train(was_training)
    return _summary(sums)


class PerTokenRows:
    """Collects rows for :func:`write_per_token` from a pass's ``visit(batch, nll)``."""

    def __init__(self):
        self.rows: list[tuple] = []

    def __call__(self, batch: Batch, nll: torch.Tensor) -> None:
        nll = nll.float().cpu().numpy()
        for r in range(len(batch)):
            self.rows.append((batch.tokens[r].numpy(), nll[r], batch.loss_mask[r].numpy(),
                              batch.modality[r].numpy(), int(batch.lengths[r]), batch.ids[r]))


def write_per_token(path: Path, rows: PerTokenRows, *, split: str, step: int,
                    extra_attrs: dict | None = None) -> Path:
    """Per-token nats of the collected rows to an h5 file (see the module docstring)."""
    import h5py

    rows = rows.rows
    L = max(r[0].shape[0] for r in rows)
    N = len(rows)
    tokens = np.full((N, L), PAD, np.uint16)
    nll = np.zeros((N, L), np.float32)
    mask = np.zeros((N, L), np.float32)
    mod = np.zeros((N, L), np.uint8)
    for i, (t, n, m, md, _, _) in enumerate(rows):
        k = t.shape[0]
        tokens[i, :k], nll[i, :k], mask[i, :k], mod[i, :k] = t, n, m, md
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("tokens", data=tokens, compression="gzip")
        f.create_dataset("nll", data=nll, compression="gzip")
        f.create_dataset("loss_mask", data=mask, compression="gzip")
        f.create_dataset("modality", data=mod, compression="gzip")
        f.create_dataset("lengths", data=np.array([r[4] for r in rows], np.int64))
        f.create_dataset("ids", data=np.array([r[5] for r in rows], dtype=h5py.string_dtype()))
        f.attrs["split"] = split
        f.attrs["step"] = step
        f.attrs["contract_version"] = CONTRACT_VERSION
        w = float(mask.sum())
        f.attrs["bpb"] = float((nll * mask).sum() / w / LN2) if w else float("nan")
        for k, v in (extra_attrs or {}).items():
            f.attrs[k] = v
    tmp.replace(path)
    return path
