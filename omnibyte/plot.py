"""``omnibyte plot``: loss and bits-per-byte curves of a run (from ``metrics.jsonl``) as one PNG.

Left: loss (nats per weighted token), train and eval. Right: bits per byte, overall (solid) and per
modality (dashed, one colour each), train and eval (eval with markers).
"""

from __future__ import annotations

import os
from pathlib import Path

from .logging import read_metrics, series


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl records to plot")
    splits = sorted({series(r) for r in records}, key=lambda s: (s != "train", s))
    by_split = {s: [r for r in records if series(r) == s] for s in splits}
    modality_keys = sorted({k for r in records for k in r if k.startswith("bpb/")})

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for s in splits:
        style = {"marker": "o", "markersize": 3} if s != "train" else {}
        ax_loss.plot(*_series(by_split[s], "loss"), label=s, **style)
        ax_bpb.plot(*_series(by_split[s], "bpb"), label=f"{s}", color="black",
                    **style)
        for i, k in enumerate(modality_keys):
            xs, ys = _series(by_split[s], k)
            if xs:
                ax_bpb.plot(xs, ys, linestyle="--", color=colours[i % len(colours)],
                            label=f"{s} {k.split('/', 1)[1]}", **style)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=f"{run_dir.name}: loss")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title=f"{run_dir.name}: bits per byte")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
