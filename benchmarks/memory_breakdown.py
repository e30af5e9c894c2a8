"""Where a long-context training step's memory goes, per part of the model (issue 18 item 5: "say what limits it
next").

    python benchmarks/memory_breakdown.py [--preset ctx3] [--kib 256] [--activation-checkpointing] [--device cpu]

One forward of ``compute_loss`` at ``--kib`` KiB (batch 1, bf16 autocast on CUDA, fp32 on CPU), counting every
tensor autograd saves for backward (unique storages, by the part of the model running when it was saved: each
global-stage layer, the global-stage input embeddings, the inner stages + head + loss, which ``inner_chunk_bytes``
already runs in checkpointed chunks), plus weights, gradients and AdamW's two moments. Printed per input byte, so
it scales to any context: activation bytes grow with the context, the rest does not. With
``--activation-checkpointing`` each layer keeps only its input (``train.activation_checkpointing``).

The global stage's saved tensors depend on the Mamba-2 implementation: on CPU the pure-PyTorch twin, on CUDA
mamba-ssm's Triton kernels; the Transformer stages and the loss are the same code on both. One JSON line per
run (``--out``).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from _common import build_omnibyte, device_name, emit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ctx3")
    p.add_argument("--kib", type=int, default=256, help="context in KiB (a multiple of the patch product)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--chunk-bytes", type=int, default=1 << 18, help="model.inner_chunk_bytes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_omnibyte(args.preset, inner_chunk_bytes=args.chunk_bytes).to(dev).train()
    if args.activation_checkpointing:
        from omnibyte.parallel import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    from omnibyte.loss import compute_loss

    # which part of the model is running: forward pre/post hooks push and pop a label
    where: list[str] = ["outside the stages"]
    labels = {}
    for s, blk in enumerate(model.blocks):
        for i, layer in enumerate(blk.layers):
            labels[layer] = f"stage {s} layer {i}" if s == 0 else f"stage {s}"
    for mod, name in labels.items():
        mod.register_forward_pre_hook(lambda m, a, _n=name: where.append(_n))  # (a hook's non-None return would
        mod.register_forward_hook(lambda m, a, o: where.pop() and None)        # replace the output)
    saved: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key and key not in saved:
            saved[key] = (where[-1], st.nbytes())
        return t

    size = args.kib * 1024
    x = torch.randint(0, 256, (1, size), device=dev)
    mask = torch.ones(1, size, device=dev)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = compute_loss(model, x, mask)
    parts: dict[str, int] = defaultdict(int)
    for name, n in saved.values():
        key = "stage 0 layers" if name.startswith("stage 0 layer") else name
        parts[key] += n
    out.loss.backward()
    params = sum(q.numel() * q.element_size() for q in model.parameters())
    fixed = {"weights": params, "gradients": params, "adamw_moments": 2 * sum(q.numel() * 4 for q in model.parameters())}
    per_byte = {k: round(v / size, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
    rec = dict(bench="memory_breakdown", preset=args.preset, device=device_name(str(dev)), context_bytes=size,
               activation_checkpointing=args.activation_checkpointing, chunk_bytes=args.chunk_bytes,
               saved_bytes_per_input_byte=per_byte, saved_total_per_input_byte=round(sum(parts.values()) / size, 2),
               fixed_gib={k: round(v / 2**30, 3) for k, v in fixed.items()})
    emit(rec, args.out)


if __name__ == "__main__":
    main()
