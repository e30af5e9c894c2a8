"""Helpers the notebooks call: run directories as tables and curves, steps-to-target, seed aggregates,
VQA accuracy by question type, and per-byte loss maps over an image's byte stream.

No pandas: tables are lists of dicts, curves are numpy arrays. Typical use::

    from omnibyte import analysis as A
    runs = A.load_runs("results/transfer")                 # every run directory below that folder
    groups = A.group_runs(runs)                            # {"png/scratch": [...], "png/pg19": [...], ...}
    steps, mean, std, se = A.aggregate_curves([A.curve(r, "loss", split="val") for r in groups["png/scratch"]])
    A.transfer_table(runs)                                 # steps to the scratch model's final loss
    A.vqa_accuracy(runs[0])                                # {"accuracy", "by_qtype", ...}
    A.image_loss_map(A.per_token_losses(runs[0])[0], runs[0].config)   # (H, W) nats per byte

A run directory (see :mod:`omnibyte.train`) holds ``config.resolved.yaml``, ``metrics.jsonl`` (one JSON
record a line: ``step``, ``split``, ``loss``, ``bpb``, ``bpb/<modality>``, ...), ``eval/<split>_<step>.json``
(``omnibyte eval``), ``eval/vqa_<split>.json`` (VQA accuracy by question type) and
``eval/<split>_<step>.h5`` (per-token losses). Anything missing loads as empty.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .logging import read_metrics
from .runconfig import RESOLVED_NAME
from .vocab import Modality

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
    return Run(path=p, config=config, metrics=read_metrics(p), evals=evals, per_token_files=h5s)


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
            out.append(load_run(p))
    return out


# --- tables and curves ------------------------------------------------------------------------------


def metrics_table(run: Run, split: str | None = None, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The metrics records (of one ``split`` if given) as a list of dicts, restricted to ``keys``
    (``step`` and ``split`` always kept); a key a record lacks is ``None``."""
    rows = [r for r in run.metrics if split is None or r.get("split", "train") == split]
    if keys is None:
        return [dict(r) for r in rows]
    return [{"step": r.get("step"), "split": r.get("split", "train"), **{k: r.get(k) for k in keys}} for r in rows]


def curve(run: Run, key: str = "loss", split: str = "train") -> Curve:
    """(steps, values) of one metric; records without a finite value are left out; sorted by step and
    deduplicated (the last record of a step wins, as after a resume)."""
    by_step: dict[int, float] = {}
    for r in run.metrics:
        if r.get("split", "train") != split:
            continue
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            by_step[int(r["step"])] = float(v)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64)


def modality_curves(run: Run, split: str = "train", prefix: str = "bpb/") -> dict[str, Curve]:
    """``{modality: (steps, bits per byte)}`` from the ``bpb/<modality>`` keys of ``split``."""
    keys = sorted({k for r in run.metrics if r.get("split", "train") == split for k in r if k.startswith(prefix)})
    return {k[len(prefix):]: curve(run, k, split) for k in keys}


def splits_of(run: Run) -> list[str]:
    """The splits in a run's metrics, ``train`` first."""
    return sorted({r.get("split", "train") for r in run.metrics}, key=lambda s: (s != "train", s))


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


# --- runs grouped by experiment arm ---------------------------------------------------------------------


def input_kind(run: Run) -> str:
    """What the model reads: the image serializer (``png``, ``jpeg``, ``pixels``, ``pixels_patch``) of a qa
    serializer (``+<policy>`` appended when its loss policy is not the paper's answer-only, e.g.
    ``png+all``), ``cnn_lstm`` for the baseline, else the serializer's name (``utf8`` for PG19)."""
    model = str(run.get("model.name", ""))
    if "cnn_lstm" in model:
        return "cnn_lstm"
    ser = str(run.get("serializer.name", ""))
    if ser == "qa":
        img = str(run.get("serializer.image.name", "png"))
        if img == "pixels" and run.get("serializer.image.order") == "patch":
            img = "pixels_patch"
        loss = run.get("serializer.loss", "answer")
        return img if loss in (None, "answer") else f"{img}+{loss}"
    return ser or "?"


