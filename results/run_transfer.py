#!/usr/bin/env python3
"""The cross-modal transfer experiment, end to end, in one process tree (issue 7).

    python results/run_transfer.py --out OUT --pg19 ../shared/data/pg19-mini [--scale gpu|gpu2|cpu2|micro] [--jobs N]
        [--arms scratch,pg19,pathway,mom,mom_pg19] [--kinds png,jpeg,pixels] [--no-cnn]

1. data: ``omnibyte prepare clevr-synth`` (CLEVR-format images and questions), while
2. ``omnibyte train pg19_lm`` pretrains a byte model on PG19;
3. fine-tunes ``omnibyte train clevr_vqa_{png,jpeg,pixels}`` from scratch and, with the same model, steps,
   batch and schedule, ``omnibyte train transfer_pg19_to_clevr_{png,jpeg,pixels}`` from the PG19 weights;
   ``omnibyte train clevr_cnn_lstm`` on the same data, steps and batch; every arm with ``--seeds`` seeds;
   ``--arms`` adds Multimodal Pathway from the PG19 run and modality-aware blocks (scratch and from PG19);
4. ``run_transfer.py eval RUN_DIR``: VQA accuracy by question type on ``vqa_samples`` val questions spread over
   the split, as evaluation picks them (``prior.json`` is taken on the same ones), by closed-set ranking through
   each model's ``score`` (byte models and the CNN+LSTM alike), into ``eval/vqa_val_<step>.json``,
   and per-token losses of a few val streams into ``eval/val_<step>.h5`` (heat maps);
5. ``OUT/transfer_metrics.tar.gz``: config.resolved.yaml, metrics.jsonl, eval/*.json, eval/*.h5 of every
   run; no checkpoints.

Jobs run ``--jobs`` at a time (one GPU is shared; each is small). ``--budget`` seconds bound the whole
thing: no job starts late, running ones get SIGTERM at the budget (a training checkpoints the step it reached,
so a later run with the same ``--out`` resumes it), and whatever finished is packed.
Sizes (``SCALES``) are tiny on purpose: the whole study fits in minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# One place for every size. "gpu": the experiment (one H100, < 9 minutes); "micro": a CPU dry run of the
# same code paths in about a minute.
SCALES = {
    "gpu": {
        "images": 4000, "qpi": 10, "render": "240x160", "gen_workers": 16,
        "stages": [{"length": 1024, "width": 256, "layers": 3, "block": {"name": "transformer", "heads": 4}},
                   {"length": 8, "width": 128, "layers": 2, "block": {"name": "transformer", "heads": 4}}],
        "pg19": ["data.seq_len=2048", "data.batch_size=32", "train.steps=1200", "train.lr=2e-3",
                 "train.min_lr=2e-4", "train.warmup=100", "train.eval_every=400", "train.log_every=50",
                 "eval.split=validation", "eval.max_samples=0"],
        "clevr": ["data.batch_size=16", "train.steps=600", "train.lr=1e-3", "train.min_lr=1e-4",
                  "train.warmup=50", "train.eval_every=25", "train.log_every=25", "eval.max_samples=256",
                  "data.workers=2"],
        "cnn": ["data.batch_size=16", "train.steps=600", "train.warmup=50", "train.eval_every=25",
                "train.log_every=25", "eval.max_samples=256", "data.workers=2"],
        "vqa_samples": 500, "per_token_rows": 4, "seeds": 3, "jobs": 8, "budget": 510, "aux_all": True,
    },
    # the second edition (issue 16 item 4), chosen from a CPU probe (docs/results.md, "Scale for the second
    # edition"): zero-hop questions only (CLEVR's 6 basic templates: count, exist, query shape / material / colour /
    # size), 120x80 renders serialized at 30x20 (a 2,048-byte row), so a scratch byte model learns some vision in
    # minutes; the probe's 0.70M model beat the per-family prior on exist and count after 1,800 steps of 16 rows
    # on a CPU, not yet on query_attribute: this scale has 6x its parameters (4.23M) and 5.6x its rows seen.
    # Confirm on the GPU first: `--arms scratch --seeds 1 --only pixels_scratch_s0`.
    "gpu2": {
        "images": 2500, "qpi": 6, "render": "120x80", "gen_workers": 16, "templates": ["basic.json"],
        "stages": [{"length": 256, "width": 256, "layers": 4, "block": {"name": "transformer", "heads": 4}},
                   {"length": 8, "width": 128, "layers": 2, "block": {"name": "transformer", "heads": 4}}],
        "pg19": ["data.seq_len=2048", "data.batch_size=32", "train.steps=2000", "train.lr=2e-3",
                 "train.min_lr=2e-4", "train.warmup=100", "train.eval_every=500", "train.log_every=50",
                 "eval.split=validation", "eval.max_samples=0"],
        "clevr": ["serializer.image.size=[30,20]", "data.seq_len=2048", "data.batch_size=32", "data.pad_to=longest",
                  "train.steps=5000", "train.lr=2e-3", "train.min_lr=2e-4", "train.warmup=100",
                  "train.eval_every=250", "train.log_every=50", "eval.max_samples=512", "data.workers=2"],
        "cnn": ["serializer.image.size=[30,20]", "model.image.size=[30,20]", "data.batch_size=32",
                "train.steps=5000", "train.warmup=100", "train.eval_every=250", "train.log_every=50",
                "eval.max_samples=512", "data.workers=2"],
        "vqa_samples": 1000, "per_token_rows": 4, "answer_rows": 1000, "seeds": 3, "jobs": 8, "budget": 540,
        "aux_all": False,
    },
    # the probe itself (docs/results.md, "Scale for the second edition"), for the 2-core CPU: its 0.70M model,
    # 1,800 steps of 16 rows; two jobs of one thread each (OMP_NUM_THREADS=1), about 25 minutes per CLEVR run
    "cpu2": {
        "images": 2500, "qpi": 6, "render": "120x80", "gen_workers": 2, "templates": ["basic.json"],
        "stages": [{"length": 256, "width": 128, "layers": 2, "block": {"name": "transformer", "heads": 4}},
                   {"length": 8, "width": 64, "layers": 2, "block": {"name": "transformer", "heads": 2}}],
        "pg19": ["data.seq_len=2048", "data.batch_size=16", "train.steps=1000", "train.lr=2e-3",
                 "train.min_lr=2e-4", "train.warmup=50", "train.eval_every=500", "train.log_every=50",
                 "eval.split=validation", "eval.max_samples=0"],
        "clevr": ["serializer.image.size=[30,20]", "data.seq_len=2048", "data.batch_size=16", "data.pad_to=longest",
                  "train.steps=1800", "train.lr=2e-3", "train.min_lr=2e-4", "train.warmup=50",
                  "train.eval_every=300", "train.log_every=50", "eval.max_samples=400", "data.workers=0"],
        "cnn": ["serializer.image.size=[30,20]", "model.image.size=[30,20]", "data.batch_size=16",
                "train.steps=1800", "train.warmup=50", "train.eval_every=300", "train.log_every=50",
                "eval.max_samples=400", "data.workers=0"],
        "vqa_samples": 0, "per_token_rows": 4, "answer_rows": 600, "seeds": 1, "jobs": 2, "budget": 9000,
        "aux_all": False,
    },
    "micro": {
        "images": 24, "qpi": 4, "render": "96x64", "gen_workers": 2,
        "stages": [{"length": 64, "width": 32, "layers": 1, "block": {"name": "transformer", "heads": 2}},
                   {"length": 8, "width": 16, "layers": 1, "block": {"name": "transformer", "heads": 2}}],
        "pg19": ["data.seq_len=256", "data.batch_size=4", "train.steps=6", "train.lr=2e-3", "train.warmup=2",
                 "train.eval_every=3", "train.log_every=2", "eval.split=validation", "eval.max_samples=2"],
        "clevr": ["data.batch_size=2", "train.steps=4", "train.lr=1e-3", "train.warmup=1", "train.eval_every=2",
                  "train.log_every=2", "eval.max_samples=4", "data.workers=0",
                  "serializer.image.size=[16,11]"],
        "cnn": ["data.batch_size=2", "train.steps=4", "train.warmup=1", "train.eval_every=2", "train.log_every=2",
                "eval.max_samples=4", "data.workers=0", "serializer.image.size=[16,11]",
                "model.image.size=[16,11]", "model.lstm_hidden=16", "model.mlp_hidden=16", "model.embed_dim=8",
                "model.trunk_stages=1"],
        "vqa_samples": 4, "per_token_rows": 2, "answer_rows": 3, "seeds": 2, "jobs": 2, "budget": 600,
        "aux_all": True,
    },
}
KINDS = ("png", "jpeg", "pixels")
# Arms (issue 16's second edition adds the last three): how a CLEVR run starts from the PG19 run, if at all.
# scratch and pg19 (init_from) are the first edition's; pathway = Multimodal Pathway from the PG19 run (W + lambda W'
# per linear layer); mom = modality-aware blocks (per-modality copies, MODALITY_EXPERTS) from scratch; mom_pg19 =
# the same initialised from the PG19 run (each dense tensor copied into every modality's copy).
ARMS = ("scratch", "pg19", "pathway", "mom", "mom_pg19")
MODALITY_EXPERTS = [["image"], ["question", "answer"]]


def stages_override(stages: list[dict], modality_aware: bool = False) -> str:
    """``model.stages=<flow YAML>`` (JSON is YAML) for the scale's stages, with per-modality copies if asked."""
    stages = json.loads(json.dumps(stages))
    if modality_aware:
        for st in stages:
            st["block"]["modality_experts"] = MODALITY_EXPERTS
    return f"model.stages={json.dumps(stages)}"


