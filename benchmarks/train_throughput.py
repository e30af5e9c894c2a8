"""Training throughput: bytes/s, MFU and peak memory of full training steps (AdamW, grad clip 1.0).

    python benchmarks/train_throughput.py --preset mblm360m --impl omnibyte [--batch 6] [--length 8192]
    python benchmarks/train_throughput.py --preset mblm360m --impl mblm      # mblm 0.4.2, same config
    python benchmarks/train_throughput.py --preset mblm360m --impl both      # each in its own subprocess
    python benchmarks/train_throughput.py --preset small --impl both --device cpu
    python benchmarks/train_throughput.py --preset clevr --impl inproc   # the shipped 15.8M model at a CLEVR PNG row (16 x 3,072)
    python benchmarks/train_throughput.py --preset mblm360m --impl inproc --order omnibyte,mblm,omnibyte+compile
                                        # all in ONE process: mamba-ssm's Triton JIT/autotune is paid once

A step = forward + masked next-byte loss + backward + clip_grad_norm(1.0) + AdamW step, under bf16 autocast
on CUDA (fp32 params), fp32 on CPU. ``--warmup`` steps (Triton JIT, cudnn autotune) are not timed; the
``--steps`` after them are. bytes/s = batch * length * steps / seconds. MFU = model FLOPs (see
_common.train_flops_per_step, on the shared configuration) / seconds / 989 TFLOP/s, reported only for a model
within 2% of that configuration's parameter count (mblm's feed-forward differs in some presets: no MFU there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from _common import (
    H100_BF16_PEAK,
    ROOT,
    SHAPES,
    build_mblm,
    build_omnibyte,
    device_name,
    emit,
    now,
    param_count,
    stub_selective_scan_cuda,
    sync,
    train_flops_per_step,
    use_device,
)


def run(args) -> dict:
    dev = args.device
    torch.manual_seed(0)
    if args.impl == "mblm":
        if dev.startswith("cuda"):
            stub_selective_scan_cuda()
        model = build_mblm(args.preset).to(dev)
        vocab = 257
    else:
        model = build_omnibyte(args.preset).to(dev)
        vocab = 256
        if args.compile:  # as the engine's ``train.compile``: each layer, except Mamba layers on the kernels
            from omnibyte.parallel import apply_compile

            apply_compile(model)
        if args.graphs:  # the stages on mamba-ssm's kernels as CUDA graphs (launch-bound otherwise)
            from omnibyte.parallel import apply_stage_graphs

            apply_stage_graphs(model)
    ref = build_omnibyte(args.preset)  # FLOP count on the shared configuration
    flops = train_flops_per_step(ref, args.batch, args.length)
    ref_params = param_count(ref)
    del ref
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.startswith("cuda"))
    x = torch.randint(0, vocab - 1, (args.batch, args.length), device=dev)
    mask = torch.ones(args.batch, args.length, device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda"),
                            cache_enabled=not args.graphs):
            if args.impl == "mblm":
                from mblm import MBLMReturnType

                loss = model(x, return_type=MBLMReturnType.LOSS)
            else:
                from omnibyte.loss import compute_loss

                loss = compute_loss(model, x, mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = now()
    for _ in range(args.warmup):
        loss = step()
    sync(dev)
    warm = now() - t0
    if args.profile and dev.startswith("cuda"):
        profile_step(step, args.profile)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = now()
    for _ in range(args.steps):
        loss = step()
    sync(dev)
    dt = now() - t0
    bps = args.batch * args.length * args.steps / dt
    rec = dict(bench="train_throughput", impl=args.impl, preset=args.preset, device=device_name(dev),
               batch=args.batch, length=args.length, steps=args.steps, warmup_steps=args.warmup, seconds=round(dt, 3),
               step_ms=round(1000 * dt / args.steps, 1), bytes_per_s=round(bps), params=param_count(model),
               loss=round(float(loss.detach()), 4), warmup_s=round(warm, 1), compile=bool(args.compile),
               graphs=bool(getattr(args, "graphs", False)),
               threads=torch.get_num_threads() if dev == "cpu" else None)
    if args.impl == "mblm":  # which Mamba mblm really ran (its import falls back to Mamba-1 silently)
        rec["mblm_global_block"] = type(model.stage_models[0]).__module__ + "." + type(model.stage_models[0]).__name__
    # the shared FLOP count describes this model only when it is the same size (mblm's feed-forward differs from
    # omnibyte's SwiGLU in the pg19_lm / clevr presets: its MFU would be counted with FLOPs it does not do)
    same_size = abs(rec["params"] - ref_params) <= 0.02 * ref_params
    rec["flops_per_step"] = flops if same_size else None
    if dev.startswith("cuda"):
        rec["mfu"] = round(flops * args.steps / dt / H100_BF16_PEAK, 4) if same_size else None
        if not same_size:
            rec["mfu_note"] = (f"{rec['params']} parameters against the shared configuration's {ref_params}: "
                               f"the shared FLOP count does not describe this model")
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.impl == "omnibyte":
        from omnibyte.model.blocks import ssm_stack

        rec["mamba_paths"] = sorted(ssm_stack._logged)
    return rec


def profile_step(step, rows: int) -> None:
    """Print one training step's CUDA kernels (most GPU time first), its busiest CPU ops, and the step's
    wall time next to the summed kernel time (the gap is GPU idle: launch-bound phases). On stderr."""
    from torch.profiler import ProfilerActivity, profile

    t0 = now()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = now() - t0
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60),
          file=sys.stderr, flush=True)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60),
          file=sys.stderr, flush=True)
    gpu = sum(e.self_device_time_total for e in ka) / 1e3
    print(f"profiled step: wall {1000 * wall:.1f} ms (with profiler overhead), kernels {gpu:.1f} ms",
          file=sys.stderr, flush=True)


def run_inproc(args) -> None:
    """Run the implementations of ``--order`` one after another in this process (``omnibyte+compile`` =
    omnibyte with ``--compile``). mblm is imported first so both use the same mamba-ssm modules, and the
    Triton kernels they share (same shapes) are compiled and autotuned once."""
    import copy
    import gc

    order = [o.strip() for o in args.order.split(",") if o.strip()]
    if "mblm" in order and args.device.startswith("cuda"):
        stub_selective_scan_cuda()
        import mblm  # noqa: F401  (the full mamba_ssm import before omnibyte's loader looks for it)
    results = {}
    from omnibyte.model.blocks.transformer import Attention

    default_attn = Attention.short_impl
    for name in order:
        a = copy.copy(args)
        a.impl, *extra = name.split("+")
        a.compile, a.graphs = "compile" in extra, "graphs" in extra
        from omnibyte.model.blocks.transformer import Attention

        Attention.short_impl = default_attn
        for flag in extra:  # e.g. omnibyte+compile+attn=matmul: Attention.short_impl
            if flag.startswith("attn="):
                Attention.short_impl = flag.split("=", 1)[1]
        a.profile = args.profile if name == order[0] or a.impl == "omnibyte" else 0
        t0 = now()
        try:
            rec = run(a)
        except Exception as e:  # noqa: BLE001 - report and go on with the next implementation
            rec = dict(bench="train_throughput", impl=name, preset=args.preset, error=f"{type(e).__name__}: {e}")
        rec["inproc_order"] = order
        rec["wall_s"] = round(now() - t0, 1)
        emit(rec, args.out)
        if "bytes_per_s" in rec:
            results[name] = rec["bytes_per_s"]
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "mblm" in results:
        for name, bps in results.items():
            if name != "mblm":
                emit(dict(bench="train_throughput_ratio", preset=args.preset, impl=name, same_process=True,
                          device=device_name(args.device), omnibyte_bytes_per_s=bps,
                          mblm_bytes_per_s=results["mblm"], ratio=round(bps / results["mblm"], 2)), args.out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mblm360m")
    p.add_argument("--impl", choices=["omnibyte", "mblm", "both", "inproc"], default="both")
    p.add_argument("--order", default="omnibyte,mblm,omnibyte+compile",
                   help="--impl inproc: implementations in run order: mblm, omnibyte[+compile][+graphs][+attn=IMPL]")
    p.add_argument("--profile", type=int, default=0, help="print the top N CUDA kernels of one step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: the preset's, else 6)")
    p.add_argument("--length", type=int, default=None, help="bytes per row (default: the preset's, else 8192)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile each layer (omnibyte only)")
    p.add_argument("--graphs", action="store_true", help="CUDA graphs for the Mamba-kernel stages (omnibyte)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args()
    use_device(args.device)  # cuda:N: memory statistics and synchronisation follow it, not GPU 0
    shape = SHAPES.get(args.preset, (6, 8192))
    args.batch = args.batch or shape[0]
    args.length = args.length or shape[1]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl == "inproc":
        run_inproc(args)
        return
    if args.impl == "both":
        results = {}
        for impl in ("mblm", "omnibyte"):
            argv = list(sys.argv[1:])
            if "--out" in argv:  # the parent writes the children's lines
                i = argv.index("--out")
                del argv[i:i + 2]
            cmd = [sys.executable, __file__] + argv + ["--impl", impl]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
            sys.stderr.write(proc.stderr[-3000:])
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                emit(dict(bench="train_throughput", impl=impl, preset=args.preset, error=proc.stderr[-500:]),
                     args.out)
                continue
            import json

            results[impl] = json.loads(lines[-1])
            print(lines[-1], flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(lines[-1] + "\n")
        if len(results) == 2:
            emit(dict(bench="train_throughput_ratio", preset=args.preset, device=results["omnibyte"]["device"],
                      omnibyte_bytes_per_s=results["omnibyte"]["bytes_per_s"],
                      mblm_bytes_per_s=results["mblm"]["bytes_per_s"],
                      ratio=round(results["omnibyte"]["bytes_per_s"] / results["mblm"]["bytes_per_s"], 2)),
                 args.out)
        return
    emit(run(args), args.out)


if __name__ == "__main__":
    main()
