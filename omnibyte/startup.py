"""What a training run does before its first step, outside the loop: the run directory's identity and record
(:mod:`omnibyte.identity`), the checkpoint to resume, weights from another run (``train.init_from``), and the
start-up summary."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import parallel
from .config import ConfigError, dump_yaml, from_dict, load_yaml
from .identity import check_rerun
from .model.blocks.experts import expand_dense_weights
from .pathway import attach_pathway, is_pathway_state, merge_state_dict
from .run import inherit_derived, resolve_data_config
from .runconfig import RESOLVED_NAME, RunConfig
from .weights import stage_count

log = logging.getLogger("omnibyte.train")


def run_record(run_dir: Path, latest: Path | None = None) -> dict | None:
    """The config a run directory belongs to: its latest intact checkpoint's, else its ``config.resolved.yaml``."""
    latest = latest or ckpt_io.latest_checkpoint(run_dir / "checkpoints", verify=True)
    if latest is not None:
        return ckpt_io.read_state(latest)["config"]
    if (run_dir / RESOLVED_NAME).is_file():
        return load_yaml(run_dir / RESOLVED_NAME)
    return None


def find_resume(cfg: RunConfig, latest: Path | None) -> Path | None:
    """The checkpoint to continue: this run's latest intact one (``auto``), none, or the one named. A merged
    checkpoint (``omnibyte merge``: weights only) is refused when training would go on from it."""
    if cfg.train.resume == "never":
        return None
    found = latest if cfg.train.resume == "auto" else ckpt_io.resolve_checkpoint(cfg.train.resume)
    if found is not None:
        state = ckpt_io.read_state(found)
        later = [p.name for p in ckpt_io.list_checkpoints(cfg.run_dir / "checkpoints")
                 if int(ckpt_io.STEP_RE.match(p.name).group(1)) > int(state["step"])]
        if cfg.train.resume != "auto" and later:  # a branch back in time inside a run that went further
            raise ConfigError(
                f"train.resume={cfg.train.resume} (step {state['step']}) would branch run {cfg.run_name} back: it "
                f"has later checkpoints ({', '.join(later[:4])}{', ...' if len(later) > 4 else ''}) of the other "
                f"trajectory, which pruning would delete and a later train.resume=auto would resume instead. "
                f"Resume into a new run (run_name={cfg.run_name}-from{state['step']} "
                f"train.resume={cfg.train.resume}), or move those checkpoints away")
        if state.get("merged_from") and int(state["step"]) < cfg.train.steps:
            raise ConfigError(f"{found} was written by `omnibyte merge` (from {state['merged_from'].get('run')}): "
                              f"it holds weights only, no optimizer or data position, so training cannot resume "
                              f"from it; start a new run with train.init_from={found}")
    return found


def attach_pathway_from(model: torch.nn.Module, cfg: RunConfig, info: parallel.DistInfo,
                        resume_from: Path | None) -> dict | None:
    """``train.pathway_from``: wrap the chosen linear layers of ``model`` (:mod:`omnibyte.pathway`) with the
    same-named layers of the auxiliary run's model, loaded with its own config (:func:`omnibyte.run.load_run`).
    A resumed run rebuilds the same wrapped model with placeholders that its checkpoint then fills (``W'`` and
    ``lambda`` are in every pathway checkpoint: the auxiliary run is not read again). Returns the record of the
    source (path, checkpoint, step, weights sha256) for the run's provenance; on resume, the one recorded by
    the checkpoint."""
    t = cfg.train
    if not t.pathway_from:
        return None
    if info.strategy == "fsdp2":
        raise ConfigError("train.pathway_from with parallel.strategy=fsdp2 is not supported (the pathway layers "
                          "compute their weight from three parameters; untested under sharding): use ddp or one "
                          "process")
    if resume_from is not None:
        names = attach_pathway(model, t.pathway_layers, t.pathway_stages, None, t.pathway_train_aux)
        log.info("pathway: %d layers rebuilt to resume (W' and lambda from %s)", len(names), resume_from)
        return (ckpt_io.read_state(resume_from).get("provenance") or {}).get("pathway_from")
    from .run import load_run

    try:
        path = ckpt_io.resolve_checkpoint(t.pathway_from)
    except FileNotFoundError as e:
        raise ConfigError(f"train.pathway_from={t.pathway_from!r}: {e}") from None
    aux = load_run(path.parent.parent, str(path), device="cpu")
    names = attach_pathway(model, t.pathway_layers, t.pathway_stages, aux.model, t.pathway_train_aux)
    files = aux.state.get("files") or {}
    record = {"source": t.pathway_from, "checkpoint": str(path.resolve()), "run": aux.config.run_name,
              "step": aux.step, "weights_sha256": files.get("model.safetensors") or
              {k: v for k, v in files.items() if k.startswith("dcp/")}, "layers": len(names),
              "train_aux": t.pathway_train_aux}
    log.info("pathway from %s (step %d): %d layers, W' %s", path, aux.step, len(names),
             "trains" if t.pathway_train_aux else "frozen")
    return record