def arm_overrides(arm: str, pg19_run: Path) -> list[str]:
    """The overrides that make the scratch config of a kind into ``arm`` (beside the model's stages)."""
    return {"scratch": [], "mom": [], "pg19": [f"train.init_from={pg19_run}"],
            "pathway": [f"train.pathway_from={pg19_run}"], "mom_pg19": [f"train.init_from={pg19_run}"]}[arm]
CONFIG = {("png", "scratch"): "clevr_vqa_png", ("jpeg", "scratch"): "clevr_vqa_jpeg",
          ("pixels", "scratch"): "clevr_vqa_pixels", ("png", "pg19"): "pg19_to_clevr_png",
          ("jpeg", "pg19"): "transfer_pg19_to_clevr_jpeg", ("pixels", "pg19"): "transfer_pg19_to_clevr_pixels"}


class Runner:
    """Runs shell-free commands ``jobs`` at a time with dependencies, logging each to OUT/logs/.

    A free slot goes to the ready job (its dependencies done) of the lowest ``(priority, declaration order)``;
    readiness is judged when the slot frees, from the dependencies' events (set before their slot is released),
    so an evaluation whose training just ended competes at once: with ``priority=0`` for evaluations, a budget
    cut falls on trainings not yet started, not on evaluations of trainings already paid for."""

    def __init__(self, out: Path, jobs: int, deadline: float, env: dict):
        self.out, self.jobs, self.deadline, self.env = out, jobs, deadline, env
        self.cv = threading.Condition()
        self.running, self.tickets = 0, 0
        self.pending: dict[int, tuple[int, list[threading.Event]]] = {}  # ticket -> (priority, dependencies)
        self.lock = threading.Lock()
        self.status: dict[str, int | str] = {}
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.commands = open(out / "commands.txt", "a")

    def _next(self) -> int | None:
        ready = [(prio, t) for t, (prio, deps) in self.pending.items() if all(e.is_set() for e in deps)]
        return min(ready)[1] if ready else None

    def _acquire(self, ticket: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.running < self.jobs and self._next() == ticket)
            del self.pending[ticket]
            self.running += 1
            self.cv.notify_all()

    def _finish(self, ticket: int, done: threading.Event, held: bool) -> None:
        """The job's end: its event first (its dependents become ready), then its slot or its place in line."""
        with self.cv:
            done.set()
            if held:
                self.running -= 1
            self.pending.pop(ticket, None)
            self.cv.notify_all()

    def run(self, name: str, argv: list[str], after: list[threading.Event] | None = None,
            needs_ok: list[str] | None = None, priority: int = 1) -> threading.Event:
        done = threading.Event()
        with self.cv:
            ticket, self.tickets = self.tickets, self.tickets + 1
            self.pending[ticket] = (priority, list(after or []))

        def go():
            held = False
            try:
                for ev in after or []:
                    ev.wait()
                bad = [n for n in needs_ok or [] if self.status.get(n) != 0]
                if bad:
                    self.status[name] = f"skipped ({', '.join(bad)} failed)"
                    return
                self._acquire(ticket)
                held = True
                if time.time() > self.deadline - 20:
                    self.status[name] = "skipped (budget)"
                    return
                with self.lock:
                    self.commands.write(" ".join(shlex.quote(a) for a in argv) + "\n")
                    self.commands.flush()
                t0 = time.time()
                with open(self.out / "logs" / f"{name}.log", "w") as log:
                    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
                    try:
                        rc = p.wait(timeout=max(1.0, self.deadline - time.time()))
                    except subprocess.TimeoutExpired:
                        # SIGTERM first: a training checkpoints the step it reached and the same command
                        # (a later --only run with this --out) resumes it; killed if it does not end in 60 s
                        p.terminate()
                        try:
                            p.wait(timeout=60)
                            rc = "stopped (budget; resumable)"
                        except subprocess.TimeoutExpired:
                            p.kill()
                            p.wait()
                            rc = "killed (budget)"
                self.status[name] = rc
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {rc} in {time.time() - t0:.0f}s", flush=True)
            finally:
                self._finish(ticket, done, held)

        threading.Thread(target=go, daemon=True).start()
        return done


