"""Exporting a trained run's weights as one safetensors file, from any checkpoint: unsharded, or the ``dcp/``
shards of a DDP / FSDP2 run (read in this one process; nothing needs the GPUs that wrote them)."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt_io


def export_weights(run_dir: str | Path, checkpoint: str | int | None = None, out: str | Path | None = None
                   ) -> tuple[Path, int]:
    """Write the weights of ``run_dir``'s checkpoint (``best`` | ``latest`` | a step; default: the run's best,
    else latest) to ``out`` (default ``<run_dir>/export/step_<N>.safetensors``); returns (path, step). A
    Multimodal Pathway run is exported merged (``W + lambda W'``, as it computes, as ``omnibyte merge`` writes):
    the file holds the base architecture's keys and loads strictly into it."""
    import logging

    from .pathway import is_pathway_state, merge_state_dict
    from .run import find_checkpoint

    ckpt, _ = find_checkpoint(run_dir, checkpoint)
    step = int(ckpt_io.read_state(ckpt)["step"])
    out = Path(out) if out is not None else Path(run_dir) / "export" / f"step_{step:06d}.safetensors"
    weights = ckpt_io.load_weights(ckpt)
    if is_pathway_state(weights):
        weights, layers = merge_state_dict(weights, str(ckpt))
        logging.getLogger("omnibyte.export").info("%s: a pathway run: %d layers exported merged (W + lambda W')",
                                                  ckpt, len(layers))
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_io.save_weights(out, weights, step)
    return out, step