def init_kind(run: Run) -> str:
    """``scratch``, or the stem of the run ``train.init_from`` names (e.g. ``pg19`` for ``runs/pg19_lm``)."""
    src = str(run.get("train.init_from", "") or "")
    if not src:
        return "scratch"
    name = Path(src.rstrip("/")).name
    if name.startswith("step_") or name in ("latest", "best"):
        name = Path(src.rstrip("/")).parent.parent.name
    return "pg19" if "pg19" in name.lower() else name


def arm(run: Run) -> str:
    """The experiment arm a run belongs to: ``<input kind>/<init kind>`` (seeds pooled)."""
    return f"{input_kind(run)}/{init_kind(run)}"


def group_runs(runs: Iterable[Run], key: Callable[[Run], str] = arm) -> dict[str, list[Run]]:
    """Runs by ``key`` (default :func:`arm`), each group sorted by seed; groups in first-seen order."""
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return {k: sorted(v, key=lambda r: (r.seed, r.name)) for k, v in out.items()}


def transfer_table(runs: Iterable[Run], *, key: str = "loss", split: str = "val", window: int = 1,
                   pretrained: str = "pg19", paired: bool = True) -> list[dict[str, Any]]:
    """Does pretraining reduce the steps to the scratch model's final loss? One row per input kind.

    Target: the scratch arm's final (``window``-smoothed) ``split`` ``key``; with ``paired`` each seed's own
    scratch run gives the target for the pretrained run of the same seed (else the scratch mean is the
    target for all). Per run: the first step its smoothed curve reaches the target (interpolated; None if
    never). Row: ``kind, target, scratch_steps, pretrained_steps`` (aggregates), ``reached`` (pretrained
    runs that got there / all), ``speedup`` (aggregate over seeds of scratch steps / pretrained steps),
    ``reduction`` (1 - pretrained mean / scratch mean), final losses of both arms.
    """
    groups = group_runs(runs)
    rows = []
    kinds = sorted({k.split("/", 1)[0] for k in groups})
    for kind in kinds:
        scratch, pre = groups.get(f"{kind}/scratch", []), groups.get(f"{kind}/{pretrained}", [])
        if not scratch or not pre:
            continue
        finals = {r.seed: final_value(r, key, split, window=window) for r in scratch}
        mean_target = aggregate(finals.values())["mean"]

        targets = {r.seed: (finals.get(r.seed) if paired else None) for r in [*scratch, *pre]}
        targets = {sd: mean_target if t is None else t for sd, t in targets.items()}
        s_steps = {r.seed: steps_to_target(*curve(r, key, split), targets[r.seed], window=window) for r in scratch}
        p_steps = {r.seed: steps_to_target(*curve(r, key, split), targets[r.seed], window=window) for r in pre}
        ratios = [s_steps[sd] / p for sd, p in p_steps.items()
                  if p and s_steps.get(sd) is not None]
        sa, pa = aggregate(s_steps.values()), aggregate(p_steps.values())
        rows.append({
            "kind": kind, "metric": f"{split}/{key}", "target": aggregate(finals.values()),
            "scratch_steps": sa, "pretrained_steps": pa,
            "reached": f"{sum(v is not None for v in p_steps.values())}/{len(p_steps)}",
            "speedup": aggregate(ratios),
            "reduction": 1.0 - pa["mean"] / sa["mean"] if sa["n"] and pa["n"] and sa["mean"] else float("nan"),
            "scratch_final": aggregate(finals.values()),
            "pretrained_final": aggregate(final_value(r, key, split, window=window) for r in pre),
            "seeds": sorted({r.seed for r in scratch} | {r.seed for r in pre}),
        })
    return rows


# --- VQA accuracy -------------------------------------------------------------------------------------------


def vqa_accuracy(run: Run, split: str | None = None, mode: str | None = None) -> dict[str, Any] | None:
    """``{"split", "mode", "accuracy", "by_qtype": {qtype: accuracy}, "num_samples"}`` from the run's VQA
    results (``eval/vqa_<split>.json``, or the ``task`` part of ``eval/<split>_<step>.json``, latest step);
    ``mode`` picks generate/rank/classify (default: the file's main mode). None when there are none."""
    cands: list[tuple[int, dict]] = []
    for stem, d in run.evals.items():
        res = None
        if stem.startswith("vqa_") and "accuracy" in d:
            res = d
        elif isinstance(d.get("task"), dict) and "accuracy" in d["task"]:
            res = d["task"]
        if res is None or (split and res.get("split", split) != split):
            continue
        cands.append((int(d.get("step", res.get("step", _step_of(Path(stem))))), res))
    if not cands:
        return None
    res = max(cands, key=lambda c: c[0])[1]
    m = mode or res.get("main_mode") or (res.get("modes") or ["?"])[0]
    by = res.get(f"by_qtype_{m}")
    if by is None and isinstance(res.get("details"), dict) and m in res["details"]:
        by = {k: v["accuracy"] for k, v in res["details"][m].get("by_qtype", {}).items()}
    acc = res.get(f"accuracy_{m}", res.get("accuracy"))
    return {"split": res.get("split"), "mode": m, "accuracy": acc, "by_qtype": dict(by or {}),
            "num_samples": res.get("num_samples")}


