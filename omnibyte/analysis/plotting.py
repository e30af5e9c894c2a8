"""Colours and figures the transfer notebook shares: a distinct colour per experiment arm, and the image
loss maps of several arms on one colour scale with one colour bar.

matplotlib is imported inside the functions that draw, so ``omnibyte.analysis`` stays numpy-only to import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .token_losses import image_loss_map, per_token_losses

KINDS = ("png", "jpeg", "pixels", "pixels_patch")
# tab20c holds five hues of four shades each (dark -> light): blue, orange, green, purple, grey.
_HUE = {"png": 0, "jpeg": 1, "pixels": 2, "pixels_patch": 3, "cnn_lstm": 4}
_SHADE = {"pg19": 0, "scratch": 1}  # PG19-pretrained darkest, scratch next, other loss policies lighter


def _preferred(name: str) -> tuple[str, int]:
    """(colormap, index) an arm ``<kind>[+<policy>]/<init>`` would like: a hue per input kind, a shade per
    initialisation and loss policy."""
    kind, _, init = name.partition("/")
    base, _, policy = kind.partition("+")
    if base not in _HUE:
        return "tab20b", 0
    if base == "cnn_lstm":
        return "tab20c", 16
    shade = 2 if policy else _SHADE.get(init, 3)
    return "tab20c", 4 * _HUE[base] + shade


def arm_colours(arms: Iterable[str]) -> dict[str, tuple[float, float, float, float]]:
    """A distinct RGBA colour for every arm name (``png/scratch``, ``png+all/scratch``, ``cnn_lstm/scratch``,
    ...): a hue per input kind, PG19-pretrained dark, scratch lighter, an auxiliary loss policy (``+all``)
    lighter still, CNN+LSTM grey. An arm whose preferred colour is taken gets the next free one of
    tab20c/tab20b/tab20, so no two arms ever share a colour."""
    import matplotlib

    palette = [tuple(matplotlib.colormaps[m](i)) for m in ("tab20c", "tab20b", "tab20") for i in range(20)]
    out: dict[str, tuple[float, float, float, float]] = {}
    used: set[tuple[float, ...]] = set()
    for name in arms:
        if name in out:
            continue
        cmap, i = _preferred(name)
        colour = tuple(matplotlib.colormaps[cmap](i))
        if colour in used:
            colour = next((c for c in palette if c not in used), colour)
        out[name] = colour
        used.add(colour)
    return out


def image_loss_maps(arms: Mapping[str, Any], *, max_rows: int = 1, cmap: str = "magma",
                    kinds: Iterable[str] = KINDS, split: str = "val"):
    """Per-byte loss maps (nats) of the first eval stream of ``split`` (its latest per-token file) of one run per
    arm, in a grid: a column per input
    kind, a row per initialisation (``scratch``, ``pg19``) or loss policy (``all`` for ``png+all/...``).

    ``arms``: ``{arm name: Run}``; runs without per-token eval files are left out. Every map uses the same ``vmin``/``vmax``
    (0, or the smallest loss if negative, to the largest loss over all maps) and the figure has one colour bar, so rows and columns
    compare. Returns ``(fig, axes, images)``: ``axes`` a 2-D array, ``images`` ``{arm name: AxesImage}``."""
    import matplotlib.pyplot as plt

    maps: dict[str, tuple[np.ndarray, str]] = {}
    for name, run in arms.items():
        kind = name.split("/", 1)[0].split("+", 1)[0]
        if kind not in kinds or not getattr(run, "per_token_files", None):
            continue
        try:  # the val split's latest file (not whichever split was evaluated last)
            rows = per_token_losses(run, max_rows=max_rows, split=split)
        except FileNotFoundError:
            continue
        if rows:
            maps[name] = (image_loss_map(rows[0], run.config), str(rows[0].get("id", "")))
    if not maps:
        return None, np.empty((0, 0), dtype=object), {}

    def row_key(name: str) -> str:
        kind, init = name.split("/", 1)
        return kind.split("+", 1)[1] if "+" in kind else init

    found = {row_key(n) for n in maps}
    row_names = sorted(found, key=lambda x: (["scratch", "pg19"].index(x) if x in ("scratch", "pg19") else 2, x))
    col_names = [k for k in kinds if any(n.split("/")[0].split("+")[0] == k for n in maps)]
    finite = np.concatenate([m[np.isfinite(m)].ravel() for m, _ in maps.values()])
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0  # losses are >= 0: the scale starts at 0
    vmax = float(finite.max()) if finite.size else 1.0
    fig, axes = plt.subplots(len(row_names), len(col_names), squeeze=False, layout="constrained",
                             figsize=(3.6 * len(col_names) + 1.0, 2.4 * len(row_names)))
    for ax in axes.flat:
        ax.axis("off")
    images = {}
    for name, (m, sample) in maps.items():
        ax = axes[row_names.index(row_key(name)), col_names.index(name.split("/")[0].split("+")[0])]
        images[name] = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal", interpolation="nearest")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name} ({sample})" if sample else name, fontsize=8)
    fig.colorbar(next(iter(images.values())), ax=axes, shrink=0.8, label="nats per byte (shared scale)")
    return fig, axes, images
