"""omnibyte's glue around mamba-ssm's Triton kernels (``kernel_forward``: projections, per-modality dt_bias,
conv, state handling, step path) checked on CPU: the kernels are replaced by pure-PyTorch equivalents with
their signatures, so only the glue differs from the twin (``forward_ref``). Dense and modality-aware mixers,
without a cache, a prefill into a cache, and single-byte steps. (The kernels themselves are compared with the
twin on GPU in test_model_mamba.py / test_modality_experts.py.)"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from model_helpers import M2K, TF, tiny
from test_modality_experts import aware, mixed_track

from omnibyte.model.blocks import mamba2
from omnibyte.model.blocks.experts import Routing
from omnibyte.model.blocks.mamba2_ref import ssd_chunked


def _chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None,
                return_final_states=False):
    assert z is None
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = F.softplus(dt) if dt_softplus else dt
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size, D, initial_states)
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


def _state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba-ssm's selective_state_update (multi-head form): state (N, H, P, n) updated in place; y (N, H, P)."""
    assert z is None
    # its contract as mamba-ssm 2.3.2 has it: dt_bias is read (dt_bias.stride(-1)) even when it is None, so a
    # caller must always pass one (a None crashed the modality-aware step path on GPU)
    assert dt_bias is not None, "selective_state_update needs a dt_bias (mamba-ssm reads its strides)"
    H, G = x.shape[1], B.shape[1]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = F.softplus(dt) if dt_softplus else dt  # (N, H, P)
    Bh = B.float().repeat_interleave(H // G, dim=1)  # (N, H, n)
    Ch = C.float().repeat_interleave(H // G, dim=1)
    dA = torch.exp(dt[..., None] * A.float())  # (N, H, P, n)
    state.copy_(state * dA + (dt * x.float())[..., None] * Bh[:, :, None, :])
    y = (state * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    return y.to(x.dtype)


def _rmsnorm_fn(y, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=False):
    assert bias is None and not norm_before_gate
    g = y.float() * F.silu(z.float())
    shp = g.shape
    g = g.view(*shp[:-1], -1, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.view(shp) * weight.float()).to(y.dtype)


TWIN_KERNELS = types.SimpleNamespace(chunk_scan=_chunk_scan, split_conv1d_scan=None, rmsnorm_fn=_rmsnorm_fn,
                                     state_update=_state_update, fused=False, causal_conv1d_fn=None)


@pytest.fixture(autouse=True)
def _plain_conv(monkeypatch):  # the compiled conv is the same function (tested in test_model_mamba.py)
    monkeypatch.setattr(mamba2, "compiled_causal_conv_silu", lambda: mamba2.causal_conv_silu)


@pytest.mark.parametrize("modality_aware", [False, True], ids=["dense", "aware"])
def test_kernel_glue_matches_the_twin(modality_aware):
    blk = dict(M2K, d_state=8, headdim=16, chunk_size=8)
    m = tiny([(64, 64, aware(blk) if modality_aware else blk), (4, 32, TF)])
    mix = m.blocks[0].layers[0].mixer
    with torch.no_grad():  # distinct per-expert dt_bias, so a wrong expert's bias shows
        mix.dt_bias.copy_(torch.randn_like(mix.dt_bias))
    u = torch.randn(2, 37, 64)
    r, E = None, m.blocks[0].num_experts
    if modality_aware:
        r = Routing(m.blocks[0].expert_of_modality[mixed_track(2, 37)], E)
        assert r.single is None

    def _sub(r, a, b):  # the routing of positions a..b
        return None if r is None else Routing(r.expert[:, a:b], E)

    want = mix.forward_ref(u, None, r)
    got = mamba2.kernel_forward(mix, TWIN_KERNELS, u, None, r)
    assert torch.allclose(got, want, atol=1e-5)
    # a cache: a prefill of 20 positions, then one position at a time (the step path)
    st_ref, st = {}, {}
    want = [mix.forward_ref(u[:, :20], st_ref, _sub(r, 0, 20))]
    got = [mamba2.kernel_forward(mix, TWIN_KERNELS, u[:, :20], st, _sub(r, 0, 20))]
    for t in range(20, 37):
        want.append(mix.forward_ref(u[:, t:t + 1], st_ref, _sub(r, t, t + 1)))
        got.append(mamba2.kernel_forward(mix, TWIN_KERNELS, u[:, t:t + 1], st, _sub(r, t, t + 1)))
    assert torch.allclose(torch.cat(got, 1), torch.cat(want, 1), atol=1e-5)
    assert torch.allclose(st["ssm"], st_ref["ssm"].float(), atol=1e-5)


@pytest.mark.parametrize("modality_aware", [False, True], ids=["dense", "aware"])
def test_batched_vqa_scoring_through_the_kernel_glue(monkeypatch, modality_aware):
    """The scorers (batched and per-question) with every Mamba-2 mixer on kernel_forward: what CUDA runs,
    with the kernels swapped for their twins."""
    from test_vqa_scoring import ANSWERS, LENGTHS, prefixes, tracks

    from omnibyte.model.api import StreamModel

    monkeypatch.setattr(mamba2.Mamba2KernelMixer, "forward", lambda self, u, state=None, routing=None:
                        mamba2.kernel_forward(self, TWIN_KERNELS, u, state, routing))
    outer, inner = dict(M2K, d_state=32, headdim=16, chunk_size=16), TF
    if modality_aware:
        outer, inner = aware(outer), aware(inner)
    m = tiny([(8, 64, outer), (4, 32, inner)], init_std=0.2)
    xs = prefixes(5, LENGTHS + [37, 61, 64, 90])
    ms = tracks(xs, 5) if modality_aware else None
    got, want = m.score_batch(xs, ANSWERS, modalities=ms), StreamModel.score_batch(m, xs, ANSWERS, ms)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))
