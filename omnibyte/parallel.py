"""Process groups, devices, and everything applied to a model from outside it.

Order (as in torchtitan's parallelize): activation checkpointing, then ``torch.compile``, both per
block (``model.stage_blocks()``), then data parallelism -- FSDP2 ``fully_shard`` on each block and
then the root, or DDP around the whole model. Each step changes modules in place without renaming
parameters, so checkpoints stay plain ``state_dict`` keys whatever the strategy. The model file never
imports ``torch.distributed``.

Launch: ``torchrun --nproc-per-node N -m omnibyte train <config>`` (RANK/WORLD_SIZE/LOCAL_RANK set by
torchrun). NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("omnibyte.parallel")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # none | ddp | fsdp2

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; a device this machine does not have is a ConfigError."""
    from .config import ConfigError

    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device={spec!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={spec!r} but CUDA is not available on this machine (use cpu or auto)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={spec!r} but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        raise ConfigError(f"train.device={spec!r}: only cpu and cuda devices are supported")
    return dev


def init_distributed(pcfg, device_spec: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; pick this rank's device and strategy."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank)
    strategy = pcfg.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world > 1:
        if strategy == "none":
            raise RuntimeError(f"parallel.strategy=none under torchrun with {world} processes; use ddp or fsdp2")
        backend = pcfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10),
                                    device_id=device if backend == "nccl" else None)
        log.info("rank %d/%d on %s (%s, %s)", rank, world, device, backend, strategy)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device, strategy if world > 1 else "none")


def destroy() -> None:
    """Leave the process group. Objects of the finished run that still hold the group or its pending work
    (FSDP2 state in reference cycles) are collected first, while the interpreter is whole: freed later, at
    interpreter exit, a gloo work object can abort the process after a finished run (seen once in CI:
    "terminate called without an active exception", SIGABRT on one rank of a resumed FSDP2 run)."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside wrappers that keep it as ``.model`` (BatchLoss) -- the one with ``stage_blocks``."""
    while not callable(getattr(model, "stage_blocks", None)) and isinstance(getattr(model, "model", None),
                                                                          nn.Module):
        model = model.model
    return model


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The per-block modules to wrap: ``stage_blocks()`` of the (unwrapped) model, else none."""
    fn = getattr(unwrap(model), "stage_blocks", None)
    return list(fn()) if callable(fn) else []


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's forward in backward. Patches ``forward`` per instance: state_dict keys
    stay unchanged (checkpoint_wrapper would insert ``_checkpoint_wrapped_module``)."""
    from torch.utils.checkpoint import checkpoint

    blocks = blocks_of(model)
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
    return len(blocks)


def apply_compile(model: nn.Module) -> int:
    """``torch.compile`` each block in place (``Module.compile``: keys unchanged); the whole model if it
    exposes no blocks. Blocks with ``compile_friendly = False`` (Mamba layers on mamba-ssm's kernels) stay
    eager. Returns the number of compiled blocks."""
    blocks = blocks_of(model)
    n = 0
    for block in blocks:
        if getattr(block, "compile_friendly", True):
            block.compile()
            n += 1
    if not blocks:
        model.compile()
    return n


def apply_stage_graphs(model: nn.Module) -> int:
    """Replay the forward and backward of each stage block built on mamba-ssm's kernels as CUDA graphs
    (``torch.cuda.make_graphed_callables``), captured lazily at the first training call. Those blocks are
    launch-bound: on an H100 the 25-layer global stage of the 360M config spends several times more CPU
    time launching Triton kernels than the GPU spends running them, and the GPU idles meanwhile.

    Each input shape, dtype and autocast state gets its own graphs, captured the first time it is seen in
    training (a ``pad_to: buckets`` run has a handful of shapes), up to :data:`MAX_GRAPH_SHAPES` per block;
    beyond that, and for other calls (eval, generation with a cache), the block runs eagerly. Each shape's
    graphs keep their own activation buffers (memory grows with the number of shapes). Autocast must run with
    ``cache_enabled=False`` (a requirement of make_graphed_callables). Returns the number of wrapped blocks.

    Under DDP each rank captures its own graphs. The graphs hold no collective: the parameters' gradients
    leave the graphed backward as ordinary autograd outputs, so DDP's hooks all-reduce them as in an eager
    step (make_graphed_callables' warm-up and capture take gradients with ``autograd.grad``, which fires no
    hook, so nothing is reduced twice).
    """
    n = 0
    for block in getattr(unwrap(model), "blocks", []):
        layers = getattr(block, "layers", [])
        if not layers or all(getattr(lay, "compile_friendly", True) for lay in layers):
            continue
        if getattr(block, "modality_aware", False):  # data-dependent dispatch: no static graph (stays eager)
            log.info("cuda_graphs: %s is modality-aware; it runs eagerly", type(block).__name__)
            continue
        _graph_block(block)
        n += 1
    return n


