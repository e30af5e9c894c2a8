"""Trainable context length: double the input of the 3-stage model until a training step fails.

    python benchmarks/max_context.py [--start-mib 1] [--max-mib 1024] [--time-cap 240] [--step-cap 90]

Model: preset ``ctx3`` (widths 1024/512/256, layers 6/4/2, patches x64 x8; Mamba-2 global, Transformer
inner stages), batch 1, bf16 autocast, AdamW, grad clip 1.0. The loss goes through
``omnibyte.loss.compute_loss`` (inner stages + head + NLL in checkpointed chunks of
``model.inner_chunk_bytes``; global-stage input embeddings in checkpointed chunks), so activation memory
grows by a few bytes per input byte. One JSON line per size: ok / oom / error, step seconds, peak memory.
The sweep stops at the first failure, at ``--max-mib``, or when the next size would exceed the time caps
(the step time roughly doubles with the size); then the largest size that trained is the lower bound it
reports, with the reason it stopped.
"""

from __future__ import annotations

import argparse
import gc
import math

import torch
from _common import (
    H100_BF16_PEAK,
    build_omnibyte,
    device_name,
    emit,
    now,
    sync,
    train_flops_per_step,
    use_device,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="ctx3")
    p.add_argument("--device", default="cuda")
    p.add_argument("--start-mib", type=float, default=1)
    p.add_argument("--max-mib", type=float, default=1024)
    p.add_argument("--time-cap", type=float, default=240, help="stop before the sweep's total time passes this")
    p.add_argument("--step-cap", type=float, default=90, help="stop before a single step would take longer")
    p.add_argument("--chunk-bytes", type=int, default=1 << 18)
    p.add_argument("--warmup-mib", type=float, default=1)
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer in backward (train.activation_checkpointing): a layer keeps its input "
                        "only; benchmarks/memory_breakdown.py says what that saves")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    use_device(args.device)  # cuda:N: memory statistics and synchronisation follow it, not GPU 0
    dev = args.device
    cuda = dev.startswith("cuda")  # on CPU: no peak-memory figure (a smoke run of the sweep)
    torch.manual_seed(0)
    model = build_omnibyte(args.preset, inner_chunk_bytes=args.chunk_bytes).to(dev).train()
    if args.activation_checkpointing:
        from omnibyte.parallel import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    from omnibyte.loss import compute_loss

    # one untimed step at --warmup-mib first: Triton JIT / autotuning must not count as a step's time
    w = int(args.warmup_mib * 2**20)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        compute_loss(model, torch.randint(0, 256, (1, w), device=dev), torch.ones(1, w, device=dev)).loss.backward()
    opt.zero_grad(set_to_none=True)
    sync(dev)
    size = int(args.start_mib * 2**20)
    t_start = now()
    best, last_step, stop = 0, 0.0, "max-mib reached"
    while size <= args.max_mib * 2**20:
        if last_step and (last_step * 2.2 > args.step_cap or now() - t_start + last_step * 2.2 > args.time_cap):
            stop = f"time cap (next step estimated at {last_step * 2.2:.0f} s)"
            break
        rec = dict(bench="max_context", preset=args.preset, device=device_name(dev), bytes=size,
                   mib=size / 2**20, activation_checkpointing=args.activation_checkpointing,
                   chunk_bytes=args.chunk_bytes, warmup_mib=args.warmup_mib)
        try:
            x = torch.randint(0, 256, (1, size), device=dev)
            mask = torch.ones(1, size, device=dev)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync(dev)
            t0 = now()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = compute_loss(model, x, mask)
            out.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            last_step = now() - t0
            loss, gnorm = float(out.loss.detach()), float(gnorm)
            # random bytes: a sane first steps' loss is near ln(256) = 5.55; garbage reads show up as inf/nan or
            # far off (the int32-offset reads of mamba-ssm's kernels did); not a proof, the GPU test is
            sane = math.isfinite(loss) and math.isfinite(gnorm) and abs(loss - math.log(256)) < 1.0
            rec.update(status="ok" if sane else "bad_values", step_s=round(last_step, 2), loss=round(loss, 4),
                       grad_norm=round(gnorm, 4),
                       bytes_per_s=round(size / last_step),
                       mfu=round(train_flops_per_step(model, 1, size) / last_step / H100_BF16_PEAK, 4) if cuda
                       else None,
                       peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
            if sane:
                best = size
            else:
                stop = "bad values (loss or gradient norm)"
        except torch.cuda.OutOfMemoryError as e:
            rec.update(status="oom", error=str(e).splitlines()[0][:200])
            stop = "OOM"
        except RuntimeError as e:  # e.g. a kernel's index limit
            rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
            stop = "error"
        emit(rec, args.out)
        x = mask = out = None  # noqa: F841
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if rec["status"] != "ok":
            break
        size *= 2
    emit(dict(bench="max_context_summary", preset=args.preset, device=device_name(dev),
              activation_checkpointing=args.activation_checkpointing,
              max_trained_mib=best / 2**20, stopped_by=stop, sweep_s=round(now() - t_start, 1)), args.out)


if __name__ == "__main__":
    main()
