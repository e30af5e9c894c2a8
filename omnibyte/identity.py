"""Run identity: a run directory belongs to one resolved config.

``omnibyte train`` with a ``run_name`` whose directory already holds a run compares the new resolved config
with that run's own record (the config of its latest checkpoint, else its ``config.resolved.yaml``):

* identical in everything that changes the experiment: the run resumes (or, when it is finished, says so and
  exits 0);
* different: it refuses, lists the differing keys with both values, and suggests a new ``run_name`` (or
  ``train.init_from`` to start a new run from this one's weights).

Keys that may change on resume (:data:`MAY_CHANGE`) do not change what is learned, only how long, how often it is
logged / evaluated / saved, or how fast it runs: a longer ``train.steps`` (the cosine schedule is then stretched to
the new end from the resume point on), logging / eval / checkpoint frequencies, ``keep_last``, progress, device
and performance switches (compile, CUDA graphs, activation checkpointing, deterministic, shape warm-up),
data-loader prefetch,
the early-stopping patience, ``train.resume``, eval-time settings that do not define the selection metric, and
``notes``. The run's ``config.resolved.yaml`` is written once, when the run directory is created, and never
rewritten; each checkpoint carries the config it was written under.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, to_dict

MAY_CHANGE: frozenset[str] = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_last",
    "train.progress", "train.device", "train.compile", "train.cuda_graphs", "train.activation_checkpointing",
    "train.deterministic", "train.resume", "train.max_bad_steps", "train.patience", "train.inject_nan_at",
    "train.tracker", "train.tracker_project",
    "data.prefetch", "eval.batch_size", "eval.per_token", "eval.task_metrics", "eval.checkpoint",
    "parallel.backend", "notes", "train.warm_shapes", "train.stop_after_minutes",
})


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.001, "model.stages.0.width": 96, ...}``: every leaf of a config dict by dotted path."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: list(data) if isinstance(data, tuple) else data}


#: where the run directory lives is not part of the experiment (a moved or copied run is the same run; a relative
#: and an absolute ``out_dir`` name the same place): the run directory itself is what is being compared
LOCATION: frozenset[str] = frozenset({"out_dir", "run_name"})


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = MAY_CHANGE | LOCATION
                ) -> dict[str, tuple]:
    """``{key: (old, new)}`` for every leaf that differs, except those in ``ignore``."""
    a, b = flatten(old), flatten(new)
    out = {}
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if _norm(va) != _norm(vb):
            out[k] = (va, vb)
    return out


def _norm(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str)


class RunIdentityError(ConfigError):
    """A re-run whose config differs from the run directory's own record."""


def check_rerun(recorded, cfg, run_dir: Path) -> None:
    """Raise :class:`RunIdentityError` when ``cfg`` differs from ``recorded`` (the run's record read through
    today's schema, ``from_dict(RunConfig, record)``) in a key outside MAY_CHANGE.

    Reading the record through today's schema gives a key it lacks because the run began under an older omnibyte
    (an option added since) its default, so upgrading omnibyte never makes a run refuse to resume, while setting
    such an option away from its default still does."""
    record = to_dict(recorded)
    diff = config_diff(record, to_dict(cfg))
    if not diff:
        return
    lines = "\n".join(f"  {k}: {_show(a)} (this run) -> {_show(b)} (now)" for k, (a, b) in diff.items())
    raise RunIdentityError(
        f"run directory {run_dir} belongs to another config; {len(diff)} key(s) differ:\n{lines}\n"
        f"Start a new run instead: add run_name={cfg.run_name}-2 (or another name); to start from this run's "
        f"weights add train.init_from={run_dir} as well. Keys that may change on resume: "
        f"{', '.join(sorted(MAY_CHANGE))}.")


def _show(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 80 else s[:77] + "..."
