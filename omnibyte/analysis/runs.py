"""Run directories as tables and curves; smoothing, steps-to-target, seed aggregates; table formatting."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..logging import read_metrics, series
from ..runconfig import RESOLVED_NAME

log = logging.getLogger("omnibyte.analysis")

Curve = tuple[np.ndarray, np.ndarray]  # (steps, values)


# --- loading ----------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run directory, loaded: resolved config (plain dict), metrics records, eval JSONs, h5 paths."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval/*.json by file stem
    per_token_files: list[Path] = field(default_factory=list)  # eval/*.h5, by step
    merged_from: str | None = None  # `omnibyte merge` output: the pathway run it was merged from (no curves)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted path, e.g. ``run.get("serializer.image.name")``."""
        node: Any = self.config
        for part in dotted.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return default
        return node

    def __repr__(self) -> str:
        return f"Run({self.name!r}, {len(self.metrics)} records, evals={sorted(self.evals)})"


def _step_of(path: Path) -> int:
    m = re.search(r"_(\d+)$", path.stem)
    return int(m.group(1)) if m else -1


def load_run(path: str | os.PathLike) -> Run:
    """Load one run directory (it must hold ``config.resolved.yaml`` or ``metrics.jsonl``)."""
    import yaml

    p = Path(path)
    cfg_file, met_file = p / RESOLVED_NAME, p / "metrics.jsonl"
    if not cfg_file.is_file() and not met_file.is_file():
        raise FileNotFoundError(f"{p}: not a run directory (no {RESOLVED_NAME} and no metrics.jsonl)")
    config = (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}
    evals: dict[str, dict[str, Any]] = {}
    h5s: list[Path] = []
    eval_dir = p / "eval"
    if eval_dir.is_dir():
        for f in sorted(eval_dir.glob("*.json")):
            try:
                evals[f.stem] = json.loads(f.read_text())
            except (json.JSONDecodeError, OSError):
                continue
        h5s = sorted(eval_dir.glob("*.h5"), key=lambda f: (_step_of(f), f.name))
    merged_from = None
    prov = p / "provenance.jsonl"
    if prov.is_file():
        for line in prov.read_text().splitlines():
            try:
                merged_from = json.loads(line).get("merged_from") or merged_from
            except (json.JSONDecodeError, AttributeError):
                continue
    return Run(path=p, config=config, metrics=read_metrics(p), evals=evals, per_token_files=h5s,
               merged_from=str(merged_from) if merged_from else None)


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """``root`` itself if it is a run directory, else every run directory below it (sorted)."""
    root = Path(root)
    if (root / RESOLVED_NAME).is_file() or (root / "metrics.jsonl").is_file():
        return [root]
    found = {f.parent for pat in (RESOLVED_NAME, "metrics.jsonl") for f in root.rglob(pat)}
    return sorted(found)


def load_runs(*roots: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Run]:
    """Load run directories from folders, run directories, or ``os.pathsep``-separated strings
    (so ``load_runs(os.environ["OMNIBYTE_RUNS"])`` works)."""
    paths: list[Path] = []
    for r in roots:
        items = [r] if isinstance(r, (str, os.PathLike)) else list(r)
        for item in items:
            for part in str(item).split(os.pathsep):
                if part.strip():
                    paths.extend(find_run_dirs(part.strip()))
    seen: set[Path] = set()
    out = []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            run = load_run(p)
            if run.merged_from:  # the merged weights of a run already counted: no curves of its own
                log.info("%s: skipped, merged from %s by `omnibyte merge`", p, run.merged_from)
                continue
            out.append(run)
    return out


# --- tables and curves ------------------------------------------------------------------------------


