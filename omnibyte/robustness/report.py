"""The robustness result as people read it: a table (``omnibyte robustness`` prints it), the paired accuracy
changes per question type of a VQA run, and a bar plot (``--plot``). The result itself comes from
:func:`~omnibyte.robustness.evaluate.run_robustness`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .evaluate import _finite, headline, untrained_image_bytes


def paired_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Accuracy change from clean per question type, with its paired standard error, for VQA rows."""
    paired = [r for r in rows[1:] if r.get("paired")]
    if not paired:
        return []
    types = ["all", *sorted({k for r in paired for k in r["paired"] if k != "all"})]
    width = max(12, *(len(r["corruption"]) for r in paired))
    head = f"{'change':<{width}}" + "".join(f" {t:>18}" for t in types)
    lines = ["accuracy change from clean, question by question (paired stderr):", head, "-" * len(head)]
    for r in paired:
        cells = []
        for t in types:
            d = r["paired"].get(t)
            cells.append("-" if d is None else f"{d['mean']:+.3f} ({d['stderr']:.3f})")
        lines.append(f"{r['corruption']:<{width}}" + "".join(f" {c:>18}" for c in cells))
    n = {t: r["paired"][t]["n"] for r in paired[:1] for t in types if t in r["paired"]}
    lines.append("questions: " + ", ".join(f"{t} {k}" for t, k in n.items()))
    return lines


UNTRAINED_NOTE = ("image_bpb left out: this run's loss gives image bytes no weight (e.g. serializer.loss=answer), "
                  "so they measure predictions it was never trained to make (the JSON keeps them)")


def _fmt(x, delta: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:+.4g}" if delta else f"{x:.4g}"
    return f"{x:+.4f}" if delta else f"{x:.4f}"


def table_lines(result: dict[str, Any]) -> list[str]:
    """A readable table: each headline metric and its change from clean."""
    rows = result["rows"]
    keys = headline(rows)
    width = max(12, *(len(r["corruption"]) for r in rows))
    head = f"{'corruption':<{width}}" + "".join(f" {k:>12} {'change':>10}" for k in keys)
    lines = [f"{result['run']} step {result['step']}, split {result['split']}, seed {result['seed']}"
             f"{', ' + str(result['max_samples']) + ' samples' if result['max_samples'] else ''}", head,
             "-" * len(head)]
    for r in rows:
        lines.append(f"{r['corruption']:<{width}}" + "".join(
            f" {_fmt(r.get(k)):>12} {'' if r['corruption'] == 'clean' else _fmt(r.get('delta_' + k), True):>10}"
            for k in keys))
    if "word_ppl" in keys:
        lines.append(f"normalisers: text_bpb: nats / the corrupted text's bytes (each row its own); clean_byte_bpb: "
                     f"nats / {rows[0]['clean_bytes']} bytes of the clean text and word_ppl: exp(nats / "
                     f"{rows[0]['clean_words']} words of the clean text), the same in every row: a corruption that "
                     f"removes text (drop) lowers both by scoring fewer bytes, which is not robustness")
    if "image_bpb" in keys:
        lines.append("image_bpb: over all image bytes of the eval rows, whatever their loss weight")
    elif untrained_image_bytes(rows):
        lines.append(UNTRAINED_NOTE)
    lines += [f"WARNING {r['corruption']}: {r['warning']}" for r in rows if r.get("warning")]
    if paired := paired_lines(rows):
        lines += ["", *paired]
    return lines


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Bars of each headline metric per corruption, a dashed line at clean (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    keys = headline(rows)
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(6.0, 0.45 * len(rows) + 2), 2.6 * len(keys)),
                             squeeze=False)
    labels = [r["corruption"] for r in rows]
    for ax, k in zip(axes[:, 0], keys):
        vals = [r.get(k) if _finite(r.get(k)) else float("nan") for r in rows]
        ax.bar(range(len(rows)), vals, color=["0.55"] + ["C0"] * (len(rows) - 1))
        ax.axhline(vals[0], color="k", ls="--", lw=0.8)
        ax.set_ylabel(k)
        if k == "word_ppl" and all(v > 0 for v in vals if math.isfinite(v)):
            ax.set_yscale("log")  # perplexities of corrupted text span orders of magnitude
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    axes[0, 0].set_title(f"{Path(result['run']).name}: robustness on {result['split']} (step {result['step']})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
