"""omnibyte eval <run-dir> [split] [key=value ...]"""

from __future__ import annotations

HELP = "score a trained run: bits per byte (overall, per modality), per-token losses (h5), task metrics"


def add_arguments(p) -> None:
    p.add_argument("run_dir")
    p.add_argument("split", nargs="?", default=None, help="default: the run's eval.split")
    p.add_argument("overrides", nargs="*", help="e.g. eval.max_samples=0 eval.checkpoint=best")
    p.add_argument("--device", default="auto")


def run(args) -> int:
    import json
    import logging
    from pathlib import Path

    from omnibyte.data import eval_batches
    from omnibyte.evaluate import BatchLoss, evaluate_bpb, load_trained, use_bf16_for, write_per_token
    from omnibyte.logging import setup_console_logging

    setup_console_logging(logging.INFO)
    overrides = list(args.overrides)
    split = args.split
    if split is not None and "=" in split:  # `omnibyte eval run a.b=c`: no split given
        overrides.insert(0, split)
        split = None
    cfg, task, serializer, model, ckpt, step = load_trained(args.run_dir, overrides, device=args.device)
    split = split or cfg.eval.split
    device = next(model.parameters()).device
    bf16 = use_bf16_for(cfg, device)
    batches = eval_batches(cfg.data, task, serializer, split, max_samples=cfg.eval.max_samples,
                           batch_size=cfg.eval.batch_size, pad_multiple=getattr(model.stream_meta, "patch_product", 1)
                           if hasattr(model, "stream_meta") else 1)
    results = {"run": str(args.run_dir), "checkpoint": str(ckpt), "step": step, "split": split,
               **evaluate_bpb(BatchLoss(model), batches, device, bf16=bf16)}
    out_dir = Path(args.run_dir) / "eval"
    out_dir.mkdir(exist_ok=True)
    if cfg.eval.per_token and not hasattr(model, "compute_batch_loss"):
        h5 = write_per_token(out_dir / f"{split}_{step}.h5", model, batches, device, split=split, step=step, bf16=bf16)
        results["per_token"] = str(h5)
    if cfg.eval.task_metrics:
        extra = task.evaluate(model, serializer, split, Path(args.run_dir), max_samples=cfg.eval.max_samples,
                              device=device, step=step)
        if extra:
            results["task"] = extra
    path = out_dir / f"{split}_{step}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))
    return 0
