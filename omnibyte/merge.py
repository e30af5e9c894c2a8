"""``omnibyte merge``: a Multimodal Pathway run (``train.pathway_from``) as an ordinary run of its base
architecture, each pathway layer's weights merged, ``W^ = W + lambda W'`` (:func:`omnibyte.pathway.merge_state_dict`).

The merged run directory holds ``config.resolved.yaml`` (the pathway run's config with the ``train.pathway_*`` keys
back at their defaults and a note in ``notes``), ``provenance.jsonl`` and one checkpoint at the source's step:
``model.safetensors`` with the merged weights and a ``state.json`` whose ``merged_from`` names the pathway run,
its checkpoint, step and weights sha256, and the pathway's own source. It evaluates and generates like any run;
it holds no optimizer or data position, so it cannot be resumed (``train.init_from`` starts a new run from it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import checkpoint as ckpt_io
from . import provenance
from .config import ConfigError, dump_yaml, from_dict, to_dict
from .pathway import is_pathway_state, merge_state_dict
from .runconfig import PATHWAY_DEFAULT, RESOLVED_NAME, RunConfig

log = logging.getLogger("omnibyte.merge")


def merge_run(run_dir: str | Path, checkpoint: str | int | None = None, out: str | Path | None = None
              ) -> tuple[Path, dict]:
    """Write the merged run of pathway run ``run_dir`` (``checkpoint``: best | latest | a step | a checkpoint
    folder; default the run's best, else latest) to ``out`` (default ``<run_dir>_merged``); returns (the new run
    directory, its ``merged_from`` record)."""
    from .registry import MODELS
    from .run import find_checkpoint

    run_dir = Path(run_dir)
    ckpt, which = find_checkpoint(run_dir, checkpoint)
    state = ckpt_io.read_state(ckpt)
    cfg_dict = state.get("config")
    if not isinstance(cfg_dict, dict):
        raise ConfigError(f"{ckpt}/state.json holds no resolved config; not an omnibyte checkpoint")
    weights = ckpt_io.load_weights(ckpt)
    if not (cfg_dict.get("train") or {}).get("pathway_from") or not is_pathway_state(weights):
        raise ConfigError(f"{ckpt}: not a Multimodal Pathway checkpoint (no train.pathway_from in its config or no "
                          f"pathway layers in its weights): nothing to merge")
    merged, layers = merge_state_dict(weights, str(ckpt))
    out = Path(out) if out is not None else run_dir.with_name(run_dir.name + "_merged")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose another directory (nothing is overwritten)")

    step = int(state["step"])
    source = {"run": str(run_dir), "checkpoint": str(ckpt), "which": which, "step": step,
              "weights_sha256": (state.get("files") or {}).get("model.safetensors"), "layers": len(layers),
              "pathway_from": (state.get("provenance") or {}).get("pathway_from")
              or cfg_dict["train"]["pathway_from"]}
    train = {**cfg_dict["train"], "pathway_from": "", "pathway_stages": [], "pathway_layers": list(PATHWAY_DEFAULT),
             "pathway_train_aux": True}
    note = (f"merged by `omnibyte merge` from pathway run {run_dir} ({which} checkpoint, step {step}; pathway from "
            f"{cfg_dict['train']['pathway_from']})")
    new = {**cfg_dict, "train": train, "run_name": out.name, "out_dir": str(out.parent),
           "notes": "\n".join(filter(None, [cfg_dict.get("notes", ""), note]))}
    cfg = from_dict(RunConfig, new)  # the record parses as a run config
    model = MODELS.build(cfg.model)  # and the merged weights are exactly its model's
    result = model.load_state_dict(merged, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"{ckpt}: merged weights do not fit the base model of its config (missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")

    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / RESOLVED_NAME)
    prov = {**provenance.collect(), "merged_from": source}
    provenance.append(out, prov)
    tmp = ckpt_io.begin_checkpoint(out / "checkpoints", step)
    ckpt_io.save_weights(tmp / "model.safetensors", model.state_dict(), step)
    ckpt_io.commit_checkpoint(out / "checkpoints", tmp, step, rng=[],
                              state={"config": to_dict(cfg), "provenance": prov, "merged_from": source})
    log.info("merged %d pathway layers of %s (step %d) into %s", len(layers), ckpt, step, out)
    return out, source


__all__ = ["merge_run"]