def accuracy_table(runs: Iterable[Run], split: str | None = None) -> list[dict[str, Any]]:
    """Per arm: overall accuracy and accuracy per question type, aggregated over seeds."""
    rows = []
    for name, group in group_runs(runs).items():
        accs = [a for a in (vqa_accuracy(r, split) for r in group) if a is not None]
        if not accs:
            continue
        qtypes = sorted({q for a in accs for q in a["by_qtype"]})
        rows.append({"arm": name, "mode": accs[0]["mode"], "accuracy": aggregate(a["accuracy"] for a in accs),
                     "by_qtype": {q: aggregate(a["by_qtype"].get(q) for a in accs) for q in qtypes}})
    return rows


# --- per-token losses and image loss maps ------------------------------------------------------------------


def per_token_losses(run_or_path: Run | str | os.PathLike, which: int = -1, max_rows: int = 0
                     ) -> list[dict[str, Any]]:
    """Rows of a per-token h5 file (a run's ``which``-th by step, default the latest, or a path): each
    ``{"id", "tokens", "nll", "loss_mask", "modality"}`` cropped to its length (nll in nats)."""
    import h5py

    if isinstance(run_or_path, Run):
        if not run_or_path.per_token_files:
            raise FileNotFoundError(f"{run_or_path.path}: no eval/*.h5 per-token files (run `omnibyte eval`)")
        path = run_or_path.per_token_files[which]
    else:
        path = Path(run_or_path)
    rows = []
    with h5py.File(path, "r") as f:
        n = f["tokens"].shape[0] if not max_rows else min(max_rows, f["tokens"].shape[0])
        lengths = f["lengths"][:n]
        ids = f["ids"][:n] if "ids" in f else [str(i) for i in range(n)]
        toks, nll, mask, mod = (f[k][:n] for k in ("tokens", "nll", "loss_mask", "modality"))
    for i in range(n):
        k = int(lengths[i])
        rid = ids[i].decode() if isinstance(ids[i], bytes) else str(ids[i])
        rows.append({"id": rid, "tokens": toks[i, :k], "nll": nll[i, :k], "loss_mask": mask[i, :k],
                     "modality": mod[i, :k]})
    return rows


def modality_bpb(rows: Iterable[dict[str, Any]], weighted: bool = False) -> dict[str, float]:
    """Bits per byte per modality over per-token rows: every token (``weighted=False``: what the model
    predicts even where the training loss ignored it) or loss-weighted ones."""
    sums: dict[int, list[float]] = {}
    for r in rows:
        w = r["loss_mask"] if weighted else np.ones_like(r["nll"])
        for m in np.unique(r["modality"]).tolist():
            sel = r["modality"] == m
            acc = sums.setdefault(int(m), [0.0, 0.0])
            acc[0] += float((r["nll"][sel] * w[sel]).sum())
            acc[1] += float(w[sel].sum())
    out = {}
    for m, (n, w) in sorted(sums.items()):
        if w > 0:
            try:
                name = Modality(m).name.lower()
            except ValueError:
                name = str(m)
            out[name] = n / w / math.log(2)
    return out


