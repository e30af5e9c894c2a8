"""Runs grouped by experiment arm (input kind x initialisation), transfer tables, VQA accuracy."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..answers import normalize_answer, result_files
from ..identity import flatten
from .runs import Run, _step_of, aggregate, censored_aggregate, curve, final_value, steps_to_target

# --- runs grouped by experiment arm ---------------------------------------------------------------------


def input_kind(run: Run) -> str:
    """What the model reads: the image serializer (``png``, ``jpeg``, ``pixels``, ``pixels_patch``) of a qa
    serializer (``+<policy>`` appended when its loss policy is not the paper's answer-only, e.g.
    ``png+all``), ``cnn_lstm`` for the baseline, else the serializer's name (``utf8`` for PG19)."""
    model = str(run.get("model.name", ""))
    if "cnn_lstm" in model:
        return "cnn_lstm"
    ser = str(run.get("serializer.name", ""))
    if ser == "qa":
        img = str(run.get("serializer.image.name", "png"))
        if img == "pixels" and run.get("serializer.image.order") == "patch":
            img = "pixels_patch"
        loss = run.get("serializer.loss", "answer")
        return img if loss in (None, "answer") else f"{img}+{loss}"
    return ser or "?"


def _source_name(src: str) -> str:
    """``pg19`` for a run directory or checkpoint of a PG19 run (``runs/pg19_lm``, ``.../checkpoints/step_N``),
    else the run directory's name."""
    name = Path(src.rstrip("/")).name
    if name.startswith("step_") or name in ("latest", "best"):
        name = Path(src.rstrip("/")).parent.parent.name
    return "pg19" if "pg19" in name.lower() else name


def modality_aware(run: Run) -> bool:
    """Whether any stage block of the run has per-modality parameters (``block.modality_experts``)."""
    stages = run.get("model.stages", []) or []
    return any(isinstance(s, dict) and (s.get("block") or {}).get("modality_experts") for s in stages)


def init_kind(run: Run) -> str:
    """How the run started, as ``+``-joined parts: ``mom`` (modality-aware blocks), the source of
    ``train.init_from`` (e.g. ``pg19`` for ``runs/pg19_lm``), ``pathway-<source>`` (``train.pathway_from``);
    ``scratch`` when none applies. So a pathway run or a modality-aware one never pools with the scratch arm."""
    parts = ["mom"] if modality_aware(run) else []
    if src := str(run.get("train.init_from", "") or ""):
        parts.append(_source_name(src))
    if src := str(run.get("train.pathway_from", "") or ""):
        parts.append(f"pathway-{_source_name(src)}")
    return "+".join(parts) or "scratch"


def arm(run: Run) -> str:
    """The experiment arm a run belongs to: ``<input kind>/<init kind>`` (seeds pooled)."""
    return f"{input_kind(run)}/{init_kind(run)}"


#: config keys in which the seeds of one arm may differ (bookkeeping: where it ran, how it logged)
SEED_KEYS = frozenset({"seed", "run_name", "out_dir", "task.root", "train.progress", "train.resume", "eval.report",
                       "train.keep_last", "train.ckpt_every", "train.log_every"})


def _with_defaults(config: dict) -> dict:
    """A run's recorded config with every key of this omnibyte's config at its default where the record lacks it:
    a seed trained before a key existed (``serializer.image_align``) ran that key's default, and is not another
    setup for it. A record this omnibyte cannot read (a plugin not loaded) is compared as recorded."""
    from ..config import from_dict, to_dict
    from ..runconfig import RunConfig

    try:
        return to_dict(from_dict(RunConfig, config))
    except Exception:  # noqa: BLE001 - compared as recorded
        return config


