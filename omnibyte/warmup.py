"""Shape warm-up before step 1 (``train.warm_shapes``): one forward and backward at every row length the run
will see, so that kernel autotuning (mamba-ssm's Triton kernels) and ``torch.compile`` recompiles happen in
the first minute instead of whenever a new batch shape first turns up.

With ``data.pad_to: buckets`` a run sees at most ``len(data.buckets)`` shapes; each that the run's first
sampled training rows need (:func:`omnibyte.data.buckets.buckets_in_use`) is warmed once, the largest first (so the allocator reserves the peak at once). The warm-up leaves no trace in the run: the
RNG states (CPU and the device) are forked and restored, the gradients are dropped, the optimizer is not
touched, so the loss curve equals that of a run without warm-up (tested on CPU).
"""

from __future__ import annotations

import logging
import time

import torch

from . import vocab
from .precision import autocast
from .stream import Batch

log = logging.getLogger("omnibyte.train")


def warm_lengths(buckets: tuple[int, ...], warm: str | bool, device: torch.device, cuda_graphs: bool) -> list[int]:
    """The row lengths to warm up: the buckets a ``pad_to: buckets`` run's sampled rows fall into
    (``loader.warm_buckets()``: not a ``seq_len`` bucket no sampled row needs; empty for the other padding
    modes: ``seq_len`` has one shape, which step 1 warms, ``longest`` no fixed set) when ``warm`` is true, or ``auto`` on CUDA without ``train.cuda_graphs`` (with graphs, each shape's graphs are
    captured when training first meets it -- a few seconds per bucket -- not under the warm-up's forked RNG)."""
    if warm is False or not buckets:
        return []
    if warm == "auto" and (device.type != "cuda" or cuda_graphs):
        return []
    return sorted(set(int(b) for b in buckets), reverse=True)


def _dummy_batch(rows: int, length: int, device: torch.device) -> Batch:
    """Bytes in every modality (equal spans of each row, in code order): a modality-aware model warms every
    expert's kernels, not only one."""
    tokens = (torch.arange(rows * length, dtype=torch.long) * 7 % vocab.NUM_BYTES).view(rows, length)
    codes = torch.tensor([int(m) for m in vocab.Modality], dtype=torch.uint8)
    span = codes[torch.arange(length) * len(codes) // length]
    return Batch(tokens=tokens, loss_mask=torch.ones(rows, length), modality=span.expand(rows, length).clone(),
                 lengths=torch.full((rows,), length, dtype=torch.long)).to(device)


def warm_shapes(train_module: torch.nn.Module, model: torch.nn.Module, lengths: list[int], rows: int,
                device: torch.device, bf16: bool, autocast_cache: bool = True) -> float:
    """Run forward + backward of ``train_module`` (the module the loop calls) once per length in ``lengths``
    on a (rows, length) batch; returns the seconds spent. Collective under DDP / FSDP2 (every rank warms the
    same lengths). Gradients are set to None afterwards; RNG states are restored."""
    if not lengths:
        return 0.0
    meta = getattr(model, "stream_meta", None)
    if meta is not None and not meta.per_token_losses:  # e.g. the CNN+LSTM: its loss reads each sample's answer
        log.info("no shape warm-up for %s: its loss needs real samples", type(model).__name__)
        return 0.0
    from .loss import LossModule

    t0 = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for length in lengths:
            batch = _dummy_batch(rows, length, device)
            with autocast(device, bf16, cache=autocast_cache):
                out = LossModule.unpack(train_module(batch))
                out.loss.backward()
            for p in model.parameters():
                p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    log.info("warmed up %d row length(s) %s in %.1f s", len(lengths), lengths, seconds)
    return seconds


__all__ = ["warm_lengths", "warm_shapes"]
