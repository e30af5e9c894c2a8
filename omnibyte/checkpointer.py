"""Saving and restoring a training run's whole state: weights, optimizer, schedule, RNG, data position.

One process writes an unsharded checkpoint (``model.safetensors`` + ``optimizer.pt``); DDP and FSDP2 runs write
``dcp/`` shards from every rank (:mod:`omnibyte.sharded`), never gathering the model or optimizer state on one
rank. Either way the small per-rank state (data position, log window, RNG) is gathered to rank 0 and written
with ``state.json`` (:func:`omnibyte.checkpoint.commit_checkpoint`), and the folder appears atomically.

Resume needs the number of processes that wrote the checkpoint (each rank owns a fixed slice of the data
stream, so another world size would see other data): anything else is refused with a message saying so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt_io
from . import parallel
from .optim import keep_grouping, undecayed
from .rng import rng_state, set_rng_state

log = logging.getLogger("omnibyte.checkpoint")


class ResumeError(RuntimeError):
    """A checkpoint that this run cannot continue from (another world size, ...)."""


class Checkpointer:
    def __init__(self, ckpt_dir: Path, info: parallel.DistInfo, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, keep_last: int = 2):
        self.dir, self.info = Path(ckpt_dir), info
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.keep_last = keep_last
        self.sharded = info.distributed

    def save(self, step: int, *, state: dict[str, Any], per_rank: dict[str, Any], best: dict | None) -> Path | None:
        """Write checkpoint ``step``. ``state``: run-level JSON (counters, config, ...); ``per_rank``: this rank's
        JSON state (e.g. ``{"data": ..., "window": ...}``), gathered into lists indexed by rank. Collective: every
        rank calls it. Returns the checkpoint folder on the main rank."""
        info = self.info
        gathered = parallel.all_gather_object(per_rank, info)
        rngs = parallel.all_gather_object(rng_state(), info)
        full = {**state, "world": info.world, "scheduler": self.scheduler.state_dict(),
                "no_weight_decay": undecayed(self.model, self.optimizer),
                **{k: [g[k] for g in gathered] for k in per_rank}}
        if not self.sharded:
            msd, osd = parallel.full_state_dicts(self.model, self.optimizer, info)
            return ckpt_io.save_checkpoint(self.dir, step, model_state=msd,
                                           optim_state={"optimizer": osd, "scheduler": self.scheduler.state_dict()},
                                           rng=rngs, state=full, keep_last=self.keep_last, best=best)
        from .sharded import save_sharded

        tag = parallel.all_gather_object(os.getpid(), info)[0]  # rank 0's pid names the shared temp folder
        tmp = self.dir / f".tmp-step_{step:06d}-{tag}"
        if info.is_main:
            ckpt_io.begin_checkpoint(self.dir, step, tag)
        parallel.barrier(info)
        final = None
        try:
            try:
                save_sharded(tmp / "dcp", self.model, self.optimizer)
            except (OSError, RuntimeError) as e:
                if (clear := ckpt_io._space_error(e, tmp)) is not None:
                    raise clear from None
                raise
            parallel.barrier(info)
            if info.is_main:
                final = ckpt_io.commit_checkpoint(self.dir, tmp, step, rng=rngs, state={**full, "format": "sharded"},
                                                  keep_last=self.keep_last, best=best)
        finally:
            parallel.barrier(info)
        return final

    def _keep_grouping(self, ckpt: Path, recorded) -> None:
        if recorded is None:
            return
        moved = keep_grouping(self.model, self.optimizer, recorded)
        if moved and self.info.is_main:
            recorded = set(recorded)
            said = ", ".join(f"{n} ({'not decayed' if n in recorded else 'decayed'} in the run so far)"
                             for n in moved[:6])
            more = f" and {len(moved) - 6} more" if len(moved) > 6 else ""
            log.warning("%s: this run began under another weight-decay rule for %d parameter(s): %s%s. It goes on "
                        "as it began (one run, one rule); this omnibyte's rule applies to new runs (train.init_from="
                        "%s starts one from these weights)", ckpt, len(moved), said, more, ckpt)

    def restore(self, ckpt: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load weights, optimizer, schedule and this rank's RNG from ``ckpt``; returns its state.json (``state``:
        the one already read from it, not read again). Each file of the checkpoint is read once."""
        info = self.info
        state = ckpt_io.read_state(ckpt) if state is None else state
        written_by = int(state.get("world", len(state["data"])))
        if written_by != info.world:
            raise ResumeError(f"{ckpt} was written by {written_by} process(es); this run has {info.world}. Resume "
                              f"with the same number of processes (each owns a fixed slice of the data stream); to "
                              f"continue training under another world size, start a new run with "
                              f"train.init_from={ckpt}")
        if (Path(ckpt) / "dcp").is_dir():
            from .sharded import load_sharded

            self._keep_grouping(ckpt, state.get("no_weight_decay"))  # older sharded checkpoints: not recorded
            load_sharded(Path(ckpt) / "dcp", self.model, self.optimizer)
            sched = state["scheduler"]
            rngs = ckpt_io.load_rng(ckpt)
        else:
            optim_state, rngs = ckpt_io.load_training_state(ckpt)
            recorded = state.get("no_weight_decay")
            if recorded is None:  # a checkpoint from before the record: its optimizer's groups say the same
                recorded = [n for g in optim_state["optimizer"]["param_groups"] if g.get("weight_decay") == 0
                            for n in g["params"]]
            self._keep_grouping(ckpt, recorded)
            parallel.load_full_state_dicts(self.model, self.optimizer, ckpt_io.load_weights(ckpt),
                                           optim_state["optimizer"], info)
            sched = state.get("scheduler") or optim_state["scheduler"]
        self.scheduler.load_state_dict(sched)
        set_rng_state(rngs[info.rank])
        return state
