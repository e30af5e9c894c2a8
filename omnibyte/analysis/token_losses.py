"""Per-token losses from eval h5 files: per-modality bits per byte, answer-loss splits, image loss maps."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..vocab import Modality
from .runs import Run, aggregate

# --- per-token losses and image loss maps ------------------------------------------------------------------


def per_token_steps(run: Run, split: str) -> dict[int, Path]:
    """``{step: file}`` of the run's per-token files of ``split`` (``eval/<split>_<step>.h5``)."""
    import re

    return {int(m.group(1)): f for f in run.per_token_files
            if (m := re.fullmatch(rf"{re.escape(split)}_(\d+)", f.stem))}


def per_token_file(run: Run, split: str, step: int | None = None) -> Path:
    """The run's per-token file of ``split`` (``eval/<split>_<step>.h5``) at ``step``, default the latest step.
    One file: pooling a run's files counted each question once per evaluated checkpoint (and split)."""
    found = per_token_steps(run, split)
    if not found:
        raise FileNotFoundError(f"{run.path}: no per-token file of split {split!r} (eval/{split}_<step>.h5; it has "
                                f"{[f.name for f in run.per_token_files] or 'none'}); run `omnibyte eval`")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"{run.path}: no per-token file of split {split!r} at step {step} (steps: "
                                f"{sorted(found)})")
    return found[step]


def per_token_losses(run_or_path: Run | str | os.PathLike, which: int = -1, max_rows: int = 0, *,
                     split: str | None = None, step: int | None = None) -> list[dict[str, Any]]:
    """Rows of a per-token h5 file (a path; or a run's: with ``split``, :func:`per_token_file` of that split and
    ``step``, else its ``which``-th file by step, default the latest, of whatever split): each
    ``{"id", "tokens", "nll", "loss_mask", "modality"}`` cropped to its length (nll in nats)."""
    import h5py

    if isinstance(run_or_path, Run):
        if not run_or_path.per_token_files:
            raise FileNotFoundError(f"{run_or_path.path}: no eval/*.h5 per-token files (run `omnibyte eval`)")
        path = (per_token_file(run_or_path, split, step) if split is not None
                else run_or_path.per_token_files[which])
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
