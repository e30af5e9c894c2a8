"""The training loop, top to bottom: ``omnibyte train <config> [key=value ...]``.

1. join the process group (torchrun), pick the device, seed everything
2. the run directory: a new one gets its record (``config.resolved.yaml``, written once, never again); an
   existing one must belong to the same config (:mod:`omnibyte.identity`) -- a finished run says so and stops
3. build task, serializer and model (:mod:`omnibyte.run`); check the eval split before step 1
4. weights: resume this run's latest checkpoint (``train.resume``) or start from another run (``init_from``);
   ``pathway_from`` wraps linear layers with another run's (:mod:`omnibyte.pathway`)
5. activation checkpointing / compile / DDP or FSDP2 (:mod:`omnibyte.parallel`); AdamW; warm-up + cosine
6. loop: micro-batches (grad accumulation), clip, skip non-finite steps, step; log; checkpoint, then evaluate;
   SIGTERM / SIGINT / ``train.stop_after_minutes`` stop after the step with a checkpoint (:mod:`omnibyte.stopping`)

Step ``k`` means "after k optimizer steps"; metrics and checkpoints are labelled with it. A skipped
(non-finite) step still consumes its data and advances the schedule, so resumed and uninterrupted runs
stay aligned step for step. A checkpoint is always written *before* the evaluation of the same step (an
evaluation that fails never costs trained steps); the resumed run runs an evaluation the crash interrupted.

One step, from the loop to the first matrix product: ``train_module(batch)`` (:class:`omnibyte.loss.LossModule`,
the module DDP / FSDP2 wrap) -> ``model.batch_loss(batch)`` -> ``model.nll(tokens)`` -> the first layer.
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
from . import parallel, provenance, replicas
from .checkpointer import Checkpointer, ResumeError
from .config import to_dict
from .data import TrainLoader, eval_batches
from .errors import TrainingError
from .evaluate import evaluate_bpb
from .identity import flatten
from .lock import RunLock
from .logging import PROGRESS, EarlyRecords, RunLogger, read_metrics
from .loss import LossModule
from .metrics import LogWindow
from .nonfinite import NonFiniteSteps
from .optim import build_optimizer, build_schedule, follow_config
from .precision import autocast, use_bf16
from .run import build_components
from .runconfig import RESOLVED_NAME, RunConfig
from .startup import (
    attach_pathway_from,
    check_eval_split,
    eval_pending,
    evals_since_best,
    find_resume,
    improves,
    init_weights_from,
    open_run_dir,
    startup_summary,
    write_record,
)
from .stopping import StopRequests
from .warmup import warm_lengths, warm_shapes

log = logging.getLogger("omnibyte.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def summed_counts(counts: dict[str, int], info: parallel.DistInfo) -> dict[str, int]:
    """Per-rank counters (skipped samples, ...) summed over every rank (a collective: all ranks call it)."""
    total: dict[str, int] = {}
    for part in parallel.all_gather_object(dict(counts), info):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def train(cfg: RunConfig, *, dry_run: bool = False) -> Path:
    """Run (or resume) training as configured; returns the run directory. ``dry_run``: build everything and
    check the eval data as a real start does, log the start-up summary, and stop before anything is written
    (no run directory, lock, record or checkpoint)."""
    check_eval_split(cfg)
    info = parallel.init_distributed(cfg.parallel, cfg.train.device)
    # records logged before train.log opens (model size, init_from, resume) go into it once it does
    early = EarlyRecords() if info.is_main and not dry_run else None
    lock = RunLock(cfg.run_dir) if info.is_main and not dry_run else None
    try:
        if lock is not None:
            lock.acquire()  # one writer per run directory, before anything of it is read or written
        parallel.barrier(info)
        run_dir, stopped = _train(cfg, info, early, dry_run=dry_run)
    finally:
        if early is not None:
            early.detach()
        if lock is not None:
            lock.release()
        parallel.destroy()
    if cfg.eval.report and info.is_main and not dry_run and not stopped:  # an unfinished run gets no report
        final_report(run_dir, cfg.train.device)
    return run_dir


def rescale_grads(model: torch.nn.Module, scale: torch.Tensor) -> None:
    """Multiply every gradient by ``scale`` (a device scalar: no host sync); a DTensor's local shard in place."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
             for p in model.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale.to(grads[0].device, torch.float32))


