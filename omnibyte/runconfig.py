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

#: the linear layers ``train.pathway_layers`` may name (Multimodal Pathway, :mod:`omnibyte.pathway`), by the
#: module's own name inside a stage block; the default is every one but Mamba-1's x_proj and dt_proj
PATHWAY_LAYERS: tuple[str, ...] = ("qkv", "out", "gate_up", "down", "in_proj", "out_proj", "x_proj", "dt_proj")
PATHWAY_DEFAULT: tuple[str, ...] = PATHWAY_LAYERS[:6]


@dataclass(frozen=True)
class DataConfig:
    source: Literal["task", "shards", "h5"] = "task"  # raw samples from the task, webdataset shards, or h5
    path: str = ""  # shards: a folder or URL prefix, or a shard spec with {split}; h5: a file or folder
    train_split: str = "train"  # the task split trained on
    seq_len: int = 1024  # tokens per row
    batch_size: int = 8  # rows per micro-batch, per rank
    packing: Literal["auto", "pad", "concat"] = "auto"  # auto = the task's own policy
    pad_to: Literal["seq_len", "longest", "buckets"] = "seq_len"  # pad packing: fixed rows, the batch's
    # longest row, or the smallest of data.buckets that holds it (a few shapes; see omnibyte/data/buckets.py)
    buckets: tuple[int, ...] = ()  # pad_to=buckets: row lengths, ascending; empty = chosen from the data
    overlong: Literal["error", "skip", "crop"] = "error"  # pad packing: a stream longer than seq_len
    separator: Literal["eos", "none"] = "eos"  # concat packing: token between documents
    shuffle: bool = True  # shuffle samples (and concat rows) in a buffer
    shuffle_buffer: int = 1024  # samples (and, for concat, rows) held for shuffling
    workers: int = 0  # DataLoader worker processes per rank
    prefetch: int = 2  # batches each DataLoader worker loads ahead

    def __post_init__(self):
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("data.seq_len and data.batch_size must be >= 1")
        for key in ("workers", "shuffle_buffer"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if self.prefetch < 1:
            raise ValueError(f"data.prefetch must be >= 1, got {self.prefetch}")
        if self.source != "task" and not self.path:
            raise ValueError(f"data.source {self.source!r} needs data.path")
        if self.buckets and self.pad_to != "buckets":
            raise ValueError("data.buckets is used with data.pad_to=buckets")
        if list(self.buckets) != sorted(set(self.buckets)) or any(b < 1 for b in self.buckets):
            raise ValueError(f"data.buckets must be ascending positive lengths, got {list(self.buckets)}")
        if self.buckets and self.buckets[-1] < self.seq_len:
            raise ValueError(f"data.buckets: the largest ({self.buckets[-1]}) must hold data.seq_len={self.seq_len}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    lr: float = 3e-4  # peak learning rate (after warm-up)
    min_lr: float = 3e-5  # end of the cosine
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.1  # on tensors with >= 2 dims (matrices, embeddings); norms and biases get none
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_accum: int = 1  # micro-batches per optimizer step
    clip: float = 1.0  # max global grad norm; 0 = off
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block in backward
    cuda_graphs: bool = False  # one GPU or DDP (not FSDP2): stages on mamba-ssm's kernels replayed as CUDA graphs (launch-bound)
    warm_shapes: Literal["auto"] | bool = "auto"  # pad_to=buckets: forward+backward at every bucket before step 1 (kernel autotuning up front); auto: on CUDA without cuda_graphs
    log_every: int = 10  # steps between training-loss lines (console, metrics.jsonl, TensorBoard)
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 0  # 0 = only at the end
    stop_after_minutes: float = 0.0  # stop this invocation after this many minutes of training, with a checkpoint (run the command again to go on); 0: off. SIGTERM / Ctrl-C do the same after the step in progress
    keep_last: int = 2  # checkpoints kept besides the best (lowest eval bpb of those written at an eval step)
    resume: str = "auto"  # auto (latest checkpoint in the run dir if any) | never | <checkpoint path>
    init_from: str = ""  # a run dir or checkpoint whose weights start this run (transfer)
    init_stages: tuple[int, ...] = ()  # which model stages to take from init_from; empty = all weights
    pathway_from: str = ""  # Multimodal Pathway: a run dir or checkpoint whose same-named linear layers W' join this model's as W + lambda W'
    pathway_stages: tuple[int, ...] = ()  # stages whose layers get a pathway; empty = all
    pathway_layers: tuple[str, ...] = PATHWAY_DEFAULT  # linear layers by name: qkv out (attention), gate_up down (MLP), in_proj out_proj (Mamba); also x_proj dt_proj (Mamba-1)
    pathway_train_aux: bool = True  # the auxiliary weights W' train too (false: frozen)
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    fused_optimizer: Literal["auto"] | bool = "auto"  # fused AdamW: one kernel per step, non-finite steps skipped on the device (no host sync per step); auto: on CUDA, not under FSDP2
    patience: int = 0  # early stopping: stop after this many evaluations without a better eval bpb (0: off)
    tracker: Literal["none", "wandb"] = "none"  # experiment tracking beside TensorBoard (pip install omnibyte[tracking])
    tracker_project: str = "omnibyte"  # the tracker's project name (wandb: WANDB_MODE=offline works without network)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    progress: bool = True  # tqdm bar
    inject_nan_at: tuple[int, ...] = ()  # testing: make the loss NaN at these steps

    def __post_init__(self):
        import math

        if self.steps < 0 or self.grad_accum < 1 or self.max_bad_steps < 1:
            raise ValueError("train.steps >= 0, train.grad_accum >= 1 and train.max_bad_steps >= 1 are required")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"train.min_lr must be finite, in [0, train.lr={self.lr}], got {self.min_lr}")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must both be in [0, 1), got {list(self.betas)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"train.eps must be a finite number > 0, got {self.eps}")
        for key in ("weight_decay", "clip"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"train.{key} must be a finite number >= 0, got {v}")
        if not (math.isfinite(self.stop_after_minutes) and self.stop_after_minutes >= 0):
            raise ValueError(f"train.stop_after_minutes must be a finite number >= 0 (0: off), "
                             f"got {self.stop_after_minutes}")
        for key in ("warmup", "eval_every", "ckpt_every", "patience"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0 (0: off / only at the end), got {getattr(self, key)}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {self.keep_last}")
        if self.device != "auto" and not (self.device == "cpu" or self.device == "cuda"
                                           or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.resume not in ("auto", "never") and not self.resume:
            raise ValueError("train.resume: auto | never | a checkpoint path")
        self._check_pathway()

    def _check_pathway(self) -> None:
        unknown = [n for n in self.pathway_layers if n not in PATHWAY_LAYERS]
        if unknown or not self.pathway_layers:
            raise ValueError(f"train.pathway_layers: {unknown or 'empty'}; choose from {', '.join(PATHWAY_LAYERS)}")
        if not self.pathway_from and (self.pathway_stages or not self.pathway_train_aux
                                      or tuple(self.pathway_layers) != PATHWAY_DEFAULT):
            raise ValueError("train.pathway_stages / pathway_layers / pathway_train_aux are used with "
                             "train.pathway_from (a run dir or checkpoint); it is not set")


@dataclass(frozen=True)
class EvalConfig:
    split: str = "validation"  # the split evaluated during training and by `omnibyte eval`
    max_samples: int = 256  # samples of the split scored (0 = all)
    batch_size: int = 0  # 0 = data.batch_size
    per_token: bool = True  # `omnibyte eval` writes eval/<split>_<step>.h5
    task_metrics: bool = True  # `omnibyte eval` also runs task.evaluate (accuracy, word ppl, ...)
    checkpoint: Literal["auto", "best", "latest"] = "auto"  # what eval/generate load by default; auto: best, else latest
    report: bool = False  # at the end of `omnibyte train`: evaluate the best checkpoint (task metrics) and print a report
    select: str = "bpb"  # the eval metric that picks the best checkpoint and drives train.patience: bpb (loss-weighted,
    # all scored bytes) or bpb/<modality> (text, image, question, answer), e.g. bpb/answer when image bytes carry an
    # auxiliary loss weight: their over-fitting must not pick the VQA checkpoint

    def __post_init__(self):
        if self.max_samples < 0 or self.batch_size < 0:
            raise ValueError(f"eval.max_samples and eval.batch_size must be >= 0 (0: all / data.batch_size), got "
                             f"{self.max_samples} and {self.batch_size}")
        if not self.split:
            raise ValueError("eval.split must name a split (e.g. val or validation)")
        allowed = ["bpb", *(f"bpb/{m}" for m in ("text", "image", "question", "answer"))]
        if self.select not in allowed:
            raise ValueError(f"eval.select={self.select!r}: one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ParallelConfig:
    strategy: Literal["auto", "none", "ddp", "fsdp2"] = "auto"  # auto: ddp under torchrun, else none
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    reshard_after_forward: bool = True  # fsdp2: free gathered weights after forward (ZeRO-3)
    find_unused_parameters: bool = False  # ddp


@dataclass(frozen=True)
class RunConfig:
    run_name: str = ""  # default: the config file's stem (<stem>_<preset> for a preset)
    out_dir: str = "runs"  # the run directory is <out_dir>/<run_name>
    seed: int = 0  # initial weights, data order, dropout
    plugins: tuple[str, ...] = ()  # modules imported before parsing (they register tasks/serializers/models)
    task: Node = poly("tasks")
    serializer: Node = poly("serializers")
    model: Node = poly("models", default="mblm")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    notes: str = ""  # free text kept in the run record
    preset: str = "full"  # which of the config file's `presets:` ran (full: none); `preset=auto|full|<name>` picks

    def __post_init__(self):
        if self.task is None:
            raise ValueError("task: missing (e.g. task: {name: synthetic_text})")
        if self.serializer is None:
            raise ValueError("serializer: missing (e.g. serializer: {name: utf8})")
        self._check_learned_positions()

    def _check_learned_positions(self) -> None:
        """A global Transformer stage with learned positions holds at most ``prod(stage lengths)`` bytes: a longer
        ``data.seq_len`` is refused here, at start-up, not at the first step."""
        import math

        stages = getattr(self.model, "stages", None)
        if not stages or getattr(stages[0].block, "positions", None) != "learned":
            return
        unit = math.prod(s.length for s in stages[1:])  # bytes per global position
        bound = stages[0].length * unit
        if self.data.seq_len > bound:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} is longer than model.stages.0 can take: its block has learned "
                f"positions (positions: learned) for length {stages[0].length} patches x {unit} bytes = {bound} "
                f"bytes; lower data.seq_len to <= {bound}, raise model.stages.0.length to >= "
                f"{-(-self.data.seq_len // unit)}, or use positions: rope")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


def open_plugins(plugins, where, trust: bool) -> None:
    """Import the ``plugins:`` of a config. A run directory's own config (``trust=False``) imports nothing: its
    plugins must already be imported (e.g. named with ``--plugin`` on the command line) or the caller must trust
    the run (``--trust-plugins``), because importing a module runs its code."""
    import sys

    if not isinstance(plugins, (list, tuple)):
        raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
    if not trust:
        missing = [m for m in plugins if m not in sys.modules]
        if missing:
            raise ConfigError(f"{where}: this run's config names plugins {list(plugins)}; opening it would import "
                              f"(run the code of) {missing}. Pass --trust-plugins if you trust this run directory, "
                              f"or --plugin MODULE for each module you choose to import")
        return
    try:
        import_plugins(plugins)
    except ImportError as e:
        raise ConfigError(f"plugins: cannot import {e.name!r}: {e}") from None


def is_run_record(p: Path) -> bool:
    """A run directory, or the ``config.resolved.yaml`` inside one."""
    return (p.is_dir() and (p / RESOLVED_NAME).is_file()) or (p.name == RESOLVED_NAME and p.is_file())


def load_run_config(name_or_path: str | os.PathLike, overrides: tuple[str, ...] | list[str] = (), *,
                    trust_plugins: bool = False) -> RunConfig:
    """Read a run config (a YAML path, a name in ``configs/`` or a run directory), apply overrides.

    ``plugins:`` modules are imported before the poly nodes resolve, so plugin names parse: for a config file
    the user wrote, always; for a run directory (its ``config.resolved.yaml``), only with ``trust_plugins``
    (see :func:`open_plugins`).
    """
    p = Path(name_or_path)
    own_record = is_run_record(p)
    if p.is_dir():
        if not (p / RESOLVED_NAME).is_file():
            raise ConfigError(f"{p}: not a run directory (no {RESOLVED_NAME})")
        p = p / RESOLVED_NAME
        stem = p.parent.name
    else:
        stem = resolve_config_path(p).stem
    raw = load_yaml(p)
    if own_record:  # a run directory trains and evaluates where it is now, wherever it was created
        raw = {**raw, "out_dir": str(p.parent.parent), "run_name": p.parent.name}
    data = apply_preset(raw, list(overrides), where=p)
    open_plugins(data.get("plugins") or (), p, trust=trust_plugins or not own_record)
    if not data.get("run_name"):
        data["run_name"] = stem if own_record or data["preset"] == "full" else f"{stem}_{data['preset']}"
    return from_dict(RunConfig, data)


def apply_preset(raw: dict, overrides: list[str], where=None) -> dict:
    """The config dict with its preset applied, then the overrides (which always win).

    A config file may hold ``presets: {cpu: {...}}``: partial configs deep-merged over it when chosen. ``preset``
    (a top-level key or override): ``auto`` (default when the file has presets) picks ``cpu`` when the run's
    device resolves to the CPU (no CUDA, or ``train.device=cpu``) and the file has a ``cpu`` preset, else
    ``full`` (the file as written). The choice is recorded as ``preset`` in the resolved config, and a preset run
    is named ``<config>_<preset>`` unless ``run_name`` is set."""
    from .config import deep_merge

    presets = raw.get("presets") or {}
    if not isinstance(presets, dict):
        raise ConfigError(f"{where}: presets: expected a mapping of preset name -> partial config")
    base = {k: v for k, v in raw.items() if k != "presets"}
    probe = apply_overrides(base, overrides)
    choice = probe.get("preset", "auto" if presets else "full")
    if choice == "auto":
        choice = "cpu" if "cpu" in presets and _runs_on_cpu(probe) else "full"
        if choice == "cpu":
            import logging

            logging.getLogger("omnibyte.config").warning(
                "no CUDA device: running the 'cpu' preset of %s (a small model and data set that finish on a CPU; "
                "run name <config>_cpu); preset=full runs the GPU sizes here", getattr(where, "stem", where))
        elif "cpu" in presets:
            import logging

            logging.getLogger("omnibyte.config").warning(
                "running the full (GPU) sizes of %s; preset=cpu runs its small CPU preset instead",
                getattr(where, "stem", where))
    if choice != "full" and not presets and raw.get("preset") == choice:
        pass  # a resolved record (a run directory's config): its preset was applied when it was written
    elif choice != "full":
        if choice not in presets:
            raise ConfigError(f"preset={choice!r}: {where} has no such preset (presets: "
                              f"{', '.join(['full', *presets]) or 'none'})")
        base = deep_merge(base, presets[choice])
    data = apply_overrides(base, overrides)
    data["preset"] = choice
    return data


def _runs_on_cpu(data: dict) -> bool:
    device = str((data.get("train") or {}).get("device", "auto"))
    if device.startswith("cuda"):
        return False
    if device == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()
