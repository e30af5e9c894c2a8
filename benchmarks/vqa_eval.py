"""VQA scoring speed: questions/s of closed-set ranking (rank mode) on one device, before and after, one process.

    python benchmarks/vqa_eval.py --config clevr_vqa_png --questions 500 [--task-root DIR] [--device cuda]
    python benchmarks/vqa_eval.py --preset cpu --questions 40 --images 30      # a quick CPU check

Builds the config's model (``--preset full``: the default 16M model; random weights -- speed does not depend on
them), serializes the first ``--questions`` val questions of a CLEVR-format set (``--task-root``, else one is
generated into ``--data`` with the offline generator), and ranks the task's answer vocabulary after each
prompt with each scorer (``--scorer``), under the run's precision policy (bf16 autocast on CUDA):

* ``loop`` (before): :meth:`omnibyte.model.api.StreamModel.score_batch` -- one ``Decoder.score`` per question
  (the prefix processed once, its cache fanned out to the candidates, then one byte per step);
* ``batched`` (after): the model's own ``score_batch`` (MBLM: :mod:`omnibyte.model.inference.scoring`), called
  on ``--batch`` questions at a time as ``tasks/vqa_eval.py`` does (default its ``RANK_BATCH``).

Each scorer gets untimed warm-up calls first (Triton JIT and autotuning). One JSON line per scorer
(questions/s), then one comparing them: speedup, the share of identical predictions (argmax), the largest score
difference, and the questions whose reference top-2 margin is within twice that difference (``near_ties``:
rounding may order those either way; ``same_predictions_decided`` counts the others).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import device_name, emit, now, sync

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from omnibyte.tasks.vqa_eval import RANK_BATCH

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="clevr_vqa_png")
    p.add_argument("--preset", default="full", help="the config's preset (full: the default 16M model; cpu)")
    p.add_argument("--questions", type=int, default=500)
    p.add_argument("--batch", type=int, default=RANK_BATCH, help="questions per score_batch call (batched)")
    p.add_argument("--scorer", choices=("both", "loop", "batched"), default="both")
    p.add_argument("--task-root", default="", help="a CLEVR-layout folder (default: generate one into --data)")
    p.add_argument("--data", default="/tmp/omnibyte-vqa-bench")
    p.add_argument("--images", type=int, default=400, help="images to generate when there is no --task-root")
    p.add_argument("--workers", type=int, default=0, help="processes generating the set (0: this one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from omnibyte.data.items import eval_items
    from omnibyte.model.api import StreamModel
    from omnibyte.precision import autocast, use_bf16
    from omnibyte.run import build_components, resolve_data_config
    from omnibyte.runconfig import load_run_config
    from omnibyte.tasks.vqa_eval import answer_candidates, prompt_of

    root = args.task_root
    if not root:
        root = args.data
        if not (Path(root) / "questions").is_dir():
            from omnibyte.tasks.clevr_synth import generate

            generate(root, images=args.images, questions_per_image=10, seed=0, size=(480, 320),
                     splits=("train", "val"), progress=False, workers=args.workers)
    cfg = resolve_data_config(load_run_config(args.config, [f"preset={args.preset}", f"task.root={root}"]))
    task, serializer, model = build_components(cfg)
    torch.manual_seed(0)
    model.to(args.device).eval()
    bf16 = use_bf16(cfg.train.precision, torch.device(args.device))
    items = list(eval_items(cfg.data, task, serializer, cfg.eval.split, max_samples=args.questions))
    if not items:
        raise SystemExit(f"no {cfg.eval.split} questions under {root}")
    prefixes = [torch.as_tensor(prompt_of(it).tokens.astype("int64"), device=args.device) for it in items]
    cands = answer_candidates(task.answer_vocab)
    lengths = [len(x) for x in prefixes]
    common = dict(bench="vqa_eval", config=args.config, preset=args.preset, device=device_name(args.device),
                  questions=len(items), answers=len(cands), bf16=bf16,
                  params=sum(q.numel() for q in model.parameters()),
                  prompt_bytes=[min(lengths), round(sum(lengths) / len(lengths)), max(lengths)])

    def timed(fn, batch, warm):
        out = []
        with torch.no_grad(), autocast(torch.device(args.device), bf16):
            fn(prefixes[:warm])  # warm-up: kernels compiled / autotuned outside the timing
            sync(args.device)
            t0 = now()
            for i in range(0, len(prefixes), batch):
                out.append(fn(prefixes[i:i + batch]).float().cpu())
            sync(args.device)
        return torch.cat(out), now() - t0

    scores, secs = {}, {}
    paths = {"batched": (lambda xs: model.score_batch(xs, cands), args.batch, args.batch),
             "loop": (lambda xs: StreamModel.score_batch(model, xs, cands), args.batch, 4)}
    for name in ("batched", "loop"):
        if args.scorer in (name, "both"):
            fn, batch, warm = paths[name]
            scores[name], secs[name] = timed(fn, batch, warm)
            emit({**common, "scorer": name, "batch": batch if name == "batched" else 1,
                  "seconds": round(secs[name], 3), "questions_per_s": round(len(items) / secs[name], 1)}, args.out)
    if len(scores) == 2:
        new, ref = scores["batched"], scores["loop"]
        diff = float((new - ref).abs().max())
        top2 = ref.topk(min(2, ref.shape[1]), dim=1).values
        decided = (top2[:, 0] - top2[:, -1]) > 2 * diff
        same = new.argmax(1) == ref.argmax(1)
        emit({**common, "scorer": "compare", "speedup": round(secs["loop"] / secs["batched"], 2),
              "same_predictions": round(same.float().mean().item(), 4), "max_abs_score_diff": diff,
              "near_ties": int((~decided).sum()), "same_predictions_decided": round(
                  same[decided].float().mean().item(), 4) if decided.any() else None}, args.out)


if __name__ == "__main__":
    main()