def improves(value: float, best: float | None) -> bool:
    """The selection rule: a finite value below the best so far (none yet, or a non-finite one: any finite)."""
    import math

    return math.isfinite(value) and (best is None or not math.isfinite(best) or value < best)


def is_evaluation(record: dict, split: str) -> bool:
    """A ``metrics.jsonl`` record of an evaluation of ``split``. The training loss lines are recorded under split
    ``train`` too, so with ``eval.split=train`` a split alone took them for evaluations on resume (an evaluation a
    crash had missed was never run; patience recounted over loss lines): a loss line has the step's ``lr``, an
    evaluation never does."""
    return record.get("split") == split and "lr" not in record


def evals_since_best(records: list[dict], split: str, select: str, upto: int) -> int:
    """Evaluations since the best one, replayed from the run's ``metrics.jsonl`` records up to step ``upto`` with
    the training loop's rule (:func:`improves`). A checkpoint is written before its step's evaluation, so its own
    counter misses that evaluation: a resumed run recounts from the records."""
    by_step: dict[int, float] = {}
    for r in records:
        # a non-finite evaluation is logged as null: it counts, as in the loop, as one that did not improve
        if is_evaluation(r, split) and r.get("step", upto + 1) <= upto and select in r:
            by_step[int(r["step"])] = float("nan") if r[select] is None else float(r[select])
    best, since = None, 0
    for _, value in sorted(by_step.items()):
        if improves(value, best):
            best, since = value, 0
        else:
            since += 1
    return since


def eval_pending(state: dict, records: list[dict], split: str) -> bool:
    """A checkpoint written before its step's evaluation, which then did not happen (a crash, a failure): no
    record of it among the run's ``metrics.jsonl`` ``records``."""
    step = state["step"]
    return bool(state.get("eval_due")) and not any(r.get("step") == step and is_evaluation(r, split) for r in records)


def check_expert_assignment(model: torch.nn.Module, source_config: dict, stages: tuple[int, ...], source: str
                            ) -> None:
    """Per-modality copies are stacked by expert index: a modality-aware source whose stage assigns modalities
    to copies differently (``[[image], [question, answer]]`` against ``[[question, answer], [image]]``) has the
    same shapes and would start each modality from another's weights. Refuse, naming the stage and both."""
    from .model.blocks.experts import expert_table, normalize_groups

    own = getattr(getattr(model, "config", None), "stages", None) or ()
    theirs = (source_config.get("model") or {}).get("stages") or []
    for s, (mine, other) in enumerate(zip(own, theirs)):
        if stages and s not in stages:
            continue
        a = tuple(getattr(mine.block, "modality_experts", ()) or ())
        b = normalize_groups(((other or {}).get("block") or {}).get("modality_experts") or ())
        if a and b and expert_table(a) != expert_table(b):
            raise ConfigError(f"train.init_from={source!r}: stage {s} assigns modalities to its per-modality copies "
                              f"as {[list(g) for g in b]}, this model as {[list(g) for g in a]}: each modality would "
                              f"start from another's weights; use the same modality_experts (or a dense source)")


