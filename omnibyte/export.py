"""Exporting a trained run's weights as one safetensors file, from any checkpoint: unsharded, or the ``dcp/``
shards of a DDP / FSDP2 run (read in this one process; nothing needs the GPUs that wrote them)."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt_io


def export_weights(run_dir: str | Path, checkpoint: str | int | None = None, out: str | Path | None = None
                   ) -> tuple[Path, int]:
    """Write the weights of ``run_dir``'s checkpoint (``best`` | ``latest`` | a step; default: the run's best,
    else latest) to ``out`` (default ``<run_dir>/export/step_<N>.safetensors``); returns (path, step)."""
    from .run import find_checkpoint

    ckpt, _ = find_checkpoint(run_dir, checkpoint)
    step = int(ckpt_io.read_state(ckpt)["step"])
    out = Path(out) if out is not None else Path(run_dir) / "export" / f"step_{step:06d}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_io.save_weights(out, ckpt_io.load_weights(ckpt), step)
    return out, step
