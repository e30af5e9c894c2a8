"""MBLM hierarchy: shapes, causality, cached generation == full forward, score, configs (CPU)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import TF, assert_cached_matches_forward, one_thread, tiny  # noqa: F401

from omnibyte import build_model, vocab
from omnibyte.config import ConfigError
from omnibyte.model import MBLM, MBLMConfig
from omnibyte.model.inference.decoder import Decoder
from omnibyte.registry import MODELS

HIERARCHIES = {
    "1-stage": [(6, 32)],
    "2-stage": [(4, 32), (4, 16)],
    "3-stage": [(3, 32), (2, 16), (3, 16)],
}


def test_registered_and_meta():
    assert MODELS.get("mblm") is MBLM
    m = tiny(HIERARCHIES["3-stage"])
    meta = m.stream_meta
    assert meta.patch_product == 6 and meta.max_len is None and meta.vocab_size == 264
    assert len(m.stage_blocks()) == 6


@pytest.mark.parametrize("name", list(HIERARCHIES))
@pytest.mark.parametrize("L", [1, 7, 12, 17])
def test_shapes_any_length(name, L):
    m = tiny(HIERARCHIES[name])
    x = torch.randint(0, 256, (2, L))
    assert m(x).shape == (2, L, 264)
    assert m.hidden(x).shape == (2, L, 16 if name != "1-stage" else 32)


@pytest.mark.parametrize("name", list(HIERARCHIES))
def test_causality(name):
    m = tiny(HIERARCHIES[name])
    x = torch.randint(0, 256, (1, 19))
    base = m(x)
    for t in (0, 3, 5, 6, 11, 18):
        y = x.clone()
        y[0, t] = (y[0, t] + 1) % 256
        out = m(y)
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5), f"logits up to {t} changed"
        if t + 1 < 19:
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-5)


@pytest.mark.parametrize("name", list(HIERARCHIES))
@pytest.mark.parametrize("prompt", [0, 1, 5, 7])
def test_cached_generation_matches_forward(name, prompt):
    m = tiny(HIERARCHIES[name])
    assert_cached_matches_forward(m, torch.randint(0, 256, (2, 20)), prompt, atol=1e-5)


def test_score_equals_forward_logprobs():
    m = tiny(HIERARCHIES["3-stage"])
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        lp = torch.log_softmax(m(x)[0].float(), -1)
    cands = [x[0, 9:14].tolist(), x[0, 9:10].tolist(), [], [7, 8, 9]]
    got = m.score(x[0, :9], cands)
    y = torch.cat([x[0, :9], torch.tensor([7, 8, 9])])[None]
    with torch.no_grad():
        lp2 = torch.log_softmax(m(y)[0].float(), -1)
    want = [sum(lp[9 + i, x[0, 9 + i]] for i in range(5)), lp[9, x[0, 9]], 0.0,
            sum(lp2[9 + i, y[0, 9 + i]] for i in range(3))]
    assert torch.allclose(got, torch.tensor([float(w) for w in want]), atol=1e-4)


def test_generate_api(monkeypatch):
    m = tiny(HIERARCHIES["2-stage"])
    g = torch.Generator().manual_seed(0)
    out = m.generate(b"hello", 6, temperature=0.8, top_k=20, top_p=0.9, generator=g)
    assert out.shape == (1, 6) and out.dtype == torch.long
    greedy = m.generate([104, 105], 5, temperature=0)
    assert torch.equal(greedy, m.generate(torch.tensor([[104, 105]]), 5, temperature=0))
    # greedy continuation = argmax of the full forward each step (logits[:, t] predicts token t, so
    # append a placeholder and read its logits)
    seq = torch.tensor([[104, 105]])
    for _ in range(5):
        nxt = m(torch.cat([seq, torch.zeros_like(seq[:, :1])], 1))[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(greedy[0], seq[0, 2:])
    stop = int(greedy[0, 1])
    first = int((greedy[0] == stop).nonzero()[0])
    assert torch.equal(m.generate([104, 105], 5, temperature=0, stop_tokens=(stop,))[0], greedy[0, :first + 1])
    # a batch ends at its last row's stop; rows that stopped are padded
    other = m.generate([200, 201], 5, temperature=0)[0]
    hits = (other == stop).nonzero()
    width = max(first, int(hits[0]) if len(hits) else 4) + 1
    for every in (None, 3):  # checking for the end every 3 bytes (as every 8 on CUDA) gives the same output
        monkeypatch.setattr(Decoder, "stop_check_every", every)
        both = m.generate(torch.tensor([[104, 105], [200, 201]]), 5, temperature=0, stop_tokens=(stop,))
        assert both.shape == (2, width) and torch.equal(both[1], other[:width])
        assert torch.equal(both[0, :first + 1], greedy[0, :first + 1]) and (both[0, first + 1:] == vocab.PAD).all()


def test_learned_positions_bound():
    m = tiny([(4, 32, dict(TF, positions="learned")), (2, 16)])
    assert m.stream_meta.max_len == 8
    m(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        m(torch.zeros(1, 9, dtype=torch.long))
    assert m.generate(b"abc", 5, temperature=0).shape == (1, 5)  # 3 + 5 = max_len: fits
    with pytest.raises(ValueError, match=r"3-token prompt plus max_new_bytes=6 passes .* at most 5 new bytes"):
        m.generate(b"abc", 6, temperature=0)  # refused before any byte is computed, not after the last


def test_build_model_from_dict_yaml_and_errors(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  name: mblm\n  stages:\n    - {length: 4, width: 16, layers: 1}\n"
                 "    - {length: 2, width: 8, layers: 1, block: {name: transformer, heads: 2}}\n")
    m = build_model(str(p))
    assert isinstance(m, MBLM) and m.stream_meta.patch_product == 2
    assert isinstance(build_model(MBLMConfig()), MBLM)
    with pytest.raises(ConfigError, match="stages.0.layrs"):
        build_model({"stages": [{"length": 4, "width": 16, "layrs": 1}]})
    with pytest.raises(ConfigError, match="stages.0.block.name"):
        build_model({"stages": [{"length": 4, "width": 16, "block": {"name": "transfomer"}}]})
    with pytest.raises(ConfigError, match="at least one stage"):
        build_model({"stages": []})
    with pytest.raises(ValueError, match="divisible"):
        build_model({"stages": [{"length": 4, "width": 10, "block": {"name": "transformer", "heads": 4}}]})
    for block in ({"name": "mamba1", "d_state": 0}, {"name": "mamba2", "headdim": 0}):
        with pytest.raises(ConfigError, match=r"stages\.0\.block: (d_state|headdim) must be >= 1"):
            build_model({"stages": [{"length": 4, "width": 16, "block": block}]})


def test_tiny_model_overfits():
    torch.manual_seed(0)
    m = tiny([(4, 32), (4, 32)]).train()
    from omnibyte.loss import compute_loss

    data = torch.tensor([list(b"the quick brown fox jumps over the lazy dog")[:32]])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(60):
        out = compute_loss(m, data, torch.ones_like(data, dtype=torch.float32))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.bpb < 0.5, out.bpb


def test_attention_batch_split_is_exact(monkeypatch):
    from omnibyte.model.blocks.transformer import Attention

    m = tiny(HIERARCHIES["3-stage"])
    x = torch.randint(0, 256, (2, 30))
    base = m(x)
    monkeypatch.setattr(Attention, "short", 0)  # every length through the fused kernel, split by batch
    monkeypatch.setattr(Attention, "max_batch", 3)
    assert torch.allclose(m(x), base, atol=1e-6)


def test_short_attention_equals_sdpa(monkeypatch):
    """Patches up to Attention.short use two matrix products; same outputs and gradients as SDPA."""
    from omnibyte.model.blocks.transformer import Attention

    m = tiny(HIERARCHIES["3-stage"])
    x = torch.randint(0, 256, (2, 30))

    def run():
        m.zero_grad()
        out = m(x)
        out.float().pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    out_short, g_short = run()
    monkeypatch.setattr(Attention, "short", 0)
    out_sdpa, g_sdpa = run()
    assert torch.allclose(out_short, out_sdpa, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_short, g_sdpa))


@pytest.mark.slow
def test_packed_flex_attention_equals_matmul_attention():
    """Compiled layers on CUDA may pack short sequences into FlexAttention rows; same outputs (CPU: forward)."""
    from omnibyte.model.blocks.transformer import TransformerBlock, packed_block_mask

    torch.manual_seed(0)
    blk = TransformerBlock(TransformerBlock.Config(heads=2), dim=32, layers=1).eval()
    x = torch.randn(32, 8, 32)
    packed = packed_block_mask(32, 8, x.device)
    assert packed is not None and packed[1] == 32  # all 32 sequences of 8 in one 256-position row
    layer = blk.layers[0]
    with torch.no_grad():
        want = layer(x)
        layer.compile()
        got = layer(x, None, 0, None, packed)
    assert torch.allclose(got, want, atol=1e-5)
    assert packed_block_mask(7, 8, x.device) is None  # no divisor gives 128-aligned rows: matmul path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_packed_flex_attention_training_matches_eager(monkeypatch):
    """A compiled Transformer stage on CUDA with short_impl "flex" (FlexAttention over packed rows): the
    same outputs and gradients as the eager matrix-product path."""
    from omnibyte.model.blocks.transformer import Attention, TransformerBlock

    torch.manual_seed(0)
    blk = TransformerBlock(TransformerBlock.Config(heads=4, head_dim=16), dim=64, layers=2).cuda()
    x = torch.randn(512, 8, 64, device="cuda", requires_grad=True)

    def run():
        blk.zero_grad()
        x.grad = None
        y = blk(x)
        y.pow(2).mean().backward()
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in blk.parameters()]

    want = run()
    monkeypatch.setattr(Attention, "short_impl", "flex")
    for layer in blk.layers:
        layer.compile()
    got = run()
    def rel(a, b):  # Triton's fp32 dots use TF32: compare relative norms
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    assert rel(got[0], want[0]) < 5e-3, rel(got[0], want[0])
    assert rel(got[1], want[1]) < 1e-2, rel(got[1], want[1])
    errs = [rel(a, b) for a, b in zip(got[2], want[2])]
    assert max(errs) < 1e-2, errs