def check_eval_split(cfg: RunConfig) -> None:
    """Refuse an ``eval.split`` that training cannot select on: a test split (it would become a validation
    split)."""
    if cfg.eval.split.lower().startswith("test"):
        raise ConfigError(f"eval.split={cfg.eval.split}: training evaluates eval.split to pick the best checkpoint "
                          f"(and to stop early), so a test split would become a validation split. Select on "
                          f"validation (val / validation) and score the test split once, at the end: "
                          f"`omnibyte eval {cfg.run_dir} {cfg.eval.split}`")


def init_weights_from(model: torch.nn.Module, source: str, stages: tuple[int, ...]) -> None:
    """Load another run's weights (all, or only ``stages``) into ``model`` before training (transfer); nothing
    without a ``source``. A checkpoint of another architecture is a ConfigError naming the first tensors that do
    not fit; ``stages`` without a source, too (nothing would be loaded)."""
    if not source:
        if stages:
            raise ConfigError(f"train.init_stages={list(stages)} chooses stages of train.init_from, which is not "
                              f"set: nothing would be loaded; set train.init_from (or leave init_stages empty)")
        return
    try:
        path = ckpt_io.resolve_checkpoint(source)
    except FileNotFoundError as e:
        raise ConfigError(f"train.init_from={source!r}: {e}") from None
    weights = ckpt_io.load_weights(path)
    if is_pathway_state(weights):  # a Multimodal Pathway run: its merged weights, W + lambda W'
        weights, merged = merge_state_dict(weights, str(path))
        log.info("init_from %s: a pathway run; %d layers merged (W + lambda W')", path, len(merged))
    theirs = stage_count(weights)
    ours = len(getattr(getattr(model, "config", None), "stages", None) or ()) or theirs
    if stages and theirs != ours and any(s < 0 or s % theirs == theirs - 1 for s in stages):
        # the innermost stage (and embedding and head) of a source with another number of stages is not this
        # model's innermost: -1 put the source's byte-level block into this model's middle stage
        raise ConfigError(f"train.init_stages={list(stages)}: {path} has {theirs} stages, this model {ours}; its "
                          f"innermost stage (with the byte embedding and head) is not this model's: name outer "
                          f"stages by index (0..{theirs - 2}), or start from a model with {ours} stages")
    try:
        weights = ckpt_io.select_stages(weights, stages)
    except ValueError as e:
        raise ConfigError(f"train.init_stages: {e}") from None
    check_expert_assignment(model, ckpt_io.read_state(path).get("config") or {}, stages, source)
    weights, copied = expand_dense_weights(model, weights)  # a dense run into modality-aware blocks
    if copied:
        log.info("init_from %s: %d dense tensors copied into every modality's copy (modality_experts)", path,
                 len(copied))
    own = model.state_dict()
    unknown = [k for k in weights if k not in own]
    wrong = [f"{k} {tuple(v.shape)} (this model: {tuple(own[k].shape)})" for k, v in weights.items()
             if k in own and own[k].shape != v.shape]
    # with init_stages, every tensor of the chosen stages must come from the source: a source stage with fewer
    # layers loaded the first ones and left the rest at init, in silence
    try:
        chosen = ckpt_io.select_stages(own, stages) if stages else own
    except ValueError:
        chosen = {}
    missing = [k for k in chosen if k not in weights]
    if unknown or wrong or missing:
        detail = "; ".join(filter(None, [f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
                                         f"not in this model: {', '.join(unknown[:3])}" if unknown else "",
                                         f"missing there: {', '.join(missing[:3])}" if missing else ""]))
        raise ConfigError(f"train.init_from={source!r}: {path} holds another architecture ({detail}); "
                          f"start from a run of the same model, or choose matching train.init_stages")
    tied = _tied_names(model)
    for a, b in tied:  # one tensor under two names here (tie_embeddings): both from the source must agree
        if a in weights and b in weights and not torch.equal(weights[a], weights[b]):
            raise ConfigError(f"train.init_from={source!r}: this model ties {a} and {b} (one tensor), {path} holds "
                              f"two different ones: loading both would keep the last in silence; start from a run "
                              f"with tie_embeddings, or untie this model")
    result = model.load_state_dict(weights, strict=not stages)
    log.info("init_from %s: loaded %d tensors%s", path, len(weights),
             f" (stages {list(stages)}; {len(result.missing_keys)} left at init)" if stages else "")


