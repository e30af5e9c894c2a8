"""mamba-ssm's real Triton kernels on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set before triton
is imported: run this module in a fresh process), as the namespace ``load_mamba_kernels`` returns on CUDA. The
interpreter computes the kernels' dot products exactly in fp32 (no TF32), so they match the twin to rounding.

    TRITON_INTERPRET=1 python tests/interpreted_kernels.py     # prints one JSON line of errors per case
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
import types

import torch


def load():
    # the kernels' launch wrappers ask CUDA for the device and its SM count: answer for the CPU
    torch.cuda.device = lambda idx: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(multi_processor_count=4)
    spec = importlib.util.find_spec("mamba_ssm")
    if "mamba_ssm" not in sys.modules:  # the bare package: its __init__ imports the CUDA extension
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["mamba_ssm"] = pkg
    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    lng = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    from triton.runtime.autotuner import Autotuner

    for mod in list(sys.modules.values()):  # autotuning benchmarks on a GPU driver: keep one config each
        if getattr(mod, "__name__", "").startswith("mamba_ssm"):
            for obj in list(vars(mod).values()):
                if isinstance(obj, Autotuner):
                    obj.configs = obj.configs[:1]
    return types.SimpleNamespace(chunk_scan=ssd.mamba_chunk_scan_combined, split_conv1d_scan=None,
                                 rmsnorm_fn=lng.rmsnorm_fn, state_update=ssu.selective_state_update, fused=False,
                                 causal_conv1d_fn=None)


def compare(K, modality_aware: bool) -> dict:
    from model_helpers import M2K, TF, tiny
    from test_modality_experts import aware, mixed_track

    from omnibyte.model.blocks import mamba2
    from omnibyte.model.blocks.experts import Routing

    torch.manual_seed(0)
    blk = dict(M2K, d_state=16, headdim=16, chunk_size=8)
    m = tiny([(32, 32, aware(blk) if modality_aware else blk), (4, 16, TF)])
    mix = m.blocks[0].layers[0].mixer
    E, T = m.blocks[0].num_experts, 20
    track = mixed_track(2, T)

    def rt(a, b):
        return Routing(m.blocks[0].expert_of_modality[track[:, a:b]], E) if modality_aware else None

    u = torch.randn(2, T, 32, requires_grad=True)
    got, want = mamba2.kernel_forward(mix, K, u, None, rt(0, T)), mix.forward_ref(u, None, rt(0, T))
    g1 = torch.autograd.grad(got.sum(), [u, mix.in_proj.weight, mix.dt_bias])
    g2 = torch.autograd.grad(want.sum(), [u, mix.in_proj.weight, mix.dt_bias])
    grad = max(((a - b).norm() / b.norm()).item() for a, b in zip(g1, g2))
    # the same input in segments of one chunk (as past the kernels' int32 offsets): equal outputs and gradients
    params = [u, mix.in_proj.weight, mix.dt_bias, mix.conv1d.weight, mix.A_log, mix.D]
    one = mamba2.kernel_forward(mix, K, u, None, rt(0, T))
    g_one = torch.autograd.grad(one.sum(), params)
    width = 2 * mix.d_inner + 2 * mix.ngroups * mix.d_state + mix.nheads
    limit, mamba2.INDEX_LIMIT = mamba2.INDEX_LIMIT, 2 * 8 * width
    try:
        assert mamba2.segment_positions(mix, 2, T) == 8
        seg = mamba2.kernel_forward(mix, K, u, None, rt(0, T))
        g_seg = torch.autograd.grad(seg.sum(), params)
        with torch.no_grad():  # a segmented prefill fills the cache as one call does
            st_seg, st_one = {}, {}
            mamba2.kernel_forward(mix, K, u[:, :T], st_seg, rt(0, T))
        mamba2.INDEX_LIMIT = limit
        with torch.no_grad():
            mamba2.kernel_forward(mix, K, u[:, :T], st_one, rt(0, T))
    finally:
        mamba2.INDEX_LIMIT = limit
    segmented = {"forward": (seg - one).abs().max().item(),
                 "grad_rel": max(((a - b).norm() / b.norm()).item() for a, b in zip(g_seg, g_one)),
                 "cache": max((st_seg[k] - st_one[k]).abs().max().item() for k in ("conv", "ssm"))}
    with torch.no_grad():  # a prefill into a cache, then single steps (selective_state_update)
        st, st_ref = {}, {}
        outs = [mamba2.kernel_forward(mix, K, u[:, :12], st, rt(0, 12))]
        refs = [mix.forward_ref(u[:, :12], st_ref, rt(0, 12))]
        for t in range(12, T):
            outs.append(mamba2.kernel_forward(mix, K, u[:, t:t + 1], st, rt(t, t + 1)))
            refs.append(mix.forward_ref(u[:, t:t + 1], st_ref, rt(t, t + 1)))
    cached = (torch.cat(outs, 1) - torch.cat(refs, 1)).abs().max().item()
    return {"case": "aware" if modality_aware else "dense", "forward": (got - want).abs().max().item(),
            "grad_rel": grad, "cached": cached, "segmented": segmented}


def main() -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from omnibyte.model.blocks import mamba2

    K = load()
    mamba2.compiled_causal_conv_silu = lambda: mamba2.causal_conv_silu  # the same function, uncompiled
    for modality_aware in (False, True):
        print(json.dumps(compare(K, modality_aware)), flush=True)


if __name__ == "__main__":
    main()
