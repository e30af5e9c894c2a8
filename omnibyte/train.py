"""The training loop, top to bottom: ``omnibyte train <config> [key=value ...]``.

1. join the process group (torchrun) and pick the device; seed everything
2. build task, serializer and model from their config nodes; write the run directory
3. weights: resume a checkpoint of this run (``train.resume``) or start from another run (``init_from``)
4. activation checkpointing / compile / DDP or FSDP2 (:mod:`omnibyte.parallel`); AdamW; warm-up + cosine
5. loop: micro-batches (grad accumulation), clip, skip non-finite steps, step; log, evaluate, checkpoint
6. final evaluation and checkpoint

Step ``k`` means "after k optimizer steps"; metrics and checkpoints are labelled with it. A skipped
(non-finite) step still consumes its data and advances the schedule, so resumed and uninterrupted runs
stay aligned step for step.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import parallel
from .config import dump_yaml, to_dict
from .data import TrainLoader, eval_batches
from .evaluate import BatchLoss, autocast, evaluate_bpb, summarize, use_bf16_for
from .logging import EarlyRecords, RunLogger
from .registry import MODELS, SERIALIZERS, TASKS
from .runconfig import RESOLVED_NAME, RunConfig
from .vocab import Modality

log = logging.getLogger("omnibyte.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps in a row)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_components(cfg: RunConfig):
    """Task, serializer and model from the run config's poly nodes (the model on CPU, fp32)."""
    return TASKS.build(cfg.task), SERIALIZERS.build(cfg.serializer), MODELS.build(cfg.model)


def pad_multiple(model) -> int:
    meta = getattr(model, "stream_meta", None)
    return int(getattr(meta, "patch_product", 1) or 1)


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """AdamW; weight decay on tensors with >= 2 dims only (not on norms, biases, start vectors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)


def lr_factor(step: int, t) -> float:
    """Multiplier of ``t.lr`` for optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    if t.warmup and step < t.warmup:
        return (step + 1) / t.warmup
    progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
    floor = t.min_lr / t.lr if t.lr else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LogWindow:
    """Loss sums over the steps since the last log line (kept in checkpoints: a resumed run logs the same)."""

    def __init__(self, saved: dict | None = None):
        self.nats, self.weight, self.tokens, self.steps = 0.0, 0.0, 0, 0
        self.mod: dict[int, list[float]] = {}
        if saved:
            self.nats, self.weight, self.tokens, self.steps = (saved[k] for k in ("nats", "weight", "tokens", "steps"))
            self.mod = {int(c): list(v) for c, v in saved["mod"].items()}
        self.t0 = time.perf_counter()

    def add(self, nats: float, weight: float, per_mod: dict) -> None:
        self.nats += nats
        self.weight += weight
        for code, (n, w) in per_mod.items():
            acc = self.mod.setdefault(code, [0.0, 0.0])
            acc[0] += float(n)
            acc[1] += float(w)
        self.steps += 1

    def state(self) -> dict:
        return {"nats": self.nats, "weight": self.weight, "tokens": self.tokens, "steps": self.steps, "mod": self.mod}

    def summary(self, info: parallel.DistInfo, device: torch.device) -> dict:
        """Loss, bpb (overall and per modality) and bytes/s, summed over ranks."""
        codes = [int(m) for m in Modality]  # every rank sends every modality: same-shaped all-reduce
        flat = [self.nats, self.weight, float(self.tokens)]
        for c in codes:
            flat += self.mod.get(c, [0.0, 0.0])
        sums = parallel.all_reduce_sum(torch.tensor(flat, dtype=torch.float64, device=device), info).tolist()
        mod = {c: (sums[3 + 2 * i], sums[4 + 2 * i]) for i, c in enumerate(codes)}
        out = summarize(sums[0], sums[1], mod)
        out.pop("weight")
        out["bytes_per_s"] = sums[2] / max(time.perf_counter() - self.t0, 1e-9)
        return out


def find_resume(cfg: RunConfig, run_dir: Path) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return ckpt_io.latest_checkpoint(run_dir / "checkpoints")
    return ckpt_io.resolve_checkpoint(cfg.train.resume)


