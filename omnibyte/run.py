"""A run's lifecycle outside the training loop: build its components, load it trained, evaluate it.

* :func:`build_components` -- task, serializer and model from a :class:`~omnibyte.runconfig.RunConfig`
  (the model on CPU, fp32; every model is a :class:`~omnibyte.model.api.StreamModel`).
* :func:`resolve_data_config` -- fills the config fields that are derived from the data once, when a run is
  created (a closed-set task's answer vocabulary, from the training split of the run's own data source), so
  that training, its checkpoints and later evaluation agree. The resolved values go into
  ``config.resolved.yaml`` and every checkpoint.
* :func:`load_run` -- a trained run from a checkpoint's **own** resolved config (``state.json``), never from an
  editable file beside it: ``load_run("runs/x", checkpoint="best" | "latest" | step)``. Evaluation-time settings
  may be overridden (:data:`LOAD_MAY_CHANGE`); anything that defines the model or its data is refused. Opening a
  run directory imports no code: a run whose config names ``plugins:`` loads only with ``trust_plugins=True``
  or when those plugins' names are already registered.
* :func:`evaluate_run` -- bits per byte overall and per modality, per-token losses (h5) and task metrics
  (VQA accuracy, word perplexity), all on the split of the run's own ``data.source``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, read_state, resolve_checkpoint, verify_checkpoint
from .config import ConfigError, apply_overrides, from_dict
from .model.api import StreamModel
from .pathway import is_pathway_state
from .registry import MODELS, SERIALIZERS, TASKS
from .runconfig import RunConfig, open_plugins
from .vocab import Modality

log = logging.getLogger("omnibyte.run")

#: config keys (dotted prefixes) that ``load_run`` / ``omnibyte eval`` may override on a trained run
LOAD_MAY_CHANGE: tuple[str, ...] = ("eval.", "train.device", "train.precision", "train.progress", "data.path",
                                    "data.workers", "data.prefetch", "task.root", "task.cache_dir",
                                    "task.on_bad_sample", "task.eval_")


# ----------------------------------------------------------------------------------------------
# build


def build_components(cfg: RunConfig):
    """(task, serializer, model) of a run config; the model on CPU in fp32."""
    task = TASKS.build(cfg.task)
    serializer = SERIALIZERS.build(cfg.serializer)
    model = MODELS.build(cfg.model)
    if not isinstance(model, StreamModel):
        raise ConfigError(f"model.name={cfg.model.name!r}: {type(model).__qualname__} is not an "
                          f"omnibyte.model.api.StreamModel (registered models must implement the model contract)")
    return task, serializer, model


def _has_field(node: Any, name: str) -> bool:
    return dataclasses.is_dataclass(node) and any(f.name == name for f in dataclasses.fields(node))


def resolve_data_config(cfg: RunConfig, task=None) -> RunConfig:
    """``cfg`` with its data-derived fields filled (see the module docstring). A closed-set task declares an
    ``answers`` config field; empty means "the answers of the training split": the task's rule
    (``task.vocabulary_from(answers)``) is applied to the answers found in the run's training data (recorded in
    a prepared store, else read from the task's index). A model config with an empty ``answers`` field gets the
    same vocabulary (e.g. the CNN+LSTM's classifier head). ``data.pad_to: buckets`` with empty ``data.buckets``:
    the row lengths chosen from the training data (:mod:`omnibyte.data.buckets`)."""
    if cfg.data.pad_to == "buckets" and not cfg.data.buckets:
        from .data.buckets import resolve_buckets

        task = task or TASKS.build(cfg.task)
        multiple = MODELS.build(cfg.model).stream_meta.patch_product
        buckets = resolve_buckets(cfg.data, task, SERIALIZERS.build(cfg.serializer), multiple)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, buckets=tuple(buckets)))
        log.info("row-length buckets from the training data: %s", list(buckets))
    if not _has_field(cfg.task, "answers"):
        return cfg
    answers = tuple(cfg.task.answers)
    if not answers:
        task = task or TASKS.build(cfg.task)
        found = None
        if cfg.data.source != "task":
            from .data import recorded_answers

            found = recorded_answers(cfg.data, cfg.data.train_split)
        if found is None:
            found = task.answers_of(cfg.data.train_split)
        answers = tuple(task.vocabulary_from(found))
        if not answers:
            raise ConfigError(f"task.answers: the training split {cfg.data.train_split!r} has no answers to "
                              f"form a closed set from; set task.answers explicitly")
        log.info("answer vocabulary from the training split: %d answers", len(answers))
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, answers=answers))
    if _has_field(cfg.model, "answers") and not tuple(cfg.model.answers):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, answers=answers))
    return cfg


def inherit_derived(cfg: RunConfig, recorded: RunConfig) -> RunConfig:
    """``cfg`` with its still-empty data-derived fields taken from a run's ``recorded`` config (a re-run of the
    same YAML must match the record it resolved when the run was created)."""
    if cfg.data.pad_to == "buckets" and not cfg.data.buckets and recorded.data.pad_to == "buckets":
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, buckets=recorded.data.buckets))
    if _has_field(cfg.task, "answers") and not tuple(cfg.task.answers) and _has_field(recorded.task, "answers"):
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, answers=recorded.task.answers))
        if _has_field(cfg.model, "answers") and not tuple(cfg.model.answers) and _has_field(recorded.model, "answers"):
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, answers=recorded.model.answers))
    return cfg


# ----------------------------------------------------------------------------------------------
# load


@dataclass
class Run:
    """A trained run, loaded: its model (eval mode, on ``device``) and the config it was trained under."""

    run_dir: Path
    config: RunConfig
    task: Any
    serializer: Any
    model: StreamModel
    checkpoint: Path
    step: int
    which: str  # how the checkpoint was chosen: best | latest | step N | path
    state: dict

    @property
    def device(self):
        return self.model.device


def checkpoint_config(ckpt: Path, *, trust_plugins: bool = False, overrides: tuple[str, ...] | list[str] = ()
                      ) -> RunConfig:
    """The resolved config a checkpoint was written under (its ``state.json``), with evaluation-time
    ``overrides`` (only :data:`LOAD_MAY_CHANGE` keys)."""
    state = read_state(ckpt)
    data = state.get("config")
    if not isinstance(data, dict):
        raise ConfigError(f"{ckpt}/state.json holds no resolved config; not an omnibyte checkpoint")
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(LOAD_MAY_CHANGE)]
    if bad:
        raise ConfigError(f"cannot override {', '.join(o.split('=', 1)[0] for o in bad)} on a trained run (the "
                          f"model and its data are fixed by the checkpoint's own config); allowed: "
                          f"{', '.join(LOAD_MAY_CHANGE)}")
    data = apply_overrides(data, list(overrides))
    open_plugins(data.get("plugins") or (), ckpt, trust_plugins)
    return from_dict(RunConfig, data)


def find_checkpoint(run_dir: str | Path, which: str | int | None = None) -> tuple[Path, str]:
    """(checkpoint folder, how it was chosen). ``which``: ``None`` (the best by the validation metric when the
    run has one, else the latest), ``"best"``, ``"latest"``, a step number, or a checkpoint folder."""
    run_dir = Path(run_dir)
    if which is None or which == "auto":
        ckdir = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
        if (ckdir / "best.json").is_file():
            try:
                return resolve_checkpoint(run_dir, "best"), "best"
            except CheckpointError as e:
                log.warning("the best checkpoint is unusable (%s); using the latest intact one", e)
        return resolve_checkpoint(run_dir, "latest"), "latest"
    if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
        step = int(which)
        path = run_dir / "checkpoints" / f"step_{step:06d}"
        if not (path / "state.json").is_file():
            from .checkpoint import list_checkpoints

            have = [int(p.name[5:]) for p in list_checkpoints(run_dir / "checkpoints")]
            raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step} (checkpoints: {have or 'none'})")
        verify_checkpoint(path)
        return path, f"step {step}"
    if which in ("best", "latest"):
        if which == "best" and not (run_dir / "checkpoints" / "best.json").is_file() and \
                not (run_dir / "best.json").is_file():
            raise FileNotFoundError(f"{run_dir}: no best checkpoint (no evaluation selected one yet); "
                                    f"use --checkpoint latest or a step")
        return resolve_checkpoint(run_dir, which), which
    return resolve_checkpoint(which), "path"


def load_run(run_dir: str | Path, checkpoint: str | int | None = None, *, device: str = "auto",
             overrides: tuple[str, ...] | list[str] = (), trust_plugins: bool = False) -> Run:
    """Load a trained run (see the module docstring). ``checkpoint``: see :func:`find_checkpoint`."""
    from .checkpoint import load_weights
    from .parallel import pick_device

    wanted = _checkpoint_override(overrides)
    if checkpoint is None:  # an eval.checkpoint override, else the run's own default, read from its record
        from .config import load_yaml
        from .runconfig import RESOLVED_NAME

        rec = Path(run_dir) / RESOLVED_NAME
        checkpoint = wanted or ((load_yaml(rec).get("eval") or {}).get("checkpoint") if rec.is_file() else None) \
            or "auto"
    elif wanted is not None and wanted != "auto" and str(wanted) != str(checkpoint):
        raise ConfigError(f"--checkpoint {checkpoint} and the override eval.checkpoint={wanted} name different "
                          f"checkpoints; give one of them")
    ckpt, which = find_checkpoint(run_dir, checkpoint)
    cfg = checkpoint_config(ckpt, trust_plugins=trust_plugins, overrides=overrides)
    state = read_state(ckpt)
    task, serializer, model = build_components(cfg)
    weights = load_weights(ckpt)
    if cfg.train.pathway_from or is_pathway_state(weights):  # a pathway run loads merged: W + lambda W'
        weights = _merged_pathway(weights, cfg, ckpt)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"{ckpt}: weights do not fit the model of its own config (missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    model.to(pick_device(device if device != "auto" else cfg.train.device)).eval()
    return Run(Path(run_dir), cfg, task, serializer, model, ckpt, int(state["step"]), which, state)


def _checkpoint_override(overrides) -> str | None:
    """The value of the last ``eval.checkpoint=`` override (or ``eval={checkpoint: ...}``), else None. It picks the
    checkpoint, so it is read before the checkpoint's config is loaded (overrides apply to that config): applied
    only there, ``eval.checkpoint=latest`` scored the best checkpoint while the loaded config said latest."""
    from .config_files import parse_override

    found = None
    for text in overrides:
        key, value = parse_override(text)
        if key == ["eval", "checkpoint"]:
            found = value
        elif key == ["eval"] and isinstance(value, dict) and "checkpoint" in value:
            found = value["checkpoint"]
    return None if found is None else str(found)


def _merged_pathway(weights: dict, cfg: RunConfig, ckpt: Path) -> dict:
    """The weights of a Multimodal Pathway checkpoint merged into the base architecture (``W + lambda W'``, what
    the pathway layers compute); a config and weights that disagree about being a pathway run are refused."""
    from .pathway import merge_state_dict

    if not cfg.train.pathway_from or not is_pathway_state(weights):
        raise ConfigError(f"{ckpt}: its config {'sets' if cfg.train.pathway_from else 'has no'} train.pathway_from "
                          f"but its weights {'hold' if is_pathway_state(weights) else 'lack'} pathway layers")
    merged, names = merge_state_dict(weights, str(ckpt))
    log.info("pathway run: %d layers merged on load (W + lambda W'); `omnibyte merge` writes them as a run",
             len(names))
    return merged


# ----------------------------------------------------------------------------------------------
# evaluate


def training_meta(cfg: RunConfig, task, serializer):
    """The metadata of the run's training split from its own data source (for reference baselines such as the
    VQA answer prior): the task's index for ``data.source=task``, else the prepared store's records, read
    without serializing anything (the raw samples' non-bytes fields for shards, the per-stream meta of an h5
    store), lazily."""
    if cfg.data.source == "task":
        return task.split_meta(cfg.data.train_split)
    return _stored_meta(cfg, task, serializer, cfg.data.train_split)


def _stored_meta(cfg: RunConfig, task, serializer, split: str):
    from .data.sources import open_h5, sample_meta, split_samples

    if cfg.data.source == "h5":
        store = open_h5(cfg.data, task, serializer, split, training=False)  # the store eval_items reads
        for i in range(len(store)):
            yield store.meta(i)
    else:
        for _, sample in split_samples(cfg.data, task, split, {}):
            yield sample_meta(sample)


def report_lines(run: Run, results: dict[str, Any]) -> list[str]:
    """A short, human-readable report of :func:`evaluate_run` results and where the run's files are."""
    d = run.run_dir
    special = results.get("bpb_special_weight")
    lines = [f"{run.config.run_name}: {run.which} checkpoint step {run.step}; {results['split']} bits per byte "
             f"{results['bpb']:.4f}" + (f" (every loss-weighted token, {special:g} of weight on special tokens such as "
                                         f"BOS/EOS among them)" if special else "")]
    if results.get("task"):
        lines += run.task.report(results["task"])
    lines += [f"run directory {d}  (checkpoints/, metrics.jsonl, eval/)",
              f"curves: omnibyte plot {d}   TensorBoard: tensorboard --logdir {d / 'events'}",
              f"results: {results.get('results_file')}"]
    return lines


