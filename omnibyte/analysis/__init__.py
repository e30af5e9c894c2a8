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
    A.arm_colours(groups)                                  # a distinct colour per arm (matplotlib)
    fig, axes, images = A.image_loss_maps({n: rs[0] for n, rs in groups.items()})  # one shared colour scale

A run directory (see :mod:`omnibyte.train`) holds ``config.resolved.yaml``, ``metrics.jsonl`` (one JSON
record a line: ``step``, ``split``, ``loss``, ``bpb``, ``bpb/<modality>``, ...), ``eval/<split>_<step>.json``
(``omnibyte eval``), ``eval/vqa_<split>.json`` (VQA accuracy by question type) and
``eval/<split>_<step>.h5`` (per-token losses). Anything missing loads as empty.
"""

from __future__ import annotations

from .plotting import arm_colours, image_loss_maps
from .runs import (
    Curve,
    Run,
    aggregate,
    aggregate_curves,
    censored_aggregate,
    curve,
    final_value,
    find_run_dirs,
    fmt,
    load_run,
    load_runs,
    markdown_table,
    metrics_table,
    modality_curves,
    smooth,
    splits_of,
    steps_to_target,
)
from .token_losses import (
    answer_loss_split,
    image_loss_map,
    image_segment,
    modality_bpb,
    per_token_file,
    per_token_losses,
    per_token_steps,
)
from .transfer import (
    SEED_KEYS,
    accuracy_table,
    arm,
    binomial_accuracy,
    check_seeds_of_one_arm,
    group_runs,
    init_kind,
    input_kind,
    mean_stderr,
    paired_difference,
    paired_records,
    transfer_table,
    vqa_accuracy,
    vqa_predictions,
)

__all__ = [
    "Curve", "Run", "load_run", "load_runs", "find_run_dirs", "metrics_table", "curve", "modality_curves", "splits_of",
    "smooth", "steps_to_target", "final_value", "aggregate", "aggregate_curves", "censored_aggregate", "input_kind", "init_kind",
    "arm", "group_runs", "check_seeds_of_one_arm", "SEED_KEYS", "mean_stderr", "transfer_table", "vqa_accuracy", "accuracy_table", "vqa_predictions", "binomial_accuracy",
    "paired_difference", "paired_records", "per_token_file", "per_token_losses", "per_token_steps", "modality_bpb", "answer_loss_split",
    "image_segment", "image_loss_map", "fmt", "markdown_table", "arm_colours", "image_loss_maps",
]
