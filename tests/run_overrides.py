"""Config overrides the end-to-end tests share: a tiny MBLM and a few-step, CPU-only training run."""

# global stage: Mamba-2 (2 heads of 16 over the expanded width 32); local stage: Transformer
TINY_MBLM = [f"model.stages.{i}.{k}={v}" for i in (0, 1) for k, v in (("width", 16), ("layers", 1))] + [
    "model.stages.0.block.headdim=16",
    "model.stages.0.block.d_state=8",
    "model.stages.1.block.heads=2",
]


def quick(steps: int = 3) -> list[str]:
    """A run of ``steps`` steps with no evaluation, checkpoint, progress bar, report or data workers."""
    return [
        f"train.steps={steps}",
        "train.warmup=1",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "data.batch_size=4",
        "data.workers=0",
        "train.progress=false",
        "preset=full",
        "eval.report=false",
    ]


QUICK = quick()
