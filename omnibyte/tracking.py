"""Experiment tracking beside TensorBoard: one hook, ``train.tracker``, with one real backend.

* ``none`` (default): ``metrics.jsonl`` and TensorBoard only.
* ``wandb``: Weights & Biases (``pip install 'omnibyte[tracking]'``). The run is named after ``run_name``, its
  config is the run's resolved config (flattened keys) plus provenance, and every ``metrics.jsonl`` record is
  logged at its step. ``WANDB_MODE=offline`` works without a network (``wandb sync`` uploads later); the files go
  to ``<run_dir>/wandb/``. A resumed run continues the same W&B run (its id is kept in ``<run_dir>/wandb_id``).

A tracker is only ever opened on the main rank. Its failures never stop training: they are logged once and the
tracker turns itself off, because a run must not die of a dashboard.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("omnibyte.tracking")


class Tracker:
    """The hook: ``log(scalars, step)`` for each metrics record, ``close()`` at the end. The base class does nothing."""

    name = "none"

    def log(self, scalars: dict[str, float], step: int) -> None:
        """``scalars``: ``{"<split>/<key>": value}``, the finite numbers of one metrics record at ``step``."""

    def close(self) -> None:
        pass


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            from .config import ConfigError

            raise ConfigError("train.tracker=wandb needs the wandb package: pip install 'omnibyte[tracking]'") from None
        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]  # W&B: [a-z0-9]
        id_file.write_text(run_id + "\n")
        _wait_for_a_fresh_segment_directory(Path(run_dir) / "wandb", run_id)
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config, reinit="finish_previous")
        self.failed = False

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.failed:
            return
        try:
            self.run.log(dict(scalars), step=step)
        except Exception as e:  # pragma: no cover - a network or disk problem of the tracker
            self.failed = True
            log.warning("wandb: logging failed (%s); tracking is off for the rest of this run", e)

    def close(self) -> None:
        try:
            self.run.finish()
        except Exception as e:  # pragma: no cover
            log.warning("wandb: finish failed (%s)", e)


def _wait_for_a_fresh_segment_directory(wandb_dir: Path, run_id: str) -> None:
    """W&B names each segment's directory by the second it starts (``[offline-]run-YYYYmmdd_HHMMSS-<id>``). A resume
    in the same second as the previous segment's start would write into that segment's directory and replace its log
    file: wait for the next second instead."""
    while any(wandb_dir.glob(f"*run-{time.strftime('%Y%m%d_%H%M%S')}-{run_id}")):
        time.sleep(0.05)


def open_tracker(kind: str, run_dir: Path, run_name: str, project: str, config: dict[str, Any]) -> Tracker:
    if kind == "none":
        return Tracker()
    if kind == "wandb":
        return WandbTracker(run_dir, run_name, project, config)
    raise ValueError(f"train.tracker: unknown tracker {kind!r}")
