"""Run outputs for humans and tools: a tqdm bar, ``metrics.jsonl``, TensorBoard events, ``train.log``.

``metrics.jsonl`` holds one JSON object per line: ``{"step", "split", "time", "bytes_seen", "loss", "bpb",
...}`` with ``split`` ``train`` (every ``log_every`` steps) or the eval split, ``time`` the wall clock (Unix
seconds) and ``bytes_seen`` the training tokens consumed so far (cumulative over resumes, all ranks);
per-modality bits per byte appear as ``bpb/<modality>``. On resume from step ``k`` the lines after ``k`` (written by the killed run after
its last checkpoint) are dropped and TensorBoard purges its events after ``k``, so the curves of a
resumed run are the curves of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from .vocab import modality_name  # noqa: F401  (re-exported)

METRICS = "metrics.jsonl"
log = logging.getLogger("omnibyte")


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


class _ConsoleFilter(logging.Filter):
    """``level`` for every record, except training-progress lines (``omnibyte.progress``), which always pass:
    ``--quiet`` drops chatter, never the loss lines."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or record.name == PROGRESS


PROGRESS = "omnibyte.progress"


def setup_console_logging(level: int = logging.INFO) -> None:
    """Log ``omnibyte.*`` to stderr through tqdm.write, so messages don't break the progress bar. ``level``
    filters the console only (training-progress lines always show): a run's train.log keeps INFO records
    either way."""
    root = logging.getLogger("omnibyte")
    console = next((h for h in root.handlers if isinstance(h, _TqdmHandler)), None)
    if console is None:
        console = _TqdmHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        root.addHandler(console)
    console.filters = [_ConsoleFilter(level)]
    console.setLevel(logging.INFO)
    root.setLevel(logging.INFO)


def show_bar(progress: bool = True) -> bool:
    """Whether to draw a progress bar: asked for, and stderr is a terminal (in a log file the bar's
    carriage-return updates are noise; runs print plain periodic lines there instead)."""
    return bool(progress) and sys.stderr is not None and sys.stderr.isatty()


def series(record: dict[str, Any]) -> str:
    """The curve a ``metrics.jsonl`` record belongs to: its split, except an evaluation of the training split
    (``eval.split=train``; the trainer marks those ``"evaluation": true``), which is ``train_eval``: the loss
    lines are logged under split ``train`` too, and plots, TensorBoard and the analysis drew both as one zigzag
    curve. (Runs of earlier versions have no mark: their evaluations of ``train`` stay in that curve.)"""
    split = record.get("split", "train")
    return "train_eval" if split == "train" and record.get("evaluation") is True else split


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / METRICS)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when it is absent); a line cut by a kill -9 is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill -9
                continue
    return out


class EarlyRecords(logging.Handler):
    """Holds the ``omnibyte`` log records emitted before a run's train.log exists; :class:`RunLogger`
    writes them there when it opens it."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        logging.getLogger("omnibyte").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10_000:
            self.records.append(record)

    def replay_into(self, handler: logging.Handler) -> None:
        self.detach()
        for r in self.records:
            handler.handle(r)
        self.records = []

    def detach(self) -> None:
        logging.getLogger("omnibyte").removeHandler(self)


class RunLogger:
    """Writes metrics (main rank only) and drives the progress bar. ``records``: the run's ``metrics.jsonl`` as
    already read (a resume reads it once for all its decisions); None reads it here. The lines after
    ``start_step`` are dropped either way."""

    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int, total_steps: int, progress: bool = True,
                 early: EarlyRecords | None = None, tracker=None, records: list[dict[str, Any]] | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self.writer = None
        self.bar = None
        self.tracker = tracker
        if not enabled:
            return
        if records is None:
            records = read_metrics(run_dir)
        kept = [r for r in records if int(r.get("step", 0)) <= start_step]
        from .checkpoint import write_text_atomic

        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # every event after the step this process starts from belongs to an attempt that did not last: purged
            # (also at step 0: an attempt that died before its first checkpoint left its curve beside the new one)
            self.writer = SummaryWriter(str(Path(run_dir) / "events"), purge_step=start_step + 1)
        except ImportError:  # pragma: no cover - tensorboard is a dependency, but keep training without it
            log.warning("tensorboard not installed: no event files")
        file_handler = logging.FileHandler(Path(run_dir) / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        if early is not None:
            early.replay_into(file_handler)
        logging.getLogger("omnibyte").addHandler(file_handler)
        self._file_handler = file_handler
        self.total = total_steps
        # the bar only on a terminal; a log file gets one plain line per log interval instead of carriage returns
        if show_bar(progress):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        split, step = series(record), int(record["step"])
        scalars = {f"{split}/{k}": v for k, v in record.items()
                   if k not in ("step", "split", "evaluation") and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer is not None:
            for k, v in scalars.items():
                if k != f"{split}/time":  # wall-clock time is the event's own, not a curve
                    self.writer.add_scalar(k, v, step)
        if self.tracker is not None:
            self.tracker.log(scalars, step)

    def hparams(self, params: dict[str, Any], metric: str) -> None:
        """The run's resolved config as TensorBoard hparams (in the run's own event file, no sub-run)."""
        if not self.enabled or self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
        for summary in hparams(clean, {metric: float("nan")}):
            self.writer._get_file_writer().add_summary(summary)

    def progress(self, n: int = 1, step: int | None = None, **postfix: Any) -> None:
        """Advance the bar by ``n``; ``postfix`` (at a log step): shown on the bar, or, without a bar, as a plain
        ``step N/M key value ...`` line (INFO on the ``omnibyte.progress`` logger, kept by ``--quiet``)."""
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif postfix and self.enabled:
            where = f"step {step}/{self.total}" if step is not None else "train"
            logging.getLogger(PROGRESS).info("%s  %s", where, "  ".join(f"{k} {v}" for k, v in postfix.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.tracker is not None:
            self.tracker.close()
        self._file.close()
        logging.getLogger("omnibyte").removeHandler(self._file_handler)
        self._file_handler.close()