def _tied_names(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Pairs of state-dict names that are one parameter (e.g. ``embed.weight`` / ``head.weight`` when tied)."""
    first: dict[int, str] = {}
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.append((first[id(p)], name))
        else:
            first[id(p)] = name
    return pairs


def open_run_dir(cfg: RunConfig, info: parallel.DistInfo) -> tuple[RunConfig, Path | None]:
    """Check the run directory's identity; returns the config to train and the run's latest intact checkpoint.
    A new run's record is written by :func:`write_record` once its start-up checks passed."""
    run_dir = cfg.run_dir
    latest = ckpt_io.latest_checkpoint(run_dir / "checkpoints", verify=True)
    record = run_record(run_dir, latest)
    if record is not None:
        recorded = from_dict(RunConfig, record)  # today's schema: options added since take their defaults
        cfg = inherit_derived(cfg, recorded)
        check_rerun(recorded, cfg, run_dir)
        if cfg.train.resume == "never" and latest is not None:
            raise ConfigError(f"train.resume=never but {run_dir} already holds checkpoints of this run; choose a "
                              f"new run_name (the old run's checkpoints are never overwritten)")
    else:
        cfg = resolve_data_config(cfg)
    return cfg, latest


def write_record(cfg: RunConfig, info: parallel.DistInfo) -> None:
    """Create a new run's directories and its record (``config.resolved.yaml``, written once, never again).
    Called after the start-up checks (components, eval data, ``init_from``), so a config that fails them
    does not claim the run name."""
    run_dir = cfg.run_dir
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval").mkdir(exist_ok=True)
        if not (run_dir / RESOLVED_NAME).is_file():
            dump_yaml(cfg, run_dir / RESOLVED_NAME)
    parallel.barrier(info)


def startup_summary(cfg: RunConfig, info: parallel.DistInfo, model: torch.nn.Module, bf16: bool,
                    resume_from: Path | None, resume_step: int = 0, new_run: bool = True) -> list[str]:
    """The lines a run starts with: model size, global batch, device and precision, data, run directory."""
    d, t = cfg.data, cfg.train
    n_params = sum(p.numel() for p in model.parameters())
    n_aux = sum(p.numel() for n, p in model.named_parameters() if n.rpartition(".")[2] in ("aux_weight", "aux_bias"))
    n_layers = sum(1 for n, _ in model.named_parameters() if n.endswith(".pathway_lambda"))
    rows = d.batch_size * t.grad_accum * info.world
    if d.source == "task":
        root = getattr(cfg.task, "root", None)
        source = f"task {cfg.task.name}" + (f" at {root}" if root else "")
    else:
        source = f"{d.source} {d.path}"
    if resume_from is not None:
        where = f"resumes from {resume_from} at step {resume_step}"
    elif new_run:
        where = "new" + (f"; weights from {t.init_from}" if t.init_from else "")
    else:
        where = "exists, no checkpoint: starts at step 0"
    pathway = [f"  pathway from {t.pathway_from}: {n_layers} layers, {n_aux / 1e6:.2f}M auxiliary parameters "
               f"({'trained' if t.pathway_train_aux else 'frozen'}) + {n_layers} lambdas beside the base model's "
               f"{(n_params - n_aux - n_layers) / 1e6:.2f}M"] if t.pathway_from else []
    ranks = f"{info.world} rank{'s' if info.world > 1 else ''}"
    return [
        f"run {cfg.run_name}: {type(model).__name__}, {n_params / 1e6:.2f}M parameters ({n_params:,}), "
        f"{t.steps:,} steps",
        f"  global batch: {d.batch_size} rows x {d.seq_len} bytes x {t.grad_accum} grad_accum x {ranks} "
        f"= {rows} rows, {rows * d.seq_len:,} bytes per step",
        f"  device: {info.device}, precision {'bf16 autocast' if bf16 else 'fp32'}, {ranks} "
        f"(parallel {info.strategy})",
        f"  data: {source}, split {d.train_split}; eval: {cfg.eval.split}"
        f" ({cfg.eval.max_samples or 'all'} samples)",
        f"  run directory: {cfg.run_dir} ({where})",
        *pathway,
    ]
