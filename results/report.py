#!/usr/bin/env python3
"""Tables and figures of docs/results.md from the experiment's run directories.

    python results/report.py [RUNS] [--figures docs/images] [--no-figures]

RUNS (default results/transfer): run directories as unpacked from run_transfer.py's
transfer_metrics.tar.gz. Prints markdown tables (steps to target, accuracy, final losses, pretraining);
executes notebooks/cross_modal_transfer.ipynb with OMNIBYTE_RUNS=RUNS and OMNIBYTE_FIGURES=--figures,
so the figures in the docs are the notebook's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def report_arm(run) -> str:
    """The run's arm; a run directory suffixed ``_call<N>`` is the same seed re-made in a later device call
    (results/transfer/pg19_lm_call2): its own row, never pooled as another seed."""
    import re

    from omnibyte import analysis as A

    return A.arm(run) + (" (re-run)" if re.search(r"_call\d+$", run.name) else "")


def tables(runs_dir: str, smooth: int = 1) -> str:
    from omnibyte import analysis as A

    runs = A.load_runs(runs_dir)
    out = []
    # one table per way of starting other than scratch: pg19 (init_from), pathway-pg19, mom, mom+pg19, ...
    starts = sorted({A.init_kind(r) for r in runs} - {"scratch"}, key=lambda k: (k != "pg19", k))
    for start in starts:
        rows = A.transfer_table(runs, key="loss", split="val", window=smooth, pretrained=start)
        if not rows:
            continue
        out.append(f"\n### Steps to the scratch model's final val loss (answer bytes): {start} against scratch\n")
        out.append(A.markdown_table(rows, ["kind", "target", "scratch_steps", "pretrained_steps", "reached",
                                           "speedup", "reduction", "reduction_bound", "scratch_final",
                                           "pretrained_final"]))
        out.append("\nA run that never reaches the target counts at its last step (censored): a column with "
                   "censored runs is a bound (>= / <=), over every run, never over those that got there only.\n")
    acc = A.accuracy_table(runs, split="val")
    qtypes = sorted({q for r in acc for q in r["by_qtype"]})
    flat = [{"arm": r["arm"], "mode": r["mode"], "overall": r["accuracy"], **r["by_qtype"]} for r in acc]
    out.append("\n### VQA accuracy on val (mean ± stderr over seeds)\n")
    out.append(A.markdown_table(flat, ["arm", "mode", "overall", *qtypes]))
    prior_file = Path(runs_dir) / "prior.json"
    if prior_file.is_file():
        import json

        pr = json.loads(prior_file.read_text())
        # a prior.json without val_subset took the FIRST num_val questions: where that is fewer than the split,
        # not the questions the arms were scored on (spread over the split); said, not passed off as the same
        where = (f"the same {pr['num_val']} val questions" if "val_subset" in pr else
                 f"the first {pr['num_val']} val questions (an older prior.json: if that is fewer than the split, "
                 f"not the questions the arms were scored on; the per-seed tables' prior is theirs)")
        out.append(f"\nAnswer priors on {where} (most frequent train answer): overall "
                   f"{pr['majority_by_overall']:.3f}, per question type {pr['majority_by_qtype']:.3f}, per question "
                   f"family {pr['majority_by_family']:.3f}; "
                   + ("the per-family prior per type: " if "majority_by_family_per_qtype" in pr else
                      "the per-type prior per type (this prior.json has no per-family split): ")
                   + ", ".join(f"{k} {v:.3f}" for k, v in (pr.get("majority_by_family_per_qtype")
                                                           or pr["majority_by_qtype_per_qtype"]).items()))
    split_rows = []
    for arm, rs in A.group_runs(runs, report_arm, check=True).items():
        # one file per run: the val split's at the step whose accuracy is reported (pooling every eval/*.h5
        # counted a question once per evaluated checkpoint)
        rows = [row for r in rs for row in _val_rows(r)]
        if rows:
            split_rows.append({"arm": arm, "rows": len(rows), **A.answer_loss_split(rows)})
    if split_rows:
        out.append("\n### Answer loss split: first answer byte / other answer bytes / EOS (nats, per-token eval rows)\n")
        out.append(A.markdown_table(split_rows))
    finals = []
    for arm, rs in A.group_runs(runs, report_arm, check=True).items():
        finals.append({"arm": arm, "seeds": len(rs),
                       "val loss": A.aggregate(A.final_value(r, "loss", "val") for r in rs),
                       "val bpb": A.aggregate(A.final_value(r, "bpb", "val") for r in rs),
                       "train bpb (last log)": A.aggregate(A.final_value(r, "bpb", "train") for r in rs),
                       "bytes/s (last log)": A.aggregate(A.final_value(r, "bytes_per_s", "train") for r in rs)})
    out.append("\n### Final losses per arm\n")
    out.append(A.markdown_table(finals))
    return "\n".join(out) + "\n"


def _val_rows(run) -> list[dict]:
    """The run's per-token rows of the val split at the step whose VQA accuracy the report shows (its latest
    per-token file when it has no accuracy); none without a val per-token file; a file of another step only is
    refused (per_token_file names the steps)."""
    from omnibyte import analysis as A

    if not A.per_token_steps(run, "val"):
        return []
    acc = A.vqa_accuracy(run, "val")
    return A.per_token_losses(run, split="val", step=acc.get("step") if acc else None)


def _pm(x: dict | None, digits: int = 3) -> str:
    return "-" if not x else f"{x['mean']:.{digits}f} ± {x['stderr']:.{digits}f}"


def per_question_tables(runs_dir: str, smooth: int = 1) -> str:
    """One seed at a time: each arm's VQA accuracy with its binomial error, its difference from the same seed's
    scratch run on the same questions (paired error), and what it cost and learned: parameters trained, model
    FLOPs per step (``eval/cost.json``), steps to the scratch run's final val loss, the answer loss split over
    ``eval/answer_split_val.json``'s rows (first answer byte, where the answer is chosen, against the rest)."""
    import json

    from omnibyte import analysis as A

    runs = [r for r in A.load_runs(runs_dir) if A.vqa_predictions(r)]
    out = []
    for seed in sorted({r.seed for r in runs}):
        mine = [r for r in runs if r.seed == seed]
        groups = A.group_runs(mine, report_arm, check=True)  # one run per arm and seed, or a clear refusal
        for kind in sorted({a.split("/", 1)[0] for a in groups}):
            arms = {a: rs[0] for a, rs in sorted(groups.items(), key=lambda g: (not g[0].endswith("/scratch"), g[0]))
                    if a.split("/", 1)[0] == kind}  # scratch first: the others are read against it
            scratch = arms.get(f"{kind}/scratch")
            accs = {name: A.binomial_accuracy(r) for name, r in arms.items()}  # each predictions file read once
            qtypes = sorted({q for acc in accs.values() for q in acc} - {"all"})
            acc_rows, cost_rows = [], []
            for name, r in arms.items():
                acc = accs[name]
                row = {"arm": name, "all": _pm(acc.get("all")), **{q: _pm(acc.get(q)) for q in qtypes}}
                if scratch is not None and r is not scratch:
                    d = A.paired_difference(r, scratch)
                    row.update({f"Δ {q}": _pm(d.get(q)) for q in ["all", *qtypes]})
                acc_rows.append(row)
                cost = json.loads((r.path / "eval" / "cost.json").read_text()) \
                    if (r.path / "eval" / "cost.json").is_file() else {}
                split = json.loads((r.path / "eval" / "answer_split_val.json").read_text()) \
                    if (r.path / "eval" / "answer_split_val.json").is_file() else {}
                steps = None
                if scratch is not None and r is not scratch:
                    target = A.final_value(scratch, "loss", "val", window=smooth)
                    steps = A.steps_to_target(*A.curve(r, "loss", "val"), target, window=smooth) if target else None
                cost_rows.append({
                    "arm": name, "params trained": f"{cost['params_trained'] / 1e6:.2f}M" if cost else "-",
                    "GFLOPs / step": f"{cost['flops_per_step'] / 1e9:.1f}" if cost.get("flops_per_step") else "-",
                    "steps to scratch's final val loss": "-" if r is scratch else
                    ("never" if steps is None else f"{steps:.0f}"),
                    "final val loss": A.final_value(r, "loss", "val"),
                    "first answer byte (nats)": _pm(split.get("first_byte")),
                    "other answer bytes (nats)": _pm(split.get("other_bytes")),
                    "rows": split.get("rows", "-")})
            out.append(f"\n### {kind}, seed {seed}: VQA accuracy on val (± binomial stderr; Δ: minus scratch on the "
                       f"same questions, ± paired stderr)\n")
            prior = next((d["task"]["prior"] for name, r in arms.items() for d in r.evals.values()
                          if isinstance(d.get("task"), dict) and isinstance(d["task"].get("prior"), dict)
                          and d["task"].get("num_samples") == accs[name]["all"]["n"]), None)
            if prior:  # what a model that ignores the image reaches on the same questions
                acc_rows.append({"arm": "answer prior (per family)", "all": f"{prior['accuracy']:.3f}",
                                 **{q: f"{v:.3f}" for q, v in prior.get("by_qtype", {}).items()}})
            cols = list(dict.fromkeys(k for row in acc_rows for k in row))  # scratch has no Δ columns
            out.append(A.markdown_table(acc_rows, cols))
            blind_rows = []
            for name, r in arms.items():
                f = r.path / "eval" / "blind_val.json"
                if f.is_file():
                    rows = {x["corruption"]: x for x in json.loads(f.read_text())["rows"]}
                    paired = rows.get("blank", {}).get("paired") or {}
                    blind_rows.append({"arm": name, "clean": f"{rows['clean']['accuracy']:.3f}",
                                       "blank image": f"{rows['blank']['accuracy']:.3f}",
                                       **{f"Δ {q}": _pm(paired.get(q)) for q in ["all", *qtypes]}})
            if blind_rows:
                out.append(f"\n### {kind}, seed {seed}: the blind control (every image blanked to its mean colour; Δ: "
                           f"blank minus clean on the same questions, ± paired stderr; near 0: the answers come from "
                           f"the question)\n")
                out.append(A.markdown_table(blind_rows))
            out.append(f"\n### {kind}, seed {seed}: cost and answer loss\n")
            out.append(A.markdown_table(cost_rows))
    return "\n".join(out) + "\n"


def figures(runs_dir: str, fig_dir: str) -> None:
    import nbclient
    import nbformat

    os.environ["OMNIBYTE_RUNS"] = str(Path(runs_dir).resolve())
    os.environ["OMNIBYTE_FIGURES"] = str(Path(fig_dir).resolve())
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    nb_path = REPO / "notebooks" / "cross_modal_transfer.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(nb_path.parent)}}).execute()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="?", default=str(REPO / "results" / "transfer"))
    p.add_argument("--figures", default=str(REPO / "docs" / "images"))
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--smooth", type=int, default=1)
    a = p.parse_args()
    print(tables(a.runs, a.smooth))
    print(per_question_tables(a.runs, a.smooth))
    if not a.no_figures:
        figures(a.runs, a.figures)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
