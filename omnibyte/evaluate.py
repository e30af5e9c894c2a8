"""Generic evaluation: bits per byte overall and per modality, and per-token losses for notebooks.

Bits per byte is ``sum(w * nll) / sum(w) / ln 2`` over loss-weighted tokens (``w`` = the stream's
``loss_mask``), computed from summed nats across every batch and rank -- never an average of batch
averages. Per-modality figures use each token's modality code.

Per-token output (``eval/<split>_<step>.h5``): ``tokens`` uint16 (N, L) PAD-filled, ``nll`` float32
(N, L) nats of predicting each token, ``loss_mask`` float32, ``modality`` uint8, ``lengths`` int64,
``ids`` (strings); attributes ``split``, ``step``, ``contract_version``, ``bpb``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import vocab
from .logging import modality_name
from .stream import Batch

LN2 = math.log(2.0)


class BatchLoss(nn.Module):
    """``model`` + its loss as one module, so DDP/FSDP2 hooks run around the whole loss computation
    (the chunked loss re-runs the head inside backward: FSDP2 must see the loss as this module's output).

    ``forward`` returns a plain tuple ``(loss, nats_sum, weight_sum, per_modality)``: wrappers find
    output tensors by flattening containers, and some torch versions (2.11 among them) do not look into
    dataclasses -- FSDP2 then registers no pre-backward hook and backward meets freed weights.
    :meth:`unpack` turns the tuple back into a :class:`~omnibyte.loss.LossOutput`.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: Batch):
        if hasattr(self.model, "compute_batch_loss"):  # not a byte LM (e.g. the CNN+LSTM baseline)
            out = self.model.compute_batch_loss(batch)
        else:
            from .loss import compute_loss

            kw = {"chunk_size": self.chunk_size} if self.chunk_size else {}
            out = compute_loss(self.model, batch.tokens, batch.loss_mask, batch.modality, **kw)
        return out.loss, out.nats_sum, out.weight_sum, dict(out.per_modality)

    @staticmethod
    def unpack(outputs):
        from .loss import LossOutput

        loss, nats, weight, per_modality = outputs
        return LossOutput(loss=loss, nats_sum=nats, weight_sum=weight, per_modality=per_modality)


def use_bf16_for(cfg, device: torch.device) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, bf16: bool, cache: bool = True):
    """bf16 autocast when asked for (``precision: auto`` asks only on CUDA), else nothing. ``cache=False``
    re-casts weights at each use (required around CUDA-graphed blocks)."""
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def summarize(nats: float, weight: float, per_modality: dict[int, tuple[float, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"loss": nats / weight if weight else float("nan"), "weight": weight}
    out["bpb"] = out["loss"] / LN2
    for code, (n, w) in sorted(per_modality.items()):
        if w > 0:
            out[f"bpb/{modality_name(code)}"] = n / w / LN2
    return out


def _dummy_like(batches: list[Batch], seq_len: int) -> Batch:
    """A zero-weight PAD batch for ranks with fewer eval batches (FSDP2 needs every rank in every forward)."""
    from .stream import ByteStream

    L = batches[0].tokens.shape[1] if batches else seq_len
    pad = ByteStream.special(*([vocab.PAD] * L), loss=0.0)
    return Batch.collate([pad], length=L)


@torch.no_grad()
def evaluate_bpb(loss_module: nn.Module, batches: list[Batch], device: torch.device, *, bf16: bool = False,
                 info=None, seq_len: int = 1) -> dict[str, Any]:
    """Bits per byte of ``batches`` (this rank's share), summed over ranks when distributed."""
    from . import parallel

    was_training = loss_module.training
    loss_module.eval()
    n_local = torch.tensor([len(batches)], device=device)
    if info is not None and info.distributed:
        torch.distributed.all_reduce(n_local, op=torch.distributed.ReduceOp.MAX)
    n_batches = int(n_local.item())
    codes = [int(m) for m in vocab.Modality]
    sums = torch.zeros(2 + 2 * len(codes), dtype=torch.float64, device=device)
    for i in range(n_batches):
        batch = batches[i] if i < len(batches) else _dummy_like(batches, seq_len)
        with autocast(device, bf16):
            out = BatchLoss.unpack(loss_module(batch.to(device)))
        sums[0] += out.nats_sum.double()
        sums[1] += out.weight_sum.double()
        for j, code in enumerate(codes):
            if code in out.per_modality:
                n, w = out.per_modality[code]
                sums[2 + 2 * j] += torch.as_tensor(n, device=device).double()
                sums[3 + 2 * j] += torch.as_tensor(w, device=device).double()
    if info is not None:
        parallel.all_reduce_sum(sums, info)
    s = sums.tolist()
    loss_module.train(was_training)
    per_mod = {code: (s[2 + 2 * j], s[3 + 2 * j]) for j, code in enumerate(codes)}
    return summarize(s[0], s[1], per_mod)


@torch.no_grad()
def write_per_token(path: Path, model: nn.Module, batches: list[Batch], device: torch.device, *, split: str,
                    step: int, bf16: bool = False, extra_attrs: dict | None = None) -> Path:
    """Per-token nats of every row to an h5 file (see the module docstring)."""
    import h5py

    from .loss import per_token_nll

    model.eval()
    rows: list[tuple] = []
    for batch in batches:
        with autocast(device, bf16):
            nll = per_token_nll(model, batch.tokens.to(device)).float().cpu().numpy()
        for r in range(len(batch)):
            rows.append((batch.tokens[r].numpy(), nll[r], batch.loss_mask[r].numpy(), batch.modality[r].numpy(),
                         int(batch.lengths[r]), batch.ids[r]))
    L = max(r[0].shape[0] for r in rows)
    N = len(rows)
    tokens = np.full((N, L), vocab.PAD, np.uint16)
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
        f.attrs["contract_version"] = vocab.CONTRACT_VERSION
        w = float(mask.sum())
        f.attrs["bpb"] = float((nll * mask).sum() / w / LN2) if w else float("nan")
        for k, v in (extra_attrs or {}).items():
            f.attrs[k] = v
    tmp.replace(path)
    return path


def load_trained(run_dir: str | Path, overrides: tuple[str, ...] | list[str] = (), which: str | None = None,
                 device: str = "auto"):
    """(config, task, serializer, model on device in eval mode, checkpoint path, step) of a trained run.
    ``which``: latest | best (default: the run's ``eval.checkpoint``)."""
    from . import checkpoint as ckpt_io
    from .parallel import pick_device
    from .runconfig import load_run_config
    from .train import build_components

    cfg = load_run_config(run_dir, list(overrides))
    ckpt = ckpt_io.resolve_checkpoint(run_dir, which or cfg.eval.checkpoint)
    step = int(ckpt_io.read_state(ckpt)["step"])
    task, serializer, model = build_components(cfg)
    model.load_state_dict(ckpt_io.load_weights(ckpt))
    dev = pick_device(device if device != "auto" else cfg.train.device)
    model.to(dev).eval()
    return cfg, task, serializer, model, ckpt, step
