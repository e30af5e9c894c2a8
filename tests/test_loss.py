"""omnibyte.loss: weighted masked CE, per-modality sums, chunked == unchunked, bpb."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from model_helpers import one_thread, tiny  # noqa: F401

from omnibyte.loss import bits_per_byte, compute_loss, per_token_nll
from omnibyte.vocab import Modality


def _ref_nll(m, x):
    with torch.no_grad():
        lg = m(x).float()
    return F.cross_entropy(lg.flatten(0, 1), x.flatten(), reduction="none").view(x.shape)


def test_fractional_weights_and_modalities():
    m = tiny([(4, 32), (4, 16)])
    x = torch.randint(0, 256, (2, 23))
    w = torch.rand(2, 23)
    w[0, :5] = 0
    mod = torch.randint(1, 4, (2, 23))
    out = compute_loss(m, x, w, mod)
    nll = _ref_nll(m, x)
    assert torch.allclose(out.loss, (nll * w).sum() / w.sum(), atol=1e-5)
    assert torch.allclose(out.nats_sum, (nll * w).sum(), atol=1e-4)
    assert torch.allclose(out.weight_sum, w.sum())
    for k, (n, ws) in out.per_modality.items():
        sel = mod == k
        assert torch.allclose(n, (nll * w)[sel].sum(), atol=1e-4) and torch.allclose(ws, w[sel].sum())
    assert sum(float(n) for n, _ in out.per_modality.values()) == pytest_approx(float(out.nats_sum))
    assert math.isclose(out.bpb, float(out.nats_sum) / float(out.weight_sum) / math.log(2), rel_tol=1e-6)
    assert set(out.per_modality) == {int(c) for c in Modality}  # fixed keys: no host sync to find them
    assert set(out.modality_bpb()) == {int(c) for c in torch.unique(mod[w != 0])}


def pytest_approx(v):
    import pytest

    return pytest.approx(v, rel=1e-5)


def test_chunked_equals_unchunked_with_grads():
    for stages in ([(8, 32)], [(4, 32), (4, 16)], [(2, 32), (2, 16), (3, 16)]):
        m = tiny(stages).train()
        x = torch.randint(0, 256, (2, 29))
        w = torch.rand(2, 29)
        a = compute_loss(m, x, w, chunk_size=6)
        a.loss.backward()
        ga = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        b = compute_loss(m, x, w, chunk_size=10_000)
        b.loss.backward()
        assert torch.allclose(a.loss, b.loss, atol=1e-6)
        for g1, p in zip(ga, m.parameters()):
            assert torch.allclose(g1, p.grad, atol=1e-6)


def test_zero_weight_gives_zero_loss_with_grad():
    m = tiny([(4, 32), (4, 16)]).train()
    x = torch.randint(0, 256, (1, 8))
    out = compute_loss(m, x, torch.zeros(1, 8))
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())  # a step changes nothing
    assert math.isnan(out.bpb)


def test_per_token_nll_and_bpb():
    m = tiny([(4, 32), (4, 16)])
    x = torch.randint(0, 256, (2, 13))
    got = per_token_nll(m, x)
    assert got.dtype == torch.float32 and got.shape == (2, 13)
    assert torch.allclose(got, _ref_nll(m, x), atol=1e-5)
    assert bits_per_byte(math.log(2) * 10, 10) == 1.0