def init_weights_from(model: torch.nn.Module, source: str, stages: tuple[int, ...]) -> None:
    """Load another run's weights (all, or only ``stages``) into ``model`` before training (transfer)."""
    path = ckpt_io.resolve_checkpoint(source)
    weights = ckpt_io.select_stages(ckpt_io.load_weights(path), stages)
    result = model.load_state_dict(weights, strict=not stages)
    log.info("init_from %s: loaded %d tensors%s", path, len(weights),
             f" (stages {list(stages)}; {len(result.missing_keys)} left at init)" if stages else "")


def train(cfg: RunConfig) -> Path:
    """Run (or resume) training as configured; returns the run directory."""
    info = parallel.init_distributed(cfg.parallel, cfg.train.device)
    # records logged before train.log opens (model size, init_from, resume) go into it once it does
    early = EarlyRecords() if info.is_main else None
    try:
        return _train(cfg, info, early)
    finally:
        if early is not None:
            early.detach()
        parallel.destroy()


def _train(cfg: RunConfig, info: parallel.DistInfo, early: EarlyRecords | None = None) -> Path:
    t, device = cfg.train, info.device
    bf16 = use_bf16_for(cfg, device)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)  # the same on every rank: identical initial weights

    # --- components and run directory ----------------------------------------------------------
    task, serializer, model = build_components(cfg)
    run_dir = cfg.run_dir
    resume_from = find_resume(cfg, run_dir)
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval").mkdir(exist_ok=True)
        dump_yaml(cfg, run_dir / RESOLVED_NAME)
    parallel.barrier(info)
    if resume_from is None and t.init_from:
        init_weights_from(model, t.init_from, t.init_stages)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("run %s: %s, %.2fM parameters, %s%s, %d rank(s) (%s)", cfg.run_name, type(model).__name__,
             n_params / 1e6, device, " bf16" if bf16 else "", info.world, info.strategy)

    # --- parallelism, optimizer, schedule, data -------------------------------------------------
    train_module = parallel.parallelize(BatchLoss(model), info, t, cfg.parallel, bf16)
    optimizer = build_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))
    loader = TrainLoader(cfg.data, task, serializer, seed=cfg.seed, rank=info.rank, world=info.world,
                         pad_multiple=pad_multiple(model))
    step, counters, best = 0, {"bad_steps": 0}, None
    saved_window = None  # the sums of a log window that a checkpoint cut in two
    if resume_from is not None:
        state = ckpt_io.read_state(resume_from)
        if len(state["data"]) != info.world:
            raise TrainingError(f"{resume_from} was written by {len(state['data'])} rank(s); this run has "
                                f"{info.world}. Resume with the same number of processes.")
        optim_state, rngs = ckpt_io.load_training_state(resume_from)
        parallel.load_full_state_dicts(model, optimizer, ckpt_io.load_weights(resume_from),
                                       optim_state["optimizer"], info)
        scheduler.load_state_dict(optim_state["scheduler"])
        loader.load_state_dict(state["data"][info.rank])
        ckpt_io.set_rng_state(rngs[info.rank])
        step, counters, best = state["step"], state["counters"], state.get("best")
        saved_window = state["window"][info.rank]
        log.info("resumed from %s at step %d", resume_from, step)
    else:
        seed_everything(cfg.seed + 1 + info.rank)  # dropout etc. differ per rank from here on

    logger = RunLogger(run_dir, enabled=info.is_main, start_step=step, total_steps=t.steps,
                       progress=t.progress, early=early)
    cfg_dict = to_dict(cfg)  # goes into every checkpoint
    eval_list = None

    def run_eval() -> dict:
        nonlocal eval_list
        if eval_list is None:
            eval_list = eval_batches(cfg.data, task, serializer, cfg.eval.split, max_samples=cfg.eval.max_samples,
                                     batch_size=cfg.eval.batch_size, pad_multiple=pad_multiple(model),
                                     rank=info.rank, world=info.world)
        return evaluate_bpb(train_module, eval_list, device, bf16=bf16, info=info, seq_len=cfg.data.seq_len)

    def save(step: int, eval_result: dict | None) -> None:
        nonlocal best
        if eval_result is not None and (best is None or eval_result["bpb"] < best["value"]):
            best = {"step": step, "metric": f"{cfg.eval.split}/bpb", "value": eval_result["bpb"]}
        msd, osd = parallel.full_state_dicts(model, optimizer, info)
        positions = parallel.all_gather_object(loader.state_dict(), info)
        windows = parallel.all_gather_object(window.state(), info)
        rngs = parallel.all_gather_object(ckpt_io.rng_state(), info)
        if info.is_main:
            path = ckpt_io.save_checkpoint(
                run_dir / "checkpoints", step, model_state=msd,
                optim_state={"optimizer": osd, "scheduler": scheduler.state_dict()}, rng=rngs,
                state={"data": positions, "window": windows, "counters": counters, "best": best, "eval": eval_result,
                       "config": cfg_dict, "world": info.world},
                keep_last=t.keep_last, best=best)
            log.info("checkpoint %s", path)
        parallel.barrier(info)

    # --- the loop ---------------------------------------------------------------------------------
    batches = iter(loader)
    bad_in_row = 0
    window = LogWindow(saved_window)
    last_eval = None
    try:
        while step < t.steps:
            lr = scheduler.get_last_lr()[0]
            nats = torch.zeros((), dtype=torch.float64, device=device)
            weight = torch.zeros((), dtype=torch.float64, device=device)
            per_mod: dict[int, list] = {}
            tokens = 0
            for micro in range(t.grad_accum):
                batch = next(batches).to(device, non_blocking=True)
                with parallel.sync_context(train_module, micro == t.grad_accum - 1), autocast(device, bf16, cache=not t.cuda_graphs):
                    out = BatchLoss.unpack(train_module(batch))
                    loss = out.loss
                    if step + 1 in t.inject_nan_at:
                        loss = loss * float("nan")
                    (loss / t.grad_accum).backward()
                nats += out.nats_sum.double() if step + 1 not in t.inject_nan_at else float("nan")
                weight += out.weight_sum.double()
                for code, (n, w) in out.per_modality.items():  # device tensors: no sync per micro-batch
                    acc = per_mod.setdefault(int(code), [0.0, 0.0])
                    acc[0] = acc[0] + n.detach().double()
                    acc[1] = acc[1] + w.detach().double()
                tokens += int(batch.lengths.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip if t.clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            finite = torch.isfinite(nats) & torch.isfinite(grad_norm)
            finite = parallel.all_reduce_sum((~finite).float(), info) == 0  # every rank agrees
            step += 1
            if bool(finite):
                optimizer.step()
                bad_in_row = 0
                window.add(float(nats), float(weight), per_mod)
            else:
                bad_in_row += 1
                counters["bad_steps"] += 1
                log.warning("step %d: non-finite loss or gradient; skipped (%d in a row, %d in all)",
                            step, bad_in_row, counters["bad_steps"])
                if bad_in_row >= t.max_bad_steps:
                    raise TrainingError(f"{bad_in_row} non-finite steps in a row (train.max_bad_steps="
                                        f"{t.max_bad_steps}) at step {step}; lower train.lr, check the data, "
                                        f"or use precision fp32")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            window.tokens += tokens

            # --- log ------------------------------------------------------------------------------
            if step % t.log_every == 0 or step == t.steps:
                rec = {"step": step, "split": "train", **window.summary(info, device), "lr": lr,
                       "grad_norm": float(grad_norm), "bad_steps": counters["bad_steps"],
                       **{f"data/{k}": v for k, v in loader.stats.items()}}
                logger.log(rec)
                logger.progress(0, loss=f"{rec['loss']:.4f}", bpb=f"{rec['bpb']:.3f}",
                                **{"bytes/s": f"{rec['bytes_per_s']:.3g}"})
                window = LogWindow()
            logger.progress(1)

            # --- evaluate and checkpoint ----------------------------------------------------------
            last_eval = None
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                last_eval = run_eval()
                logger.log({"step": step, "split": cfg.eval.split,
                            **{k: v for k, v in last_eval.items() if k != "weight"}})
                log.info("step %d: %s bpb %.4f", step, cfg.eval.split, last_eval["bpb"])
            if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
                save(step, last_eval)
    finally:
        logger.close()
    if info.is_main:
        mods = {k: v for k, v in (last_eval or {}).items() if k.startswith("bpb/")}
        log.info("done: %d steps, %d skipped; final %s bpb %s %s", step, counters["bad_steps"], cfg.eval.split,
                 f"{last_eval['bpb']:.4f}" if last_eval else "n/a", mods)
    return run_dir


__all__ = ["train", "TrainingError", "build_components", "build_optimizer", "lr_factor"]
