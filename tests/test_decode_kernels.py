"""The Triton decode kernels of Transformer stages (omnibyte.model.inference.kernels) against the torch step.

On CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernels are defined, so in
a subprocess); on CUDA (``-m gpu``) compiled, inside the CUDA-graph stepper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import M2, M2K, TF360, stepper_logits, tiny  # noqa: F401

triton = pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# 3 heads of 8 (H*hd = 24 != width 32) and a SwiGLU hidden of 40: blocks of 16 rows / 16 columns under the
# interpreter leave ragged ends in every kernel
TFK = {"name": "transformer", "heads": 3, "head_dim": 8, "mlp_hidden": 40}

_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from model_helpers import tiny, M2, stepper_logits
from omnibyte.model.inference.graphs import GraphStepper
TFK = json.loads(sys.argv[2])
bias = sys.argv[3] == "1"
m = tiny([(4, 32, M2), (int(sys.argv[4]), 32, dict(TFK, bias=bias))])
if bias:  # nn.Linear biases start at zero; make them matter
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
x = torch.randint(0, 256, (2, 22))

with torch.no_grad():
    full = m(x)[:, 9:]
    k32, gs = stepper_logits(m, x, True)
    used = gs.kernels
    # 20 rows: two chunks of ROW_CHUNK rows per weight block (grid axis 1), the second ragged; asked for explicitly
    x20 = torch.randint(0, 256, (20, 13))
    k20, gs = stepper_logits(m, x20, True, end=12)
    used20 = gs.kernels
    t20, _ = stepper_logits(m, x20, False, end=12)
    mb = m.to(torch.bfloat16)
    kb, _ = stepper_logits(mb, x, True)
    tb, _ = stepper_logits(mb, x, False)
    from omnibyte.model.inference.kernels import MAX_ROWS
    st = m.new_state(MAX_ROWS + 1)  # above MAX_ROWS the default is the torch step
    m.feed(st, torch.randint(0, 256, (MAX_ROWS + 1, 9)))
    big = GraphStepper(m, st, use_graphs=False).kernels
print(json.dumps(dict(used=used, big=big, used20=used20, err20=(k20 - t20).abs().max().item(),
                      err32=(k32 - full).abs().max().item(), errbf16=(kb - tb).abs().max().item(),
                      scale=tb.abs().max().item())))
"""


@pytest.mark.slow  # Triton interpreter in a subprocess: ~20 s each on 2 cores (run by .ci/run after the fast suite)
@pytest.mark.parametrize("bias,patch", [(False, 4), (True, 3)])
def test_kernels_match_torch_step_interpreted(bias, patch):
    """fp32: the kernel step == full forward (to 1e-5), also at 20 rows (two chunks of rows per weight block, the
    second ragged) == the torch step; bf16: == the torch step within a few bf16 ulps. A patch of 3 leaves the
    attention kernel's power-of-two slot block ragged."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(Path(__file__).parent), json.dumps(TFK),
                          "1" if bias else "0", str(patch)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["used"] is True and r["big"] is False and r["used20"] is True
    assert r["err32"] < 1e-5 and r["err20"] < 1e-5, r  # 20 rows: two row chunks per weight block
    assert r["errbf16"] < 0.02 * max(1.0, r["scale"]), r


def test_kernels_refused_where_they_cannot_run():
    """Without CUDA (and without the interpreter) asking for the kernels is a clear error; the default falls
    back to the torch step."""
    from omnibyte.model.inference import kernels as decode_kernels
    from omnibyte.model.inference.graphs import GraphStepper

    if decode_kernels.available(torch.device("cpu")):
        pytest.skip("interpreter enabled in this process")
    m = tiny([(4, 32, M2), (4, 32, TFK)])
    st = m.new_state(1)
    m.feed(st, torch.randint(0, 256, (1, 5)))
    assert GraphStepper(m, st, use_graphs=False).kernels is False
    with pytest.raises(NotImplementedError, match="Triton decode kernels"):
        GraphStepper(m, st, use_graphs=False, kernels=True)


def test_supports_checks_width_and_layout():
    from omnibyte.model.inference import kernels as decode_kernels

    m = tiny([(4, 32, M2), (4, 32, TFK)])
    blk = m.blocks[1]
    assert decode_kernels.supports(blk)
    lin = blk.layers[1].mlp.down
    lin.weight = torch.nn.Parameter(torch.randn(lin.in_features, lin.out_features).t())  # same shape, strided
    assert not decode_kernels.supports(blk)
    wide = tiny([(4, 32, M2), (4, 32, dict(TFK, mlp_hidden=decode_kernels.MAX_K + 64))])
    assert not decode_kernels.supports(wide.blocks[1])


def test_attention_kernel_rejects_bad_position():
    from omnibyte.model.inference import kernels as decode_kernels

    kc = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="outside the cache"):
        decode_kernels.attention_out_residual(torch.zeros(1, 48), kc, kc.clone(), None, 4, None, torch.zeros(1, 16))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_step_matches_torch_step(dtype):
    """Compiled on CUDA: the kernel stepper's logits == the torch stepper's, same weights and bytes (eager,
    no graphs), including a 16x64-head layer shaped like the 360M config's local stage."""
    from omnibyte.model.blocks.mamba2 import load_mamba_kernels

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not loadable")
    m = tiny([(8, 1024, dict(M2K, d_state=32, headdim=64, chunk_size=16)), (8, 1024, TF360)]).cuda().to(dtype)
    x = torch.randint(0, 256, (2, 40), device="cuda")
    with torch.no_grad():
        res = [stepper_logits(m, x, k)[0] for k in (True, False)]
    err = (res[0] - res[1]).abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 0.03 * res[1].abs().max().item()
    assert err < tol, (err, tol)