def omnibyte(*args: str) -> list[str]:
    return [sys.executable, "-m", "omnibyte", *args]


def experiment(a) -> int:
    sc = dict(SCALES[a.scale])  # --images / --clevr-set change a scale for one study (a scale search)
    if a.images:
        sc["images"] = a.images
    sc["clevr"] = [*sc["clevr"], *a.clevr_set]  # after the scale's own: they win
    seeds = list(range(a.seeds or sc["seeds"]))
    out = Path(a.out).resolve()
    runs, data = out / "runs", out / "data" / "clevr"
    runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}
    t_start = time.time()
    r = Runner(out, a.jobs or sc["jobs"], t_start + (a.budget or sc["budget"]), env)
    model = stages_override(sc["stages"])
    arms = [x for x in a.arms.split(",") if x]
    if bad := [x for x in arms if x not in ARMS]:
        raise SystemExit(f"--arms: unknown {bad}; choose from {', '.join(ARMS)}")
    kinds = [x for x in a.kinds.split(",") if x]
    if bad := [x for x in kinds if x not in KINDS] or not kinds:
        raise SystemExit(f"--kinds: unknown {bad}; choose from {', '.join(KINDS)}")
    common = [f"out_dir={runs}", "train.progress=false", "train.ckpt_every=0", "train.keep_last=1"]

    gen = ["prepare", "clevr-synth", "--out", str(data), "--images", str(sc["images"]), "--questions-per-image",
           str(sc["qpi"]), "--seed", "0", "--size", sc["render"], "--workers", str(sc["gen_workers"]), "--no-progress"]
    if a.templates:
        gen += ["--templates", a.templates]
    elif sc.get("templates"):  # a subset of the generator's own template files
        tdir = out / "templates"
        tdir.mkdir(exist_ok=True)
        for name in sc["templates"]:
            (tdir / name).write_bytes((REPO / "tasks" / "clevr_synth" / "templates" / name).read_bytes())
        gen += ["--templates", str(tdir)]
    only = {n for n in a.only.split(",") if n}  # a re-run of some runs only (their data and pretrain too)
    wanted = (lambda name: name in only) if only else (lambda name: True)
    data_ok = r.run("data", omnibyte(*gen)) if not (data / "questions").is_dir() else None
    from_pg19 = [x for x in arms if x != "scratch" and x != "mom"]
    need_pre = bool(from_pg19) and (not only or any(f"_{x}_" in n for n in only for x in from_pg19))
    pre_ok = r.run("pg19_lm", omnibyte("train", "pg19_lm", f"task.root={Path(a.pg19).resolve()}", "run_name=pg19_lm",
                                       model, *common, *sc["pg19"])) if need_pre else threading.Event()
    evaluate = [sys.executable, str(Path(__file__).resolve()), "eval", "--vqa-samples", str(sc["vqa_samples"]),
                "--answer-rows", str(sc.get("answer_rows", 0)), *(["--blind"] if a.blind else [])]
    prior_ok = r.run("prior", [sys.executable, str(Path(__file__).resolve()), "prior", str(data), str(out / "prior.json"),
                    "--vqa-samples", str(sc["vqa_samples"])], [data_ok] if data_ok else [], ["data"] if data_ok else [])
    waits = [prior_ok]
    dep_data = [data_ok] if data_ok else []
    need_data = ["data"] if data_ok else []
    for seed in seeds:  # interleave arms so every arm gets its seeds even if the budget cuts the tail
        for init in arms:
            for kind in kinds:
                name = f"{kind}_{init}_s{seed}"
                if not wanted(name):
                    continue
                config = CONFIG[kind, "pg19" if init == "pg19" else "scratch"]
                stages = stages_override(sc["stages"], modality_aware=init.startswith("mom"))
                # best.json by the answer bytes (with a loss weight on the image bytes, --clevr-set
                # serializer.loss=weights, their over-fitting named step 2,250 of 5,000 in a gpu2 probe); the study
                # itself scores every arm at its final checkpoint (eval_run: latest), all at the same step
                argv = omnibyte("train", config, f"task.root={data}", f"run_name={name}", f"seed={seed}",
                                stages, *common, "eval.select=bpb/answer", *sc["clevr"],
                                *arm_overrides(init, runs / "pg19_lm"))
                deps, need = list(dep_data), list(need_data)
                if init in from_pg19:
                    deps.append(pre_ok)
                    need.append("pg19_lm")
                trained = r.run(name, argv, deps, need)
                rows = ["--per-token-rows", str(sc["per_token_rows"] if seed == 0 else 0)]
                waits.append(r.run(f"eval_{name}", [*evaluate, *rows, str(runs / name)], [trained], [name], priority=0))
        name = f"cnn_lstm_s{seed}"
        if not a.cnn or not wanted(name):
            continue
        trained = r.run(name, omnibyte("train", "clevr_cnn_lstm", f"task.root={data}", f"run_name={name}",
                                       f"seed={seed}", *common, *sc["cnn"]), dep_data, need_data)
        waits.append(r.run(f"eval_{name}", [*evaluate, "--per-token-rows", "0", str(runs / name)], [trained], [name],
                           priority=0))
    for kind in kinds if sc["aux_all"] else ():  # last: the budget cuts these first
        name = f"{kind}_all_scratch_s0"
        if not wanted(name):
            continue
        trained = r.run(name, omnibyte("train", CONFIG[kind, "scratch"], f"task.root={data}", f"run_name={name}",
                                       "seed=0", "serializer.loss=all", model, *common, *sc["clevr"]),
                        dep_data, need_data)
        waits.append(r.run(f"eval_{name}", [*evaluate, "--per-token-rows", str(sc["per_token_rows"]),
                                            str(runs / name)], [trained], [name], priority=0))
    if not need_pre:
        pre_ok.set()
    for w in [pre_ok, *waits]:
        w.wait()
    summary = {"scale": a.scale, "seeds": seeds, "arms": arms, "kinds": kinds, "only": sorted(only), "wall_s": round(time.time() - t_start, 1), "status": r.status,
               "sizes": sc, **_environment()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    pack(runs, out / "transfer_metrics.tar.gz", extra=[out / "summary.json", out / "commands.txt", out / "prior.json"])
    failed = {k: v for k, v in r.status.items() if v != 0}
    print(json.dumps({"wall_s": summary["wall_s"], "failed": failed}, default=str), flush=True)
    return 1 if failed else 0


def _environment() -> dict:
    try:
        import torch

        from omnibyte.provenance import git_state

        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        git = git_state()  # OMNIBYTE_COMMIT on a copy without .git (the device), else the checkout's HEAD
        return {"torch": torch.__version__, "device": dev, "cpus": os.cpu_count(), "commit": git["commit"],
                "dirty": git["dirty"]}
    except Exception as e:  # pragma: no cover - informational only
        return {"environment_error": repr(e)}


def pack(runs: Path, dest: Path, extra: list[Path] = ()) -> Path:
    """Metrics only: config.resolved.yaml, metrics.jsonl, eval/*.json, eval/*.h5, the per-question VQA records,
    train.log; no checkpoints."""
    with tarfile.open(dest, "w:gz") as tar:
        for run in sorted(p for p in runs.iterdir() if p.is_dir()):
            files = [run / "config.resolved.yaml", run / "metrics.jsonl", run / "train.log",
                     *sorted((run / "eval").glob("*.json")), *sorted((run / "eval").glob("*.h5")),
                     *sorted((run / "eval").glob("vqa_*_predictions.jsonl"))]  # per question: paired comparisons
            for f in files:
                if f.is_file():
                    tar.add(f, arcname=f"transfer/{f.relative_to(runs)}")
        for f in extra:
            if f.is_file():
                tar.add(f, arcname=f"transfer/{f.name}")
    return dest


def eval_run(a) -> int:
    """VQA accuracy by question type (closed-set ranking through ``score``, for byte models and the CNN+LSTM
    alike) and a few rows of per-token losses, through the library's own run evaluation. Every result is of the
    run's final checkpoint (``latest``: every arm at the same step, no selection on the split scored)."""
    from omnibyte.run import evaluate_run, load_run

    run = load_run(a.run_dir, "latest", overrides=["task.eval_mode=rank"])
    _write_cost(run, Path(a.run_dir) / "eval" / "cost.json")
    if a.per_token_rows and run.model.stream_meta.per_token_losses:
        evaluate_run(run, max_samples=a.per_token_rows, per_token=True, task_metrics=False, progress=False)
    if a.answer_rows and run.model.stream_meta.per_token_losses:
        # per-token losses of the first N val questions in a folder of their own (report.py's answer-loss split:
        # first answer byte against the rest), apart from eval/ where the heat-map rows and VQA results live
        res = evaluate_run(run, max_samples=a.answer_rows, per_token=True, task_metrics=False, progress=False,
                           out_dir=Path(a.run_dir) / "eval" / "answer_rows")
        from omnibyte.analysis import answer_loss_split, per_token_losses

        rows = per_token_losses(res["per_token"])
        split = {"split": res["split"], "step": res["step"], "rows": len(rows), "unit": "nats",
                 **answer_loss_split(rows)}
        (Path(a.run_dir) / "eval" / f"answer_split_{res['split']}.json").write_text(json.dumps(split, indent=1))
    if not a.skip_vqa:
        # task metrics only (no second bits-per-byte pass); they join the record of the call above, whose bpb and
        # per-token file stay: eval/val_<step>.json keeps this checkpoint's VQA results, which analysis reads by step
        res = evaluate_run(run, max_samples=a.vqa_samples, per_token=False, task_metrics=True, progress=False,
                           bpb=False)
        print(json.dumps({k: v for k, v in res.get("task", {}).items() if not isinstance(v, dict)}
                         | {"step": run.step}, default=str))
    if a.blind:  # the same questions with every image blanked to its mean colour: what the image adds
        from omnibyte.robustness.evaluate import run_robustness

        run_robustness(run, corruptions=["blank"], limit=a.vqa_samples, progress=False,
                       out=Path(a.run_dir) / "eval" / f"blind_{run.config.eval.split}.json")
    return 0


def _write_cost(run, path: Path) -> None:
    """Parameters (all, and trained: a pathway run's W' and lambda too, read from its checkpoint, since it loads
    merged) and model FLOPs per training step at
    ``data.batch_size`` rows of ``data.seq_len`` bytes (an upper bound under ``pad_to: longest``), for the
    study's cost column (``omnibyte.model.flops``; a classifier without MBLM stages gets no FLOP count)."""
    from omnibyte.model.flops import PATHWAY_FLOPS_PER_AUX_ELEMENT, train_flops_per_step

    model, cfg = run.model, run.config
    rec = {"params": sum(p.numel() for p in model.parameters()),
           "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    aux_weights = 0
    if cfg.train.pathway_from:  # the run loads merged (W + lambda W'); it trained W' and lambda beside W
        from safetensors import safe_open

        from omnibyte.pathway import AUX_KEYS

        with safe_open(str(Path(run.checkpoint) / "model.safetensors"), "pt") as f:
            aux = {k: f.get_slice(k).get_shape() for k in f.keys() if k.rsplit(".", 1)[-1] in AUX_KEYS}
        count = {k: math.prod(shape) for k, shape in aux.items()}  # () -> 1: lambda
        aux_weights = sum(n for k, n in count.items() if k.endswith("aux_weight"))
        trains_aux = cfg.train.pathway_train_aux
        rec["params_trained"] += sum(n for k, n in count.items() if trains_aux or k.endswith("pathway_lambda"))
        rec["params"] += sum(count.values())
        rec["pathway_aux_weights"] = aux_weights
    if hasattr(model, "num_stages"):
        rec.update(flops_per_step=train_flops_per_step(model, cfg.data.batch_size, cfg.data.seq_len)
                   + PATHWAY_FLOPS_PER_AUX_ELEMENT * aux_weights,
                   batch=cfg.data.batch_size, length=cfg.data.seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))


def prior(a) -> int:
    """Answer priors on the same val questions the models are scored on: the most frequent train answer
    overall, per question type, and per question family (what a model that ignores the image can reach)."""
    from collections import Counter, defaultdict

    from omnibyte.tasks.clevr import program_function, question_type

    def load(split):
        qs = json.loads((Path(a.data) / "questions" / f"CLEVR_{split}_questions.json").read_text())["questions"]
        return [(q["answer"], question_type(program_function(q.get("program"))), q.get("question_family_index"))
                for q in qs]

    # the val questions evaluation scores: with --vqa-samples N, the N that evaluate_run spreads over the split
    # (omnibyte.data.sources.subset_positions), not the first N, which were another, image-clustered set
    from omnibyte.data.sources import subset_positions, subset_record

    train, every = load("train"), load("val")
    val = [every[i] for i in subset_positions(len(every), a.vqa_samples)]
    res = {"num_train": len(train), "num_val": len(val), "val_subset": subset_record(len(every), a.vqa_samples)}
    for key, idx in (("overall", None), ("qtype", 1), ("family", 2)):
        counts = defaultdict(Counter)
        for q in train:
            counts[None if idx is None else q[idx]][q[0]] += 1
        best = {k: c.most_common(1)[0][0] for k, c in counts.items()}
        hits = [v[0] == best.get(None if idx is None else v[idx]) for v in val]
        res[f"majority_by_{key}"] = sum(hits) / max(1, len(hits))
        by = defaultdict(list)  # each prior on each question type: what an arm's per-type accuracy must beat
        for v, h in zip(val, hits):
            by[v[1]].append(h)
        res[f"majority_by_{key}_per_qtype"] = {k: sum(h) / len(h) for k, h in sorted(by.items())}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prior"]:
        p = argparse.ArgumentParser(prog="run_transfer.py prior")
        p.add_argument("data")
        p.add_argument("out")
        p.add_argument("--vqa-samples", type=int, default=500)
        return prior(p.parse_args(argv[1:]))
    if argv[:1] == ["eval"]:
        p = argparse.ArgumentParser(prog="run_transfer.py eval")
        p.add_argument("run_dir")
        p.add_argument("--vqa-samples", type=int, default=500)
        p.add_argument("--per-token-rows", type=int, default=4)
        p.add_argument("--answer-rows", type=int, default=0,
                       help="per-token losses of the first N val streams into eval/answer_rows/ (0: none)")
        p.add_argument("--skip-vqa", action="store_true", help="no VQA scoring (e.g. to add --answer-rows or --blind later)")
        p.add_argument("--blind", action="store_true",
                       help="also score the questions with every image blanked (eval/blind_<split>.json: the "
                            "robustness table of clean and `blank`, with paired changes per question type)")
        return eval_run(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--pg19", required=True, help="PG19-layout folder (../shared/data/pg19-mini)")
    p.add_argument("--scale", choices=sorted(SCALES), default="gpu")
    p.add_argument("--seeds", type=int, default=0)
    p.add_argument("--jobs", type=int, default=0)
    p.add_argument("--budget", type=float, default=0, help="seconds for everything (default: the scale's)")
    p.add_argument("--templates", default="", help="CLEVR template folder for the generator (default: its own)")
    p.add_argument("--arms", default="scratch,pg19",
                   help=f"comma-separated arms of {', '.join(ARMS)} (second edition: all of them)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated serializers of {', '.join(KINDS)}")
    p.add_argument("--cnn", action=argparse.BooleanOptionalAction, default=True,
                   help="train the CNN+LSTM baseline too (--no-cnn: byte models only)")
    p.add_argument("--images", type=int, default=0, help="generated images (default: the scale's)")
    p.add_argument("--clevr-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every CLEVR byte arm, after the scale's (repeatable)")
    p.add_argument("--blind", action=argparse.BooleanOptionalAction, default=True,
                   help="score every arm also with its images blanked (the blind control: does it use the image?)")
    p.add_argument("--only", default="", help="comma-separated run names to (re)make, e.g. png_scratch_s2 (default: all)")
    return experiment(p.parse_args(argv))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