def answer_loss_split(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Where the answer loss sits: nats of the first answer byte (choosing the answer), of the other answer
    bytes (spelling it out) and of the token closing it (EOS), each aggregated over rows."""
    first, rest, close = [], [], []
    for r in rows:
        idx = np.flatnonzero(np.asarray(r["modality"]) == int(Modality.ANSWER))
        if idx.size == 0:
            continue
        nll = np.asarray(r["nll"], dtype=np.float64)
        first.append(nll[idx[0]])
        rest.extend(nll[idx[1:]].tolist())
        if idx[-1] + 1 < nll.size:
            close.append(nll[idx[-1] + 1])
    return {"first_byte": aggregate(first), "other_bytes": aggregate(rest), "eos": aggregate(close)}


def image_segment(row: dict[str, Any], modality: int = int(Modality.IMAGE)) -> np.ndarray:
    """Per-byte nll (nats) of the first contiguous run of ``modality`` tokens in a per-token row."""
    sel = np.flatnonzero(np.asarray(row["modality"]) == modality)
    if sel.size == 0:
        return np.zeros(0, dtype=np.float32)
    breaks = np.flatnonzero(np.diff(sel) != 1)
    end = sel[breaks[0]] + 1 if breaks.size else sel[-1] + 1
    return np.asarray(row["nll"][sel[0]:end], dtype=np.float32)


def image_loss_map(row: dict[str, Any] | np.ndarray, image_config: dict[str, Any] | None = None, *,
                   strip_width: int = 64, reduce_channels: str = "mean") -> np.ndarray:
    """A 2-D map of per-byte loss (nats) over an image's byte stream.

    ``row``: a per-token row (its image segment is taken) or the segment's 1-D nll array.
    ``image_config``: the image serializer's config (``run.get("serializer.image")``, or a whole run
    config dict). For ``pixels`` the map is the image itself, ``(H, W)`` with channels reduced
    (``mean``/``max``/``none`` -> ``(H, W, C)``), patch-scan order undone and any header dropped. For PNG,
    JPEG or anything else it is the stream as a strip of ``strip_width`` columns (NaN-padded last row):
    position in the file, not in the picture."""
    seg = image_segment(row) if isinstance(row, dict) else np.asarray(row, dtype=np.float32)
    cfg = dict(image_config or {})
    if "serializer" in cfg:  # a whole run config
        ser = cfg["serializer"] or {}
        cfg = dict(ser.get("image") or ser)
    if cfg.get("name") == "pixels" and cfg.get("size"):
        W, H = (int(x) for x in cfg["size"])
        C = 1 if cfg.get("mode") == "L" else 3
        body = seg[5:] if cfg.get("header") else seg
        if cfg.get("order") == "patch":
            p = int(cfg.get("patch", 8))
            Hp, Wp = -(-H // p) * p, -(-W // p) * p
            if body.size >= Hp * Wp * C:
                tiles = body[:Hp * Wp * C].reshape(Hp // p, Wp // p, p, p, C)
                img = tiles.transpose(0, 2, 1, 3, 4).reshape(Hp, Wp, C)[:H, :W]
                return _reduce(img, reduce_channels)
        elif body.size >= H * W * C:
            return _reduce(body[:H * W * C].reshape(H, W, C), reduce_channels)
    n = seg.size
    rows = max(1, -(-n // strip_width))
    out = np.full(rows * strip_width, np.nan, dtype=np.float32)
    out[:n] = seg
    return out.reshape(rows, strip_width)


def _reduce(img: np.ndarray, how: str) -> np.ndarray:
    if how == "mean":
        return img.mean(axis=-1)
    if how == "max":
        return img.max(axis=-1)
    if how == "none":
        return img
    raise ValueError(f"reduce_channels must be mean|max|none, got {how!r}")


# --- formatting --------------------------------------------------------------------------------------------


def fmt(agg: dict[str, float] | float | None, digits: int = 3, err: str = "stderr") -> str:
    """``"mean ± err (n)"`` of an :func:`aggregate` dict (or a plain number); ``"-"`` for nothing."""
    if agg is None:
        return "-"
    if not isinstance(agg, dict):
        return "-" if not math.isfinite(float(agg)) else f"{float(agg):.{digits}g}"
    if not agg.get("n"):
        return "-"
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


__all__ = [
    "Run", "load_run", "load_runs", "find_run_dirs", "metrics_table", "curve", "modality_curves", "splits_of",
    "smooth", "steps_to_target", "final_value", "aggregate", "aggregate_curves", "input_kind", "init_kind",
    "arm", "group_runs", "transfer_table", "vqa_accuracy", "accuracy_table", "per_token_losses", "modality_bpb", "answer_loss_split",
    "image_segment", "image_loss_map", "fmt", "markdown_table",
]