MAX_GRAPH_SHAPES = 8  # per block: a bucketed run's shapes fit; a run of ever-new shapes falls back to eager


def _graph_block(block: nn.Module) -> None:
    eager = block.forward
    graphs: dict = {}  # (shape, dtype, autocast) -> the graphed forward for it

    def forward(x, cache=None):
        eligible = (cache is None and block.training and torch.is_grad_enabled() and x.is_cuda
                    and x.requires_grad)
        if not eligible:
            return eager(x, cache)
        key = (tuple(x.shape), x.dtype, torch.is_autocast_enabled("cuda"))
        fn = graphs.get(key)
        if fn is None:
            if len(graphs) >= MAX_GRAPH_SHAPES:
                return eager(x, cache)
            sample = x.detach().clone().requires_grad_(True)
            block.forward = eager  # make_graphed_callables captures (and then replaces) this forward
            try:
                torch.cuda.make_graphed_callables(block, (sample,))
                fn = graphs[key] = block.forward
            finally:
                block.forward = forward
            log.info("CUDA graphs captured for %s on input %s%s", type(block).__name__, key,
                     f"; the {MAX_GRAPH_SHAPES}th shape: later new shapes run eagerly"
                     if len(graphs) == MAX_GRAPH_SHAPES else "")
        return fn(x)

    block.forward = forward


def parallelize(model: nn.Module, info: DistInfo, tcfg, pcfg, bf16: bool) -> nn.Module:
    """Apply AC, compile and DDP/FSDP2 in that order. Returns the module to call in training (the DDP
    wrapper, or ``model`` itself, sharded in place for FSDP2)."""
    if tcfg.activation_checkpointing:
        log.info("activation checkpointing on %d blocks", apply_activation_checkpointing(model))
    if tcfg.compile:
        log.info("torch.compile on %d blocks", apply_compile(model))
    if getattr(tcfg, "cuda_graphs", False):
        if info.strategy == "fsdp2":
            from .config import ConfigError

            # fully_shard hooks each block's forward to gather its weights: a graph would bake in one gather
            raise ConfigError("train.cuda_graphs: not with parallel.strategy=fsdp2 (its per-block weight "
                              "gathers are hooks a captured graph cannot replay); use ddp or one process")
        # before DDP wraps the model (partial-network capture): the graphs hold each block's forward and
        # backward only, so DDP's gradient all-reduce runs outside them, from its hooks, as without graphs
        n = apply_stage_graphs(model)
        log.info("CUDA graphs for %d stage block(s) on mamba-ssm kernels%s", n,
                 "" if n else " (none here: no such stage, or no CUDA / mamba-ssm)")
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=pcfg.find_unused_parameters)
    if info.strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kw = {"mp_policy": mp} if mp is not None else {}
        blocks = blocks_of(model)
        for i, block in enumerate(blocks):
            # the last block's weights are needed again at once by backward: keep them gathered
            fully_shard(block, reshard_after_forward=pcfg.reshard_after_forward and i < len(blocks) - 1, **kw)
        # the root (embeddings, head, ...) stays gathered from forward to backward: the chunked loss
        # re-runs the head inside backward, and backward needs these weights first anyway
        fully_shard(model, reshard_after_forward=False, **kw)
        log.info("FSDP2: %d blocks sharded, then the root", len(blocks))
        return model
    return model


def sync_context(train_model: nn.Module, last_micro: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(train_model, "no_sync") and not last_micro:
        return train_model.no_sync()  # DDP
    if hasattr(train_model, "set_requires_gradient_sync"):
        train_model.set_requires_gradient_sync(last_micro)  # FSDP2
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU (FQN-keyed optimizer state, same under any strategy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=info.distributed)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return msd, osd


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None, msd: dict,
                          osd: dict | None, info: DistInfo) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, msd, options=opts)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