def final_report(run_dir: Path, device: str = "auto") -> list[str]:
    """Evaluate a finished run's best checkpoint with its task metrics and log a short report (``eval.report``)."""
    from .plot import plot_run
    from .run import evaluate_run, load_run, report_lines

    run = load_run(run_dir, device=device)
    results = evaluate_run(run, progress=False)
    lines = report_lines(run, results)
    try:
        lines.append(f"curves plotted: {plot_run(run_dir)}")
    except Exception as e:  # a plot is a convenience: never fail a finished run over it
        lines.append(f"(no curves plot: {e})")
    out = logging.getLogger("omnibyte.progress")
    for line in lines:
        out.info("%s", line)
    return lines


def _train(cfg: RunConfig, info: parallel.DistInfo, early: EarlyRecords | None = None, *,
           dry_run: bool = False) -> tuple[Path, str | None]:
    """Train; returns the run directory and why the run stopped before train.steps (None: it did not)."""
    device = info.device
    cfg, latest = open_run_dir(cfg, info)
    t, run_dir = cfg.train, cfg.run_dir
    resume_from = find_resume(cfg, latest)
    # a resume reads its checkpoint's state.json and the run's metrics.jsonl once, and every decision made from
    # them (finished? an evaluation pending? evaluations since the best, the lines the logger keeps, the restore)
    # takes that one copy: a long run's records are not parsed four times, and no two reads can disagree
    done, history = 0, None
    if resume_from is not None:
        head = ckpt_io.read_state(resume_from)
        history = read_metrics(run_dir)
        done = int(head["step"])
        if done >= t.steps and not eval_pending(head, history, cfg.eval.split):
            log.warning("run %s is finished: step %d of train.steps=%d; nothing to do (evaluate it with "
                        "`omnibyte eval %s`, or raise train.steps to train on)", cfg.run_name, done, t.steps, run_dir)
            return run_dir, None
    bf16 = use_bf16(t.precision, device)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)  # the same on every rank: identical initial weights

    # --- components, and the eval data checked before step 1 ------------------------------------------
    task, serializer, model = build_components(cfg)
    pad = model.stream_meta.patch_product
    # which eval.max_samples samples: spread over the split; a run begun before that rule keeps its first N, so
    # its curve and best checkpoint compare one sample set (checkpoints record the rule)
    subset_rule = "spread" if resume_from is None else head.get("eval_subset", "first")
    if subset_rule == "first" and cfg.eval.max_samples:
        log.warning("resume: this run began when eval.max_samples took the first %d samples of %s; it keeps that "
                    "rule (omnibyte eval spreads them over the split)", cfg.eval.max_samples, cfg.eval.split)
    eval_list = eval_batches(cfg.data, task, serializer, cfg.eval.split, max_samples=cfg.eval.max_samples,
                             batch_size=cfg.eval.batch_size, pad_multiple=pad, rank=info.rank, world=info.world,
                             rule=subset_rule)
    if resume_from is None:
        init_weights_from(model, t.init_from, t.init_stages)
    pathway = attach_pathway_from(model, cfg, info, resume_from)  # train.pathway_from: W + lambda W' layers
    if info.is_main:  # INFO on omnibyte.progress: --quiet keeps it, as it keeps the loss lines
        for line in startup_summary(cfg, info, model, bf16, resume_from, done,
                                    new_run=not (run_dir / RESOLVED_NAME).is_file()):
            logging.getLogger(PROGRESS).info("%s", line)
    if dry_run:
        return run_dir, None
    write_record(cfg, info)
    prov = {**provenance.collect(info.world, device), **({"pathway_from": pathway} if pathway else {})}
    if info.is_main:
        provenance.append(run_dir, {**prov, "resume_from": str(resume_from) if resume_from else None})
    model.to(device)

    # --- parallelism, optimizer, schedule, data -------------------------------------------------
    train_module = parallel.parallelize(LossModule(model), info, t, cfg.parallel, bf16)
    optimizer = build_optimizer(model, t, info.strategy)
    scheduler = build_schedule(optimizer, t)
    saver = Checkpointer(run_dir / "checkpoints", info, model, optimizer, scheduler, keep_last=t.keep_last)
    loader = TrainLoader(cfg.data, task, serializer, seed=cfg.seed, rank=info.rank, world=info.world,
                         pad_multiple=pad)
    step, counters, best, eval_due = 0, {"bad_steps": 0, "bytes_seen": 0, "evals_since_best": 0}, None, False
    saved_window = None  # the sums of a log window that a checkpoint cut in two
    if resume_from is not None:
        try:
            state = saver.restore(resume_from, head)
        except ResumeError as e:
            raise TrainingError(str(e)) from None
        loader.load_state_dict(state["data"][info.rank])
        # a branch (train.resume=<another run's checkpoint>) selects among its own evaluations only: the source's
        # best and its pending evaluation name steps whose checkpoints are in the other run, so a best.json here
        # named a step this run never had (and eval fell back to the latest)
        branch = Path(resume_from).resolve().parent != (run_dir / "checkpoints").resolve()
        step, best = state["step"], None if branch else state.get("best")
        eval_due = not branch and eval_pending(state, history, cfg.eval.split)
        counters.update(state["counters"])
        counters["evals_since_best"] = evals_since_best(history, cfg.eval.split, cfg.eval.select, step)
        best = ckpt_io.read_best(run_dir / "checkpoints") or best
        if branch:
            log.info("resume: a branch of %s: it selects its best checkpoint among its own evaluations (from step "
                     "%d on)", resume_from, step + 1)
        saved_window = state["window"][info.rank]
        log.info("resumed from %s at step %d", resume_from, step)
        if state.get("loss_weighting") != "step" and (t.grad_accum > 1 or info.distributed):
            log.warning("resume: %s was written before micro-batches were weighed by their loss weight (ee97ed8): "
                        "from step %d on, this run's gradient is that of sum(w*nll)/sum(w) over the whole step, "
                        "before it was the mean of its %d micro-batch means (the same with equal-weight rows, e.g. "
                        "concat packing)", resume_from, step + 1, t.grad_accum * info.world)
        for line in follow_config(optimizer, scheduler, t):  # e.g. train.steps raised: the new schedule's lr
            log.info("resume: the optimizer follows this config: %s", line)
        if t.patience and counters["evals_since_best"] >= t.patience and not eval_due:  # it stopped early: done
            log.warning("run %s stopped early at step %d (%d evaluations without a better %s %s, train.patience=%d);"
                        " nothing to do (raise train.patience to train on)", cfg.run_name, step,
                        counters["evals_since_best"], cfg.eval.split, cfg.eval.select, t.patience)
            return run_dir, None
    else:
        seed_everything(cfg.seed + 1 + info.rank)  # dropout etc. differ per rank from here on

    cfg_dict = to_dict(cfg)  # goes into every checkpoint
    tracker = None
    if info.is_main and t.tracker != "none":
        from .tracking import open_tracker

        tracker = open_tracker(t.tracker, run_dir, cfg.run_name, t.tracker_project,
                               {**flatten(cfg_dict), "provenance": prov})
    logger = RunLogger(run_dir, enabled=info.is_main, start_step=step, total_steps=t.steps,
                       progress=t.progress, early=early, tracker=tracker, records=history)
    del history  # a long run's records: not held through the loop
    if step == 0:
        logger.hparams(flatten(cfg_dict), f"{cfg.eval.split}/bpb")

    def record(rec: dict, bytes_seen: int) -> None:
        logger.log({"step": rec.pop("step"), "split": rec.pop("split"), "time": round(time.time(), 3),
                    "bytes_seen": bytes_seen, **rec})

    def save(at: int, then_eval: bool) -> None:
        settle(at)  # a diverged run stops before its checkpoint
        saver.save(at, state={"counters": counters, "best": best, "config": cfg_dict, "eval_due": then_eval,
                              "provenance": prov, "loss_weighting": "step",
                              "eval_subset": subset_rule},
                   per_rank={"data": loader.state_dict(), "window": window.state()}, best=best)
        if info.is_main:
            log.info("checkpoint step %d", at)

    def evaluate(at: int) -> bool:
        """Evaluate the checkpointed step ``at``, record it, update the best checkpoint; True when early
        stopping says stop."""
        nonlocal best
        result = evaluate_bpb(train_module, eval_list, device, bf16=bf16, info=info, seq_len=cfg.data.seq_len)
        seen = counters["bytes_seen"] + int(parallel.all_reduce_sum(
            torch.tensor(float(window.tokens), dtype=torch.float64, device=device), info))
        mark = {"evaluation": True} if cfg.eval.split == "train" else {}  # apart from the loss lines (series)
        record({"step": at, "split": cfg.eval.split, **mark, **{k: v for k, v in result.items() if k != "weight"}}, seen)
        log.info("step %d: %s bpb %.4f", at, cfg.eval.split, result["bpb"])
        sel = cfg.eval.select
        if sel not in result:  # e.g. bpb/answer on a split whose scored bytes have no answer
            raise TrainingError(f"eval.select={sel}: the {cfg.eval.split} evaluation has no {sel} (it has: "
                                f"{', '.join(k for k in result if k.startswith('bpb'))}); choose one of those")
        value = result[sel]
        if not math.isfinite(value):  # never the best: every later comparison with NaN would be False
            log.warning("step %d: %s %s is %s: not a candidate for the best checkpoint", at, cfg.eval.split, sel,
                        value)
        if improves(value, best["value"] if best else None):
            best = {"step": at, "metric": f"{cfg.eval.split}/{sel}", "value": value}
            if info.is_main:
                ckpt_io.write_best(run_dir / "checkpoints", best)
            counters["evals_since_best"] = 0
        else:
            counters["evals_since_best"] += 1
        return bool(t.patience) and counters["evals_since_best"] >= t.patience

    # --- every batch shape once before step 1 (train.warm_shapes): autotuning up front --------------
    lengths = warm_lengths(loader.warm_buckets(), t.warm_shapes, device, t.cuda_graphs)
    warm_shapes(train_module, model, lengths, cfg.data.batch_size, device, bf16, autocast_cache=not t.cuda_graphs)

    # --- the loop ---------------------------------------------------------------------------------
    batches = iter(loader)
    # the step's loss is sum(w * nll) / sum(w) over all its micro-batches (and ranks): with several, each
    # micro-batch's nats go backward over a constant and the gradients are rescaled by the step's weight once known
    # (a mean of per-micro-batch means over-weighted micro-batches with fewer loss-weighted bytes)
    pooled = t.grad_accum > 1 or info.distributed
    step_const = float(cfg.data.batch_size * cfg.data.seq_len * t.grad_accum)  # equal on every rank
    guard = NonFiniteSteps(optimizer, t.max_bad_steps, counters["bad_steps"])
    log.info("optimizer: AdamW, %s", "fused (non-finite steps skipped on the device)" if guard.on_device
             else "not fused (the host checks each step for non-finite values)")
    window = LogWindow(saved_window)

    def settle(at: int) -> None:
        """Read what the device knows of skipped steps (fused optimizer: one host sync, here only)."""
        guard.check(at)
        counters["bad_steps"] = guard.total
    stopped = None
    stops = StopRequests(t.stop_after_minutes, info, t.log_every)
    try:
        # the run stopped between a checkpoint and its evaluation: that evaluation may end it, as it would have
        ended = bool(eval_due) and evaluate(step) and step < t.steps
        if ended:
            log.warning("early stopping at step %d: %d evaluations without a better %s bpb (train.patience=%d; "
                        "best: step %s)", step, counters["evals_since_best"], cfg.eval.split, t.patience,
                        best and best["step"])
        stops.install()
        while step < t.steps and not ended:
            lr = scheduler.get_last_lr()[0]
            nats = torch.zeros((), dtype=torch.float64, device=device)
            weight = torch.zeros((), dtype=torch.float64, device=device)
            per_mod: dict[int, list] = {}
            tokens = 0
            for micro in range(t.grad_accum):
                batch = next(batches)
                tokens += int(batch.lengths.sum())  # on the host: the batch is still there
                batch = batch.to(device, non_blocking=True)
                with parallel.sync_context(train_module, micro == t.grad_accum - 1), \
                        autocast(device, bf16, cache=not t.cuda_graphs):
                    out = LossModule.unpack(train_module(batch))
                    loss = out.loss
                    if step + 1 in t.inject_nan_at:
                        loss = loss * float("nan")
                    (loss * (out.weight_sum / step_const) if pooled else loss).backward()
                nats += out.nats_sum.double() if step + 1 not in t.inject_nan_at else float("nan")
                weight += out.weight_sum.double()
                for code, (n, w) in out.per_modality.items():  # device tensors: no sync per micro-batch
                    acc = per_mod.setdefault(int(code), [0.0, 0.0])
                    acc[0] = acc[0] + n.detach().double()
                    acc[1] = acc[1] + w.detach().double()
            if pooled:
                rescale_grads(model, step_const * info.world / parallel.all_reduce_sum(weight.clone(), info).clamp_min(1e-12))
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip if t.clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            finite = torch.isfinite(nats) & torch.isfinite(grad_norm)
            finite = parallel.all_reduce_sum((~finite).float(), info) == 0  # every rank agrees
            step += 1
            counted = guard.step(finite, step)  # no host sync with a fused optimizer
            if counted is not False:
                window.add(nats, weight, per_mod, keep=None if counted is True else counted)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            window.tokens += tokens

            # --- log ------------------------------------------------------------------------------
            if step % t.log_every == 0 or step == t.steps:
                settle(step)
                if info.strategy == "ddp" and info.distributed:  # the copies are still one model (replicas.py)
                    replicas.check(model, step)
                summary = window.summary(info, device)
                counters["bytes_seen"] += int(summary.pop("tokens"))
                rec = {"step": step, "split": "train", **summary, "lr": lr, "grad_norm": float(grad_norm),
                       "bad_steps": counters["bad_steps"],
                       **{f"data/{k}": v for k, v in summed_counts(loader.stats, info).items()}}
                record(dict(rec), counters["bytes_seen"])
                logger.progress(0, step, loss=f"{rec['loss']:.4f}", bpb=f"{rec['bpb']:.3f}",
                                **{"bytes/s": f"{rec['bytes_per_s']:.3g}"})
                window = LogWindow()
            logger.progress(1)

            # --- checkpoint, then evaluate: an evaluation error never costs trained steps, and every
            # evaluated step is on disk, so the best checkpoint by the eval metric can always be loaded -----
            last = step == t.steps
            eval_now = bool(t.eval_every and step % t.eval_every == 0) or last
            saved = eval_now or bool(t.ckpt_every and step % t.ckpt_every == 0)
            if saved:
                save(step, then_eval=eval_now)
            if eval_now and evaluate(step) and not last:
                log.warning("early stopping at step %d: %d evaluations without a better %s bpb "
                            "(train.patience=%d; best: step %s)", step, counters["evals_since_best"],
                            cfg.eval.split, t.patience, best and best["step"])
                break
            # --- a stop request (signal, time limit): checkpoint this step, then stop -------------------
            stopped = None if last else stops.due(step)
            if stopped:
                if not saved:
                    save(step, then_eval=False)
                break
    finally:
        stops.restore()
        logger.close()
    if stopped and info.is_main:
        log.warning("stopped at step %d of train.steps=%d (%s); checkpoint written: run the same command again "
                    "to resume from it", step, t.steps, stopped)
        return run_dir, stopped
    if info.is_main:
        chosen = (f"best checkpoint: step {best['step']} ({best['metric']} {best['value']:.4f})" if best
                  else "no evaluation selected a best checkpoint")
        log.info("done: %d steps, %d non-finite steps skipped; %s; run directory %s", step, counters["bad_steps"],
                 chosen, run_dir)
    return run_dir, stopped


__all__ = ["train", "TrainingError"]
