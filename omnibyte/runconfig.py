"""The run config: one YAML file names everything a run needs.

```yaml
run_name: debug_tiny          # default: the config file's stem
task: {name: synthetic_text}  # poly node -> TASKS registry, that task's own Config
serializer: {name: utf8}      # poly node -> SERIALIZERS registry
model: {name: mblm, ...}      # poly node -> MODELS registry (default mblm)
data:  {seq_len: 256, batch_size: 8}
train: {steps: 200, lr: 3e-3}
eval:  {split: validation}
parallel: {strategy: none}
```

Sizes are per rank: the global batch is ``data.batch_size * train.grad_accum * world_size`` rows of
``data.seq_len`` tokens. Components get their own section, never the whole run config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import ConfigError, Node, apply_overrides, from_dict, load_yaml, poly, resolve_config_path
from .registry import import_plugins

RESOLVED_NAME = "config.resolved.yaml"


@dataclass(frozen=True)
class DataConfig:
    source: Literal["task", "shards", "h5"] = "task"  # raw samples from the task, webdataset shards, or h5
    path: str = ""  # shards directory or h5 file for source shards|h5
    train_split: str = "train"
    seq_len: int = 1024  # tokens per row
    batch_size: int = 8  # rows per micro-batch, per rank
    packing: Literal["auto", "pad", "concat"] = "auto"  # auto = the task's own policy
    pad_to: Literal["seq_len", "longest"] = "seq_len"  # pad packing: fixed rows, or the batch's longest row
    overlong: Literal["error", "skip", "crop"] = "error"  # pad packing: a stream longer than seq_len
    separator: Literal["eos", "none"] = "eos"  # concat packing: token between documents
    shuffle: bool = True
    shuffle_buffer: int = 1024  # samples (and, for concat, rows) held for shuffling
    workers: int = 0  # DataLoader worker processes per rank
    prefetch: int = 2

    def __post_init__(self):
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("data.seq_len and data.batch_size must be >= 1")
        if self.source != "task" and not self.path:
            raise ValueError(f"data.source {self.source!r} needs data.path")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    lr: float = 3e-4
    min_lr: float = 3e-5  # end of the cosine
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.1  # on tensors with >= 2 dims (matrices, embeddings); norms and biases get none
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_accum: int = 1  # micro-batches per optimizer step
    clip: float = 1.0  # max global grad norm; 0 = off
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block in backward
    cuda_graphs: bool = False  # one GPU: stages on mamba-ssm's kernels replayed as CUDA graphs (launch-bound)
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept besides the best (lowest eval bpb of those written at an eval step)
    resume: str = "auto"  # auto (latest checkpoint in the run dir if any) | never | <checkpoint path>
    init_from: str = ""  # a run dir or checkpoint whose weights start this run (transfer)
    init_stages: tuple[int, ...] = ()  # which model stages to take from init_from; empty = all weights
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    progress: bool = True  # tqdm bar
    inject_nan_at: tuple[int, ...] = ()  # testing: make the loss NaN at these steps

    def __post_init__(self):
        if self.steps < 0 or self.grad_accum < 1 or self.max_bad_steps < 1:
            raise ValueError("train.steps >= 0, train.grad_accum >= 1 and train.max_bad_steps >= 1 are required")
        if self.resume not in ("auto", "never") and not self.resume:
            raise ValueError("train.resume: auto | never | a checkpoint path")


@dataclass(frozen=True)
class EvalConfig:
    split: str = "validation"
    max_samples: int = 256  # samples of the split scored (0 = all)
    batch_size: int = 0  # 0 = data.batch_size
    per_token: bool = True  # `omnibyte eval` writes eval/<split>_<step>.h5
    task_metrics: bool = True  # `omnibyte eval` also runs task.evaluate (accuracy, word ppl, ...)
    checkpoint: Literal["best", "latest"] = "latest"  # which checkpoint `omnibyte eval` loads


@dataclass(frozen=True)
class ParallelConfig:
    strategy: Literal["auto", "none", "ddp", "fsdp2"] = "auto"  # auto: ddp under torchrun, else none
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    reshard_after_forward: bool = True  # fsdp2: free gathered weights after forward (ZeRO-3)
    find_unused_parameters: bool = False  # ddp


@dataclass(frozen=True)
class RunConfig:
    run_name: str = ""
    out_dir: str = "runs"
    seed: int = 0
    plugins: tuple[str, ...] = ()  # modules imported before parsing (they register tasks/serializers/models)
    task: Node = poly("tasks")
    serializer: Node = poly("serializers")
    model: Node = poly("models", default="mblm")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    notes: str = ""

    def __post_init__(self):
        if self.task is None:
            raise ValueError("task: missing (e.g. task: {name: synthetic_text})")
        if self.serializer is None:
            raise ValueError("serializer: missing (e.g. serializer: {name: utf8})")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


def load_run_config(name_or_path: str | os.PathLike, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Read a run config (a YAML path, a name in ``configs/`` or a run directory), apply overrides.

    ``plugins:`` modules are imported before the poly nodes resolve, so plugin names parse.
    A run directory reads its ``config.resolved.yaml``.
    """
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / RESOLVED_NAME).is_file():
            raise ConfigError(f"{p}: not a run directory (no {RESOLVED_NAME})")
        p = p / RESOLVED_NAME
        stem = p.parent.name
    else:
        stem = resolve_config_path(p).stem
    data = apply_overrides(load_yaml(p), list(overrides))
    plugins = data.get("plugins") or ()
    if not isinstance(plugins, (list, tuple)):
        raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
    try:
        import_plugins(plugins)
    except ImportError as e:
        raise ConfigError(f"plugins: cannot import {e.name!r}: {e}") from None
    if not data.get("run_name"):
        data["run_name"] = stem
    return from_dict(RunConfig, data)
