"""VQA scoring speed: questions/s of closed-set ranking (rank mode) on one device, reference vs fast path.

    python benchmarks/vqa_eval.py --config clevr_vqa_png --questions 500 [--task-root DIR] [--device cuda]

Builds the config's model (``preset=full``: the default 16M model; random weights -- speed does not depend on
them), serializes the first ``--questions`` val questions of a CLEVR-format set (``--task-root``, else one is
generated into ``--data`` with the offline generator), and ranks the task's answer vocabulary after each
prompt twice, under the run's precision policy (bf16 autocast on CUDA):

* ``reference``: :meth:`omnibyte.model.api.StreamModel.score_batch` -- one ``score`` per question (the prefix
  processed once and its cache fanned out to the candidates), the scorer VQA evaluation used before;
* ``fast``: the model's own ``score_batch`` (MBLM: batched across questions).

It prints one JSON line per path (questions/s) and one comparing them: the share of identical predictions
(argmax) and the largest score difference, which must be ~0 (same predictions as the reference scorer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import device_name, emit, now, sync

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="clevr_vqa_png")
    p.add_argument("--questions", type=int, default=500)
    p.add_argument("--batch", type=int, default=64, help="questions per score_batch call")
    p.add_argument("--task-root", default="", help="a CLEVR-layout folder (default: generate one into --data)")
    p.add_argument("--data", default="/tmp/omnibyte-vqa-bench")
    p.add_argument("--images", type=int, default=400, help="images to generate when there is no --task-root")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-reference", action="store_true")
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
                     splits=("train", "val"), progress=False, workers=0)
    cfg = resolve_data_config(load_run_config(args.config, ["preset=full", f"task.root={root}"]))
    task, serializer, model = build_components(cfg)
    torch.manual_seed(0)
    model.to(args.device).eval()
    bf16 = use_bf16(cfg.train.precision, torch.device(args.device))
    items = list(eval_items(cfg.data, task, serializer, cfg.eval.split, max_samples=args.questions))
    prefixes = [torch.as_tensor(prompt_of(it).tokens.astype("int64"), device=args.device) for it in items]
    cands = answer_candidates(task.answer_vocab)
    lengths = [len(x) for x in prefixes]
    common = dict(bench="vqa_eval", config=args.config, device=device_name(args.device), questions=len(items),
                  answers=len(cands), batch=args.batch, bf16=bf16,
                  params=sum(q.numel() for q in model.parameters()),
                  prompt_bytes=[min(lengths), round(sum(lengths) / len(lengths)), max(lengths)])

    def timed(fn):
        out = []
        with torch.no_grad(), autocast(torch.device(args.device), bf16):
            fn(prefixes[: min(4, len(prefixes))])  # warm-up: kernels compiled / autotuned outside the timing
            sync(args.device)
            t0 = now()
            for i in range(0, len(prefixes), args.batch):
                out.append(fn(prefixes[i:i + args.batch]).float().cpu())
            sync(args.device)
        return torch.cat(out), now() - t0

    fast, t_fast = timed(lambda xs: model.score_batch(xs, cands))
    emit({**common, "path": "fast", "seconds": round(t_fast, 3), "questions_per_s": round(len(items) / t_fast, 1)},
         args.out)
    if args.skip_reference:
        return
    ref, t_ref = timed(lambda xs: StreamModel.score_batch(model, xs, cands))
    emit({**common, "path": "reference", "seconds": round(t_ref, 3),
          "questions_per_s": round(len(items) / t_ref, 1)}, args.out)
    same = (fast.argmax(1) == ref.argmax(1)).float().mean().item()
    emit({**common, "path": "compare", "speedup": round(t_ref / t_fast, 2), "same_predictions": round(same, 4),
          "max_abs_score_diff": float((fast - ref).abs().max())}, args.out)


if __name__ == "__main__":
    main()