def metrics_table(run: Run, split: str | None = None, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The metrics records (of one ``split`` if given) as a list of dicts, restricted to ``keys``
    (``step`` and ``split`` always kept); a key a record lacks is ``None``."""
    rows = [r for r in run.metrics if split is None or series(r) == split]
    if keys is None:
        return [dict(r) for r in rows]
    return [{"step": r.get("step"), "split": series(r), **{k: r.get(k) for k in keys}} for r in rows]


def curve(run: Run, key: str = "loss", split: str = "train") -> Curve:
    """(steps, values) of one metric; records without a finite value are left out; sorted by step and
    deduplicated (the last record of a step wins, as after a resume)."""
    by_step: dict[int, float] = {}
    for r in run.metrics:
        if series(r) != split:
            continue
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            by_step[int(r["step"])] = float(v)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64)


def modality_curves(run: Run, split: str = "train", prefix: str = "bpb/") -> dict[str, Curve]:
    """``{modality: (steps, bits per byte)}`` from the ``bpb/<modality>`` keys of ``split``."""
    keys = sorted({k for r in run.metrics if series(r) == split for k in r if k.startswith(prefix)})
    return {k[len(prefix):]: curve(run, k, split) for k in keys}


def splits_of(run: Run) -> list[str]:
    """The splits in a run's metrics, ``train`` first."""
    return sorted({series(r) for r in run.metrics}, key=lambda s: (s != "train", s))


def smooth(values: Sequence[float] | np.ndarray, window: int = 1, method: str = "mean") -> np.ndarray:
    """Trailing smoothing: ``mean`` = moving average of the last ``window`` points (fewer at the start),
    ``ema`` = exponential with ``alpha = 2 / (window + 1)``. ``window <= 1`` returns a copy."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v.copy()
    if method == "mean":
        c = np.cumsum(np.insert(v, 0, 0.0))
        idx = np.arange(1, v.size + 1)
        lo = np.maximum(0, idx - window)
        return (c[idx] - c[lo]) / (idx - lo)
    if method == "ema":
        alpha, out, acc = 2.0 / (window + 1), np.empty_like(v), v[0]
        for i, x in enumerate(v):
            acc = x if i == 0 else alpha * x + (1 - alpha) * acc
            out[i] = acc
        return out
    raise ValueError(f"method must be 'mean' or 'ema', got {method!r}")


def steps_to_target(steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, target: float,
                    *, window: int = 1, method: str = "mean", lower_is_better: bool = True) -> float | None:
    """The first step at which the (smoothed) curve reaches ``target``, linearly interpolated between the
    last point short of it and the first point at or past it; ``None`` if it never does.

    A curve that starts at or past the target returns its first step."""
    s = np.asarray(steps, dtype=np.float64)
    v = smooth(values, window, method)
    if s.size == 0:
        return None
    reached = v <= target if lower_is_better else v >= target
    hits = np.flatnonzero(reached)
    if hits.size == 0:
        return None
    i = int(hits[0])
    if i == 0:
        return float(s[0])
    v0, v1, s0, s1 = v[i - 1], v[i], s[i - 1], s[i]
    frac = 1.0 if v1 == v0 else (v0 - target) / (v0 - v1)
    return float(s0 + frac * (s1 - s0))


def final_value(run: Run, key: str = "loss", split: str = "train", *, window: int = 1) -> float | None:
    """The metric's last value (the mean of the last ``window`` points), ``None`` if there is none."""
    _, v = curve(run, key, split)
    if v.size == 0:
        return None
    return float(np.mean(v[-max(1, window):]))


# --- seeds: aggregates and error bars ------------------------------------------------------------------


def aggregate(values: Iterable[float | None]) -> dict[str, float]:
    """``{"mean", "std" (ddof=1; 0 for one value), "stderr", "n", "missing"}`` of the non-None, finite values
    (``missing`` counts the others; a mean of nothing is nan)."""
    vals = list(values)
    good = np.array([float(v) for v in vals if v is not None and math.isfinite(float(v))], dtype=np.float64)
    n = int(good.size)
    mean = float(good.mean()) if n else float("nan")
    std = float(good.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan"))
    return {"mean": mean, "std": std, "stderr": std / math.sqrt(n) if n else float("nan"), "n": n,
            "missing": len(vals) - n}


def censored_aggregate(values: Sequence[float | None], censored: Sequence[bool], bound: str) -> dict[str, Any]:
    """:func:`aggregate` of values some of which are censored (a bound, not a measurement: e.g. a run that never
    reached a target, counted at its last step). With any censored value the mean is itself a bound: ``bound``
    (">=" or "<=") is kept and ``censored`` counts them (:func:`fmt` prints both); none censored: a plain
    aggregate (``censored`` 0)."""
    out: dict[str, Any] = aggregate(values)
    k = sum(bool(c) for v, c in zip(values, censored) if v is not None)
    out.update(censored=k, bound=bound if k else "")
    return out


def aggregate_curves(curves: Sequence[Curve], steps: Sequence[int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std, stderr) across seeds' curves, on the steps every curve has (or on ``steps``,
    with linear interpolation inside each curve's range; nan outside)."""
    curves = [c for c in curves if len(c[0])]
    if not curves:
        e = np.zeros(0)
        return e.astype(np.int64), e, e, e
    if steps is None:
        common = set(curves[0][0].tolist())
        for s, _ in curves[1:]:
            common &= set(s.tolist())
        grid = np.array(sorted(common), dtype=np.float64)
    else:
        grid = np.asarray(steps, dtype=np.float64)
    stack = np.stack([np.interp(grid, s.astype(np.float64), v, left=np.nan, right=np.nan) for s, v in curves])
    mean, std, se = (np.full(grid.size, np.nan) for _ in range(3))
    for j, col in enumerate(stack.T):
        a = aggregate(col.tolist())
        mean[j], std[j], se[j] = a["mean"], a["std"], a["stderr"]
    return grid.astype(np.int64), mean, std, se


# --- formatting --------------------------------------------------------------------------------------------


def fmt(agg: dict[str, float] | float | None, digits: int = 3, err: str = "stderr") -> str:
    """``"mean ± err (n)"`` of an :func:`aggregate` dict (or a plain number); ``"-"`` for nothing."""
    if agg is None:
        return "-"
    if not isinstance(agg, dict):
        return "-" if not math.isfinite(float(agg)) else f"{float(agg):.{digits}g}"
    if not agg.get("n"):
        return "-"
    if agg.get("censored"):  # a bound: say so, and how many values are censored
        return (f"{agg['bound']} {agg['mean']:.{digits}g} ± {agg[err]:.{digits}g} (n={agg['n']}, "
                f"{agg['censored']} censored)")
    return f"{agg['mean']:.{digits}g} ± {agg[err]:.{digits}g} (n={agg['n']})"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub-markdown table of dict rows; aggregate dicts print as ``mean ± stderr (n)``."""
    if not rows:
        return ""
    cols = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, dict) and "mean" in v:
            return fmt(v, digits)
        if isinstance(v, float):
            return fmt(v, digits)
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