#: what an eval record's ``bpb`` is over (written beside it as ``bpb_scope``)
BPB_SCOPE = ("sum(w * nats) / sum(w) / ln 2 over every token with loss weight w > 0 of the eval rows, specials (BOS, "
             "EOS, markers, concat separators) included; bpb/<modality>: the tokens of one modality")


def evaluate_run(run: Run, split: str | None = None, *, max_samples: int | None = None,
                 per_token: bool | None = None, task_metrics: bool | None = None, progress: bool = True,
                 out_dir: str | Path | None = None, bpb: bool = True, visit=None) -> dict[str, Any]:
    """Score ``run`` on ``split`` (default: its ``eval.split``) of its own data source; results also go to
    ``<out_dir or run_dir/eval>/<split>_<step>.json`` (and ``.h5`` per-token losses). ``max_samples`` etc.
    default to the run's ``eval`` section. ``bpb=False``: task metrics only, no pass over the eval batches (no
    bits per byte, no per-token losses); they are added to that record when it is one of the same checkpoint
    (its bits per byte and per-token file stay). With task metrics the split is serialized once, for both. For a
    model with per-token losses, bits per byte and the per-token file come from one forward per batch, which also
    calls ``visit(batch, nll)`` (``nll``: that batch's per-token nats)."""
    from .data import eval_batches
    from .data.items import eval_items
    from .evaluate import PerTokenRows, evaluate_bpb, evaluate_bpb_per_token, write_per_token
    from .loss import LossModule
    from .precision import autocast, use_bf16

    cfg = run.config
    split = split or cfg.eval.split
    n = cfg.eval.max_samples if max_samples is None else max_samples
    per_token = cfg.eval.per_token if per_token is None else per_token
    task_metrics = cfg.eval.task_metrics if task_metrics is None else task_metrics
    out = Path(out_dir) if out_dir is not None else run.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    model, device = run.model, run.device
    bf16 = use_bf16(cfg.train.precision, device)
    meta = model.stream_meta
    results: dict[str, Any] = {"run": str(run.run_dir), "checkpoint": str(run.checkpoint), "which": run.which,
                               "step": run.step, "split": split, "data_source": cfg.data.source,
                               "data": {"source": cfg.data.source, "path": cfg.data.path,
                                        "task_root": getattr(cfg.task, "root", None)}}
    path = out / f"{split}_{run.step}.json"
    earlier = json.loads(path.read_text()) if path.is_file() else None
    if earlier and "data" in earlier and earlier["data"] != results["data"]:
        # an evaluation of other data (task.root= / data.path= overrides) would merge into, or replace, the
        # record of this checkpoint on the run's data: a bpb-only pass kept the earlier task results beside
        # bits per byte of another data set, in one record, without a word
        raise ConfigError(f"{path} holds step {run.step}'s {split} results on other data ({earlier['data']}; this "
                          f"evaluation reads {results['data']}): move or remove it to score this data, or "
                          f"evaluate into another folder")
    stats: dict = {}  # what serializing the items skipped
    subset: dict = {}  # which samples: all of the split, or max_samples of it spread over it (SUBSET_RULE)
    items = list(eval_items(cfg.data, run.task, run.serializer, split, max_samples=n, stats=stats,
                            subset=subset)) if task_metrics else None
    if bpb:
        rows: dict = {}
        batches = eval_batches(cfg.data, run.task, run.serializer, split, max_samples=n,
                               batch_size=cfg.eval.batch_size, pad_multiple=meta.patch_product, stats=rows,
                               streams=None if items is None else [it.stream for it in items], subset=subset)
        per_token = per_token and meta.per_token_losses
        collect = PerTokenRows() if per_token else None
        if meta.per_token_losses:  # one forward per batch for the bits per byte, per-token rows and ``visit``
            visits = [v for v in (collect, visit) if v is not None]
            results.update(evaluate_bpb_per_token(model, batches, device, bf16=bf16,
                                                  visit=lambda b, nll: [v(b, nll) for v in visits]))
        else:
            results.update(evaluate_bpb(LossModule(model), batches, device, bf16=bf16))
        results.pop("weight", None)
        # what the bits per byte cover (max_samples 0: the whole split); the loss weight of the special tokens
        # (BOS / EOS / markers, concat separators) in them: a text task's own bpb (task.bpb) leaves those out
        special = sum(float(b.loss_mask[b.modality == int(Modality.SPECIAL)].sum()) for b in batches)
        results.update(bpb_max_samples=n, bpb_subset=subset, bpb_bf16=bf16, bpb_scope=BPB_SCOPE,
                       bpb_special_weight=special)
        if rows:  # e.g. {"overlong_cropped": 3}: bits per byte over cropped streams, said in the result
            results["bpb_rows"] = rows
        if collect is not None:
            h5 = write_per_token(out / f"{split}_{run.step}.h5", collect, split=split, step=run.step)
            results["per_token"] = str(h5)
    if task_metrics:
        with autocast(device, bf16):  # the run's precision policy, as in training
            extra = run.task.evaluate(model, iter(items), split=split, out_dir=out, context=cfg.data.seq_len,
                                      batch_size=cfg.eval.batch_size or cfg.data.batch_size, progress=progress,
                                      step=run.step, checkpoint=str(run.checkpoint),
                                      prior_from=lambda: training_meta(cfg, run.task, run.serializer))
        if extra:
            results["task"] = extra
            results.update(task_max_samples=n, task_subset=subset, task_bf16=bf16)
        if stats:
            results["skipped"] = stats
    if earlier is not None:
        if earlier.get("checkpoint") == results["checkpoint"]:
            task_keys = ("task", "skipped", "task_max_samples", "task_subset", "task_bf16")
            if not bpb:  # a task-only pass: its task results replace the earlier ones, the bpb pass stays
                results = {**{k: v for k, v in earlier.items() if k not in task_keys and k != "parts"}, **results}
            elif "task" not in results and "task" in earlier:  # a bpb-only pass (per-token rows) keeps them
                results = {**results, **{k: earlier[k] for k in task_keys if k in earlier}}
    parts = {k: (results.get(f"bpb_{k}"), results.get(f"task_{k}")) for k in ("max_samples", "subset", "bf16")}
    parts["subset"] = tuple(None if x is None else "{rule} {n} of {of}".format(**{"n": "", "of": "", **x})
                            for x in parts["subset"])
    mixed = {k: v for k, v in parts.items() if "bpb" in results and "task" in results and v[0] != v[1]}
    results.pop("parts", None)
    if mixed:  # e.g. per-token rows of 4 samples beside the task over the whole split: never one sample set
        results["parts"] = ("bits per byte and task results come from different passes: "
                            + "; ".join(f"{k} {a} (bpb) vs {b} (task)" for k, (a, b) in mixed.items()))
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    results["results_file"] = str(path)
    return results


__all__ = ["Run", "build_components", "resolve_data_config", "load_run", "find_checkpoint", "evaluate_run",
           "checkpoint_config", "LOAD_MAY_CHANGE"]
