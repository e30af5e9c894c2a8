"""Exporting a trained run's weights as one safetensors file, from any checkpoint: unsharded, or the ``dcp/``
shards of a DDP / FSDP2 run (read in this one process; nothing needs the GPUs that wrote them). The file's metadata
holds the run config (``config``, JSON) with the step, token contract, source run and checkpoint, so
:func:`load_export` rebuilds the model from the file alone."""

from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint as ckpt_io
from .config import ConfigError
from .runconfig import PATHWAY_DEFAULT


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
    state = ckpt_io.read_state(ckpt)
    step = int(state["step"])
    cfg = state.get("config")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{ckpt}/state.json holds no resolved config: an export without one could not be rebuilt")
    out = Path(out) if out is not None else Path(run_dir) / "export" / f"step_{step:06d}.safetensors"
    weights = ckpt_io.load_weights(ckpt)
    if is_pathway_state(weights):
        weights, layers = merge_state_dict(weights, str(ckpt))
        logging.getLogger("omnibyte.export").info("%s: a pathway run: %d layers exported merged (W + lambda W')",
                                                  ckpt, len(layers))
        train = {**cfg["train"], "pathway_from": "", "pathway_stages": [], "pathway_layers": list(PATHWAY_DEFAULT),
                 "pathway_train_aux": True}  # merged: the base architecture, as omnibyte merge records it
        cfg = {**cfg, "train": train}
    if out.exists():  # another export there is not replaced in silence (the same checkpoint's is: idempotent)
        try:
            from safetensors import safe_open

            with safe_open(str(out), "pt") as f:
                theirs = (f.metadata() or {}).get("checkpoint")
        except Exception:  # noqa: BLE001 - not an export: not ours to replace
            theirs = None
        if theirs != str(ckpt):
            raise ConfigError(f"--out {out} exists and holds {'the export of ' + theirs if theirs else 'another file'}"
                              f", not of {ckpt}: choose another --out, or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_io.save_weights(out, weights, step, extra={
        "config": json.dumps(cfg), "run": str(run_dir), "checkpoint": str(ckpt),
        "weights_sha256": str((state.get("files") or {}).get("model.safetensors", ""))})
    return out, step


def load_export(path: str | Path, device: str = "cpu"):
    """``(model, config)`` from an ``omnibyte export`` file alone: the model built from the run config in its
    metadata (a :class:`~omnibyte.runconfig.RunConfig`) and the weights loaded strictly. A file without a config
    (exported before it was recorded) or of another token contract is refused, naming it."""
    from safetensors import safe_open

    from . import vocab
    from .config import from_dict
    from .registry import MODELS
    from .runconfig import RunConfig

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if "config" not in meta:
        raise ConfigError(f"{path}: no run config in its metadata (exported before exports recorded it): rebuild "
                          f"the model from its run directory (load_run) or export it again")
    if meta.get("contract_version") != str(vocab.CONTRACT_VERSION):
        raise ConfigError(f"{path}: token contract {meta.get('contract_version')}, this omnibyte's is "
                          f"{vocab.CONTRACT_VERSION}")
    cfg = from_dict(RunConfig, json.loads(meta["config"]))
    model = MODELS.build(cfg.model)
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), cfg