def check_seeds_of_one_arm(name: str, group: list[Run]) -> None:
    """Refuse a group that is not seeds of one setup: two runs with the same seed, or runs whose configs differ
    outside :data:`SEED_KEYS` (e.g. a 30x20 and a 40x27 pixels run: pooled, one would be read as the other's
    seed, and with equal seeds one would vanish from the tables)."""
    seeds: dict[int, Run] = {}
    for r in group:
        if r.seed in seeds:
            raise ValueError(f"arm {name}: {seeds[r.seed].path} and {r.path} both have seed {r.seed}: not seeds of "
                             f"one arm; analyse them apart (separate folders, or group_runs(key=...))")
        seeds[r.seed] = r
    flats = [{k: repr(v) for k, v in flatten(_with_defaults(r.config)).items()} for r in group]  # repr: lists as text
    keys = sorted(k for k in set().union(*flats) if k not in SEED_KEYS and len({f.get(k) for f in flats}) > 1)
    if keys:
        shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        raise ValueError(f"arm {name}: its runs differ in {shown}, not only in their seed "
                         f"({', '.join(str(r.path) for r in group)}); analyse them apart (separate folders, or "
                         f"group_runs(key=...))")


def group_runs(runs: Iterable[Run], key: Callable[[Run], str] = arm, check: bool = False) -> dict[str, list[Run]]:
    """Runs by ``key`` (default :func:`arm`), each group sorted by seed; groups in first-seen order. With
    ``check`` each group must be seeds of one setup (:func:`check_seeds_of_one_arm`); the tables below check
    the groups they pool."""
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    groups = {k: sorted(v, key=lambda r: (r.seed, r.name)) for k, v in out.items()}
    if check:
        for k, v in groups.items():
            check_seeds_of_one_arm(k, v)
    return groups


def _steps_to(run: Run, target: float, key: str, split: str, window: int) -> tuple[float | None, bool]:
    """(the first step ``run`` reaches ``target``, False); a run that never does: (its last step, True), censored
    there (it would reach the target at that step or later); (None, False) without a curve."""
    s, v = curve(run, key, split)
    at = steps_to_target(s, v, target, window=window)
    if at is None:
        return (float(s[-1]), True) if len(s) else (None, False)
    return at, False


def transfer_table(runs: Iterable[Run], *, key: str = "loss", split: str = "val", window: int = 1,
                   pretrained: str = "pg19", paired: bool = True) -> list[dict[str, Any]]:
    """Does pretraining reduce the steps to the scratch model's final loss? One row per input kind.

    Target: the scratch arm's final (``window``-smoothed) ``split`` ``key``; with ``paired`` each seed's own
    scratch run gives the target for the pretrained run of the same seed (else the scratch mean is the
    target for all). Per run: the first step its smoothed curve reaches the target (interpolated). A run that
    never reaches it is **censored at its last step** (it needs at least that many), never dropped: the
    aggregates count it, and when any value is censored they are bounds (``bound``, ``censored``; :func:`fmt`
    prints ">= 600 ± 0 (n=3, 1 censored)"). Row: ``kind, target, scratch_steps, pretrained_steps`` (censored
    aggregates, ">="), ``reached`` / ``scratch_reached`` (runs that got there / all), ``speedup`` (over every
    seed, scratch steps / pretrained steps: "<=" where only pretrained runs are censored, ">=" where only scratch
    ones are; with both kinds the seeds that are censored on both sides are left out and counted in
    ``speedup["unbounded"]``, and seeds censored on one side of each kind make it no bound: ``bound`` "?"),
    ``reduction`` (1 - pretrained mean / scratch mean; nan when a mean is censored, then ``reduction_bound``
    says the bound, e.g. "<= 0.31"), final losses of both arms.
    """
    groups = group_runs(runs)
    rows = []
    kinds = sorted({k.split("/", 1)[0] for k in groups})
    for kind in kinds:
        scratch, pre = groups.get(f"{kind}/scratch", []), groups.get(f"{kind}/{pretrained}", [])
        if not scratch or not pre:
            continue
        check_seeds_of_one_arm(f"{kind}/scratch", scratch)
        check_seeds_of_one_arm(f"{kind}/{pretrained}", pre)
        finals = {r.seed: final_value(r, key, split, window=window) for r in scratch}
        mean_target = aggregate(finals.values())["mean"]

        targets = {r.seed: (finals.get(r.seed) if paired else None) for r in [*scratch, *pre]}
        targets = {sd: mean_target if t is None else t for sd, t in targets.items()}
        s_steps = {r.seed: _steps_to(r, targets[r.seed], key, split, window) for r in scratch}
        p_steps = {r.seed: _steps_to(r, targets[r.seed], key, split, window) for r in pre}
        ratios, directions, unbounded = [], set(), 0
        for sd, (p, p_cens) in p_steps.items():
            s, s_cens = s_steps.get(sd, (None, False))
            if not p or s is None:
                continue
            if p_cens and s_cens:  # neither reached: the ratio is not bounded either way
                unbounded += 1
                continue
            ratios.append((s / p, p_cens or s_cens))
            directions |= {"<=" if p_cens else ">="} if (p_cens or s_cens) else set()
        bound = "?" if len(directions) > 1 else next(iter(directions), "")
        speedup = {**censored_aggregate([x for x, _ in ratios], [c for _, c in ratios], bound),
                   "unbounded": unbounded}
        sa = censored_aggregate([v for v, _ in s_steps.values()], [c for _, c in s_steps.values()], ">=")
        pa = censored_aggregate([v for v, _ in p_steps.values()], [c for _, c in p_steps.values()], ">=")
        reduction = 1.0 - pa["mean"] / sa["mean"] if sa["n"] and pa["n"] and sa["mean"] else float("nan")
        bound_note = ""
        if sa["censored"] or pa["censored"]:
            # a censored pretrained mean is a lower bound (reduction <=), a censored scratch one too (reduction >=)
            bound_note = ("?" if sa["censored"] and pa["censored"] else "<=" if pa["censored"] else ">=")
            bound_note = f"{bound_note} {reduction:.3g}"
            reduction = float("nan")
        rows.append({
            "kind": kind, "metric": f"{split}/{key}", "target": aggregate(finals.values()),
            "scratch_steps": sa, "pretrained_steps": pa,
            "reached": f"{sum(not c and v is not None for v, c in p_steps.values())}/{len(p_steps)}",
            "scratch_reached": f"{sum(not c and v is not None for v, c in s_steps.values())}/{len(s_steps)}",
            "speedup": speedup,
            "reduction": reduction,
            "reduction_bound": bound_note,
            "scratch_final": aggregate(finals.values()),
            "pretrained_final": aggregate(final_value(r, key, split, window=window) for r in pre),
            "seeds": sorted({r.seed for r in scratch} | {r.seed for r in pre}),
        })
    return rows


