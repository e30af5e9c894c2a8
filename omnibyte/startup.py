"""What a training run does before its first step, outside the loop: the run directory's identity and record
(:mod:`omnibyte.identity`), the checkpoint to resume, weights from another run (``train.init_from``), and the
start-up summary."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import parallel
from .config import ConfigError, dump_yaml, from_dict, load_yaml
from .identity import check_rerun
from .logging import read_metrics
from .run import inherit_derived, resolve_data_config
from .runconfig import RESOLVED_NAME, RunConfig

log = logging.getLogger("omnibyte.train")


def run_record(run_dir: Path, latest: Path | None = None) -> dict | None:
    """The config a run directory belongs to: its latest intact checkpoint's, else its ``config.resolved.yaml``."""
    latest = latest or ckpt_io.latest_checkpoint(run_dir / "checkpoints", verify=True)
    if latest is not None:
        return ckpt_io.read_state(latest)["config"]
    if (run_dir / RESOLVED_NAME).is_file():
        return load_yaml(run_dir / RESOLVED_NAME)
    return None


def find_resume(cfg: RunConfig, latest: Path | None) -> Path | None:
    """The checkpoint to continue: this run's latest intact one (``auto``), none, or the one named."""
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return latest
    return ckpt_io.resolve_checkpoint(cfg.train.resume)


def eval_pending(state: dict, run_dir: Path, split: str) -> bool:
    """A checkpoint written before its step's evaluation, which then did not happen (a crash, a failure)."""
    step = state["step"]
    return bool(state.get("eval_due")) and not any(
        r.get("step") == step and r.get("split") == split for r in read_metrics(run_dir))


def init_weights_from(model: torch.nn.Module, source: str, stages: tuple[int, ...]) -> None:
    """Load another run's weights (all, or only ``stages``) into ``model`` before training (transfer). A
    checkpoint of another architecture is a ConfigError naming the first tensors that do not fit."""
    try:
        path = ckpt_io.resolve_checkpoint(source)
    except FileNotFoundError as e:
        raise ConfigError(f"train.init_from={source!r}: {e}") from None
    try:
        weights = ckpt_io.select_stages(ckpt_io.load_weights(path), stages)
    except ValueError as e:
        raise ConfigError(f"train.init_stages: {e}") from None
    own = model.state_dict()
    unknown = [k for k in weights if k not in own]
    wrong = [f"{k} {tuple(v.shape)} (this model: {tuple(own[k].shape)})" for k, v in weights.items()
             if k in own and own[k].shape != v.shape]
    missing = [] if stages else [k for k in own if k not in weights]
    if unknown or wrong or missing:
        detail = "; ".join(filter(None, [f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
                                         f"not in this model: {', '.join(unknown[:3])}" if unknown else "",
                                         f"missing there: {', '.join(missing[:3])}" if missing else ""]))
        raise ConfigError(f"train.init_from={source!r}: {path} holds another architecture ({detail}); "
                          f"start from a run of the same model, or choose matching train.init_stages")
    result = model.load_state_dict(weights, strict=not stages)
    log.info("init_from %s: loaded %d tensors%s", path, len(weights),
             f" (stages {list(stages)}; {len(result.missing_keys)} left at init)" if stages else "")


def open_run_dir(cfg: RunConfig, info: parallel.DistInfo) -> tuple[RunConfig, Path | None]:
    """Check the run directory's identity; returns the config to train and the run's latest intact checkpoint.
    A new run's record is written by :func:`write_record` once its start-up checks passed."""
    run_dir = cfg.run_dir
    latest = ckpt_io.latest_checkpoint(run_dir / "checkpoints", verify=True)
    record = run_record(run_dir, latest)
    if record is not None:
        cfg = inherit_derived(cfg, from_dict(RunConfig, record))
        check_rerun(record, cfg, run_dir)
        if cfg.train.resume == "never" and latest is not None:
            raise ConfigError(f"train.resume=never but {run_dir} already holds checkpoints of this run; choose a "
                              f"new run_name (the old run's checkpoints are never overwritten)")
    else:
        cfg = resolve_data_config(cfg)
    return cfg, latest


def write_record(cfg: RunConfig, info: parallel.DistInfo) -> None:
    """Create a new run's directories and its record (``config.resolved.yaml``, written once, never again).
    Called after the start-up checks (components, eval data, ``init_from``), so a config that fails them
    does not claim the run name."""
    run_dir = cfg.run_dir
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval").mkdir(exist_ok=True)
        if not (run_dir / RESOLVED_NAME).is_file():
            dump_yaml(cfg, run_dir / RESOLVED_NAME)
    parallel.barrier(info)


def startup_summary(cfg: RunConfig, info: parallel.DistInfo, model: torch.nn.Module, bf16: bool,
                    resume_from: Path | None, resume_step: int = 0, new_run: bool = True) -> list[str]:
    """The lines a run starts with: model size, global batch, device and precision, data, run directory."""
    d, t = cfg.data, cfg.train
    n_params = sum(p.numel() for p in model.parameters())
    rows = d.batch_size * t.grad_accum * info.world
    if d.source == "task":
        root = getattr(cfg.task, "root", None)
        source = f"task {cfg.task.name}" + (f" at {root}" if root else "")
    else:
        source = f"{d.source} {d.path}"
    if resume_from is not None:
        where = f"resumes from {resume_from} at step {resume_step}"
    elif new_run:
        where = "new" + (f"; weights from {t.init_from}" if t.init_from else "")
    else:
        where = "exists, no checkpoint: starts at step 0"
    ranks = f"{info.world} rank{'s' if info.world > 1 else ''}"
    return [
        f"run {cfg.run_name}: {type(model).__name__}, {n_params / 1e6:.2f}M parameters ({n_params:,}), "
        f"{t.steps:,} steps",
        f"  global batch: {d.batch_size} rows x {d.seq_len} bytes x {t.grad_accum} grad_accum x {ranks} "
        f"= {rows} rows, {rows * d.seq_len:,} bytes per step",
        f"  device: {info.device}, precision {'bf16 autocast' if bf16 else 'fp32'}, {ranks} "
        f"(parallel {info.strategy})",
        f"  data: {source}, split {d.train_split}; eval: {cfg.eval.split}"
        f" ({cfg.eval.max_samples or 'all'} samples)",
        f"  run directory: {cfg.run_dir} ({where})",
    ]