# --- VQA accuracy -------------------------------------------------------------------------------------------


def vqa_accuracy(run: Run, split: str | None = None, mode: str | None = None) -> dict[str, Any] | None:
    """``{"split", "mode", "accuracy", "by_qtype": {qtype: accuracy}, "num_samples", "step"}`` from the run's VQA
    results (``eval/vqa_<split>_<step>.json``, or the ``task`` part of ``eval/<split>_<step>.json``, latest step);
    ``mode`` picks generate/rank (``classify`` in files written before the CNN+LSTM ranked through ``score``;
    default: the file's main mode). None when there are none."""
    cands: list[tuple[int, dict]] = []
    for stem, d in run.evals.items():
        res = None
        if stem.startswith("vqa_") and "accuracy" in d:
            res = d
        elif isinstance(d.get("task"), dict) and "accuracy" in d["task"]:
            res = d["task"]
        if res is None or (split and res.get("split", split) != split):
            continue
        cands.append((int(d.get("step", res.get("step", _step_of(Path(stem))))), res))
    if not cands:
        return None
    step, res = max(cands, key=lambda c: c[0])
    m = mode or res.get("main_mode") or (res.get("modes") or ["?"])[0]
    by = res.get(f"by_qtype_{m}")
    if by is None and isinstance(res.get("details"), dict) and m in res["details"]:
        by = {k: v["accuracy"] for k, v in res["details"][m].get("by_qtype", {}).items()}
    acc = res.get(f"accuracy_{m}")
    if acc is None:  # the file's single accuracy is its main mode's; any other mode named is not in it
        if mode is not None and mode != res.get("main_mode", mode):
            raise ValueError(f"{run.path}: VQA results have no mode {mode!r} (modes: {res.get('modes')}, main "
                             f"{res.get('main_mode')!r})")
        acc = res.get("accuracy")
    return {"split": res.get("split"), "mode": m, "accuracy": acc, "by_qtype": dict(by or {}),
            "num_samples": res.get("num_samples"), "step": step if step >= 0 else None}


def accuracy_table(runs: Iterable[Run], split: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
    """Per arm: overall accuracy and accuracy per question type, aggregated over seeds (in ``mode``, default each
    file's main mode; seeds scored in different modes are refused, not averaged under one mode's name)."""
    rows = []
    for name, group in group_runs(runs).items():
        scored = [(r, a) for r in group if (a := vqa_accuracy(r, split, mode)) is not None]
        accs = [a for _, a in scored]
        if not accs:
            continue
        check_seeds_of_one_arm(name, group)
        modes = {a["mode"] for a in accs}
        if len(modes) > 1:
            raise ValueError(f"arm {name!r}: its seeds' VQA accuracies are in different modes ("
                             + ", ".join(f"{r.name}: {a['mode']}" for r, a in scored)
                             + "); pass mode= to compare one mode, or evaluate them alike")
        scored_as = {(a.get("step"), a.get("num_samples")) for a in accs}
        if len(scored_as) > 1:  # e.g. one seed's study scoring was skipped: only its end-of-training report (the
            # best checkpoint, chosen on this split, on eval.max_samples questions) is left
            raise ValueError(f"arm {name!r}: its seeds' VQA accuracies are of different checkpoints or question "
                             f"sets (" + ", ".join(f"{r.name}: step {a.get('step')}, {a.get('num_samples')} "
                                                    f"questions" for r, a in scored)
                             + "); score every seed alike (run_transfer.py eval) before averaging")
        qtypes = sorted({q for a in accs for q in a["by_qtype"]})
        rows.append({"arm": name, "mode": accs[0]["mode"], "accuracy": aggregate(a["accuracy"] for a in accs),
                     "by_qtype": {q: aggregate(a["by_qtype"].get(q) for a in accs) for q in qtypes}})
    return rows


# --- per-question comparisons (one seed: the questions give the error bar) -------------------------------------


def vqa_predictions(run: Run, split: str = "val", step: int | None = None) -> list[dict[str, Any]]:
    """The run's per-question VQA records (``eval/vqa_<split>_<step>_predictions.jsonl``: ``id``, ``gold``,
    ``qtype``, ``pred_<mode>``, ...) of checkpoint ``step``, by default the step whose accuracy
    :func:`vqa_accuracy` reports, so per-question tables and the accuracy table describe one checkpoint. A run
    with records of other steps only is refused (naming them); one evaluated before the file names carried the
    step has ``vqa_<split>_predictions.jsonl``, read as it is. Empty when there are none."""
    import json
    import re

    ev = Path(run.path) / "eval"
    have = sorted(int(m.group(1)) for f in ev.glob(f"vqa_{split}_*_predictions.jsonl")
                  if (m := re.fullmatch(rf"vqa_{re.escape(split)}_(\d+)_predictions\.jsonl", f.name)))
    if step is None and have:
        acc = vqa_accuracy(run, split)
        step = acc["step"] if acc and acc.get("step") is not None else have[-1]
    if have:
        if step not in have:
            raise ValueError(f"{run.path}: VQA predictions of {split!r} at steps {have}, none at step {step} (the "
                             f"step whose accuracy is reported); evaluate that checkpoint, or pass step=")
        path = result_files(ev, split, step)[1]
    else:
        path = result_files(ev, split)[1]  # written before the step was in the name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _correct(recs: list[dict[str, Any]], mode: str) -> dict[str, tuple[str, bool]]:
    missing = [r for r in recs if f"pred_{mode}" not in r]
    if missing:  # a mode the run was not scored in: every question would count as wrong
        have = sorted({k[5:] for r in recs for k in r if k.startswith("pred_")})
        raise ValueError(f"{len(missing)} of {len(recs)} records have no pred_{mode} (question "
                         f"{missing[0].get('id')!r}): not scored in mode {mode!r}; modes present: {have or 'none'}")
    def gold(r):  # generate mode normalizes the decoded answer, and so the gold one (the evaluation's rule)
        return normalize_answer(str(r.get("gold"))) if mode == "generate" else r.get("gold")

    return {str(r["id"]): (str(r.get("qtype")), r[f"pred_{mode}"] == gold(r), r.get("image")) for r in recs}


def mean_stderr(values: list[float], clusters: list[Any] | None = None, binomial: bool = False) -> dict[str, Any]:
    """Mean of ``values`` and its standard error. Without clusters (or with one value per cluster): the binomial
    ``sqrt(p (1 - p) / n)`` (``binomial``) or ``sd / sqrt(n)``. With ``clusters`` (e.g. the image each question
    asks about: CLEVR has ~10 questions per image, and questions about one image are not independent draws) the
    cluster-robust error over G clusters, ``sqrt(G / (G - 1) * sum_g (sum_{i in g} (x_i - mean))^2) / n``, and
    ``clusters``: G."""
    import math

    n = len(values)
    mean = sum(values) / n
    if clusters is not None and None not in clusters and len(set(clusters)) < n:
        sums: dict[Any, float] = {}
        for x, g in zip(values, clusters):
            sums[g] = sums.get(g, 0.0) + (x - mean)
        G = len(sums)
        var = G / (G - 1) * sum(v * v for v in sums.values()) / n**2 if G > 1 else float("nan")
        return {"mean": mean, "stderr": math.sqrt(var), "n": n, "clusters": G}
    if binomial:
        return {"mean": mean, "stderr": math.sqrt(mean * (1 - mean) / n), "n": n}
    var = sum((x - mean) ** 2 for x in values) / (n - 1) if n > 1 else float("nan")
    return {"mean": mean, "stderr": math.sqrt(var / n), "n": n}


def binomial_accuracy(run: Run, split: str = "val", mode: str = "rank") -> dict[str, dict[str, float]]:
    """Accuracy overall and per question type from the per-question records, each with its standard error over
    questions (the error of scoring on n questions, not the spread over seeds): binomial ``sqrt(p (1 - p) / n)``,
    or clustered by image when the records name it (:func:`mean_stderr`)."""
    by: dict[str, tuple[list[float], list[Any]]] = {}
    for qtype, ok, image in _correct(vqa_predictions(run, split), mode).values():
        for k in ("all", qtype):
            by.setdefault(k, ([], []))[0].append(float(ok))
            by[k][1].append(image)
    return {k: mean_stderr(v, g, binomial=True) for k, (v, g) in by.items()}


def paired_difference(run: Run, base: Run, split: str = "val", mode: str = "rank") -> dict[str, dict[str, float]]:
    """Accuracy of ``run`` minus that of ``base`` on the questions both answered, overall and per question type,
    with the paired standard error ``sd(d) / sqrt(n)`` of the per-question differences ``d`` in {-1, 0, 1}: two
    runs scored on the same questions differ by less noise than two independent accuracies suggest. Refuses
    runs scored on different question sets (a comparison on mismatched questions says nothing)."""
    return paired_records(vqa_predictions(run, split), vqa_predictions(base, split), mode,
                          names=(f"{run.path} ({split})", f"{base.path} ({split})"))


def paired_records(recs: list[dict[str, Any]], base: list[dict[str, Any]], mode: str = "rank",
                   names: tuple[str, str] = ("the records", "the base records")) -> dict[str, dict[str, float]]:
    """:func:`paired_difference` on two lists of per-question records (``id``, ``qtype``, ``gold``,
    ``pred_<mode>``, and ``image`` when known: errors clustered by image), e.g. one run scored clean and with
    corrupted inputs; ``names`` label them in errors."""
    a, b = _correct(recs, mode), _correct(base, mode)
    if not a or not b:
        raise ValueError(f"no per-question records in {names[0] if not a else names[1]}")
    if set(a) != set(b):
        raise ValueError(f"{names[0]} and {names[1]} are on different questions "
                         f"({len(a)} and {len(b)}; {len(set(a) ^ set(b))} not in both)")
    by: dict[str, tuple[list[float], list[Any]]] = {}
    for qid, (qtype, ok, image) in a.items():
        d = float(int(ok) - int(b[qid][1]))
        for k in ("all", qtype):
            by.setdefault(k, ([], []))[0].append(d)
            by[k][1].append(image)
    return {k: mean_stderr(d, g) for k, (d, g) in by.items()}
