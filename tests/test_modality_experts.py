"""Modality-aware blocks (``modality_experts``: Mixture-of-Mamba / Mixture-of-Transformers), CPU fp32 tiny models:
the option, the patch routing rule, causality, cached generation == full forward, per-modality parameters used
only by their tokens, the missing-modality error, the dense model unchanged, checkpoints, FLOPs, a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import M1, M2, M2K, TF, one_thread, tiny  # noqa: F401

from omnibyte import vocab
from omnibyte.config import ConfigError, from_dict, to_dict
from omnibyte.model import routing
from omnibyte.model.blocks.experts import ExpertLinear, ExpertRMSNorm, expert_table, normalize_groups
from omnibyte.vocab import Modality

GROUPS = ["image", ["question", "answer"]]  # 3 experts: image, question+answer, the rest (text, special)
BLOCKS = {"mamba2": M2, "mamba1": M1, "transformer": TF}
IM, Q, A, S = int(Modality.IMAGE), int(Modality.QUESTION), int(Modality.ANSWER), int(Modality.SPECIAL)


def aware(blk):
    return dict(blk, modality_experts=GROUPS)


def mixed_track(B: int, L: int, seed: int = 0) -> torch.Tensor:
    """Runs of random modalities of random lengths (patches that span modalities, and uniform ones)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(B, L, dtype=torch.long)
    for b in range(B):
        t = 0
        while t < L:
            n = int(torch.randint(1, 7, (1,), generator=g))
            out[b, t:t + n] = int(torch.randint(0, 5, (1,), generator=g))
            t += n
    return out


# ------------------------------------------------------------------------------------------------------
# the option and the rules


def test_option_groups_table_and_errors():
    assert normalize_groups(GROUPS) == (("image",), ("question", "answer"))
    assert normalize_groups(["IMAGE", 3]) == (("image",), ("question",))
    table, n = expert_table(normalize_groups(GROUPS))
    assert n == 3 and table[IM] == 0 and table[Q] == table[A] == 1 and table[S] == table[int(Modality.TEXT)] == 2
    assert expert_table(normalize_groups(["image", "question", "answer", "text", "special"]))[1] == 5  # no rest
    for bad, msg in (([["image"], "image"], "listed twice"), (["pixels"], "unknown modality"), ([[]], "empty")):
        with pytest.raises(ValueError, match=msg):
            normalize_groups(bad)
    from omnibyte.model.mblm import MBLMConfig

    node = {"stages": [{"length": 4, "width": 32, "block": aware(M2)}, {"length": 2, "width": 16,
                                                                        "block": aware(TF)}]}
    cfg = from_dict(MBLMConfig, node)
    assert cfg.stages[0].block.modality_experts == (("image",), ("question", "answer"))
    assert from_dict(MBLMConfig, to_dict(cfg)) == cfg  # dumps reload to the same config
    with pytest.raises(ConfigError, match="modality_experts"):
        from_dict(MBLMConfig, {"stages": [{"block": dict(TF, modality_experts=["imag"])}]})


def test_unit_modality_majority_ties_to_the_latest():
    mod = torch.tensor([[IM, IM, Q, Q, Q, S, S, Q],    # Q majority
                        [IM, IM, S, S, Q, Q, A, A],    # tie IM/S/Q/A at 2: A occurs last
                        [S, IM, IM, IM, IM, S, S, S],    # tie IM/S at 4: S occurs last
                        [A, A, A, A, A, A, A, S]])
    assert routing.unit_modality(mod).tolist() == [Q, A, S, A]
    assert routing.unit_modality(mod[:, :1]).tolist() == [IM, IM, S, A]  # one byte: its own modality


@pytest.mark.parametrize("stages", [[(4, 32), (4, 16)], [(2, 32), (2, 16), (2, 16)]])
def test_each_stage_routes_by_the_unit_before_it(stages, monkeypatch):
    """Routing seen by every block == the documented rule computed by hand: the position covering stream unit
    k routes by the majority modality of unit k - 1 (special for the first position of the stream)."""
    m = tiny([(*st, aware(TF)) for st in stages])
    B, L = 2, 29
    x, mod = torch.randint(0, 256, (B, L)), mixed_track(B, L)
    seen = {}
    for s, blk in enumerate(m.blocks):
        def spy(inp, cache=None, modality=None, _s=s, _f=blk.forward):
            seen[_s] = modality.clone()
            return _f(inp, cache, modality)
        monkeypatch.setattr(blk, "forward", spy)
    m(x, mod)
    Lp = -(-L // m.units[0]) * m.units[0]
    padded = torch.cat((mod, torch.full((B, Lp - L), S)), 1).tolist()
    for s, Qs in enumerate(m.units):
        want = []
        for b in range(B):
            for k in range(Lp // Qs):
                if k == 0:
                    want.append(S)
                    continue
                unit = padded[b][(k - 1) * Qs:k * Qs]
                best = max(set(unit), key=lambda c: (unit.count(c), max(i for i, u in enumerate(unit) if u == c)))
                want.append(best)
        assert seen[s].reshape(-1).tolist() == want, f"stage {s}"


def test_routing_dispatch_and_its_gradient():
    """Routing.apply == each token through its own expert (computed with masks), values and gradients."""
    from omnibyte.model.blocks.experts import Routing

    torch.manual_seed(0)
    x = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    for expert in (torch.randint(0, 3, (3, 7)), torch.full((3, 7), 1)):  # mixed, and one expert for all
        r = Routing(expert, 3)
        got = r.apply(lambda e, xe: torch.tanh(xe @ w[e]), x)
        want = sum(torch.tanh(x @ w[e]) * (expert == e)[..., None] for e in range(3))
        assert torch.allclose(got, want)

        def run(a, b, r=r):
            return r.apply(lambda k, xk: torch.tanh(xk @ b[k]), a)

        assert torch.autograd.gradcheck(run, (x, w))


def test_generation_rule():
    seg = routing.open_segment(torch.tensor([vocab.SOM_ANSWER, 65, vocab.EOM, vocab.SOM_IMAGE]),
                               torch.tensor([S, Q, S, S]))
    assert seg.tolist() == [A, Q, S, IM]
    mod, after = routing.next_modality(torch.tensor([66, vocab.EOS, 7, vocab.SOM_QUESTION]), seg)
    assert mod.tolist() == [A, S, S, S] and after.tolist() == [A, S, S, Q]


# ------------------------------------------------------------------------------------------------------
# causality and cached generation for every modality-aware block


@pytest.mark.parametrize("name", list(BLOCKS))
def test_causality(name):
    m = tiny([(4, 32, aware(BLOCKS[name])), (4, 16, aware(BLOCKS[name]))])
    x, mod = torch.randint(0, 256, (1, 23)), mixed_track(1, 23, seed=3)
    base, base_nll = m(x, mod), m.nll(x, modality=mod)
    for t in (0, 3, 4, 9, 15, 22):
        y, ym = x.clone(), mod.clone()
        y[0, t] = (y[0, t] + 1) % 256
        ym[0, t] = (ym[0, t] + 2) % 5  # a future byte and its modality change
        out, nll = m(y, ym), m.nll(y, modality=ym)
        assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5), f"logits up to {t} changed"
        assert torch.allclose(nll[:, :t], base_nll[:, :t], atol=1e-5), f"losses before {t} changed"
        if t + 1 < 23:
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-5)


LAYOUTS = {"global": (True, False), "local": (False, True), "both": (True, True)}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_generation_matches_forward(name, layout):
    g, loc = LAYOUTS[layout]
    blk = BLOCKS[name]
    m = tiny([(4, 32, aware(blk) if g else blk), (4, 16, aware(blk) if loc else TF)])
    assert m.aware == [g, loc]
    x, mod = torch.randint(0, 256, (2, 22)), mixed_track(2, 22, seed=1)
    full = m(x, mod)
    for prompt in (0, 1, 5, 8):
        st = m.new_state(2)
        outs = [m.feed(st, x[:, :prompt], mod[:, :prompt])]
        outs += [m.feed(st, x[:, t:t + 1], mod[:, t:t + 1]) for t in range(prompt, 21)]
        assert torch.allclose(torch.stack(outs, 1), full[:, prompt:], atol=1e-5), f"prompt {prompt}"


def test_three_stages_all_aware_cache_and_chunked_nll():
    m = tiny([(3, 32, aware(M2)), (2, 16, aware(M1)), (3, 16, aware(TF))])
    x, mod = torch.randint(0, 256, (2, 25)), mixed_track(2, 25, seed=2)
    full = m(x, mod)
    st = m.new_state(2)
    outs = [m.feed(st, x[:, :7], mod[:, :7])] + [m.feed(st, x[:, t:t + 1], mod[:, t:t + 1]) for t in range(7, 24)]
    assert torch.allclose(torch.stack(outs, 1), full[:, 7:], atol=1e-5)
    want = torch.nn.functional.cross_entropy(full.flatten(0, 1), x.flatten(), reduction="none").view(2, -1)
    for chunk in (6, 12, None):  # chunks of the inner stages take their slice of the routes
        assert torch.allclose(m.nll(x, chunk, modality=mod), want, atol=1e-5)
    one = tiny([(6, 32, aware(M1))])  # one stage: bytes route by the byte before them
    full = one(x, mod)
    st = one.new_state(2)
    outs = [one.feed(st, x[:, :3], mod[:, :3])] + [one.feed(st, x[:, t:t + 1], mod[:, t:t + 1]) for t in range(3, 24)]
    assert torch.allclose(torch.stack(outs, 1), full[:, 3:], atol=1e-5)
    want = torch.nn.functional.cross_entropy(full.flatten(0, 1), x.flatten(), reduction="none").view(2, -1)
    assert torch.allclose(one.nll(x, 8, modality=mod), want, atol=1e-5)


def test_generate_and_score_follow_the_rule():
    """Greedy generation after a qa-style prompt == the argmax of the full forward whose modality track
    follows the documented rule (answer bytes after SOM_ANSWER, specials special); score == forward."""
    m = tiny([(4, 32, aware(M2)), (4, 16, aware(TF))])
    prompt = torch.tensor([[vocab.BOS, vocab.SOM_QUESTION, 72, 105, vocab.EOM, vocab.SOM_ANSWER]])
    pmod = torch.tensor([[S, S, Q, Q, S, S]])
    new = m.generate(prompt, 6, temperature=0, modality=pmod)
    seq, smod = prompt, pmod
    seg = routing.open_segment(prompt[:, -1], pmod[:, -1])
    for _ in range(6):
        logits = m(torch.cat([seq, torch.zeros_like(seq[:, :1])], 1), torch.cat([smod, smod[:, :1]], 1))
        nxt = logits[:, -1].argmax(-1)
        nm, seg = routing.next_modality(nxt, seg)
        seq, smod = torch.cat([seq, nxt[:, None]], 1), torch.cat([smod, nm[:, None]], 1)
    assert torch.equal(new[0], seq[0, 6:])
    cands = [[97, 98, vocab.EOS], [99], [vocab.EOS]]
    got = m.score(prompt[0], cands, modality=pmod[0])
    for k, c in enumerate(cands):
        y = torch.cat([prompt, torch.tensor([c])], 1)
        ym = torch.cat([pmod, torch.tensor([[A if t < 256 else S for t in c]])], 1)
        lp = torch.log_softmax(m(y, ym)[0], -1)
        want = sum(float(lp[6 + i, t].detach()) for i, t in enumerate(c))
        assert abs(float(got[k]) - want) < 1e-4
    both = m.score_batch([prompt[0], prompt[0, :4]], cands, modalities=[pmod[0], pmod[0, :4]])
    assert torch.allclose(both[0], got) and torch.allclose(both[1], m.score(prompt[0, :4], cands, pmod[0, :4]))


def test_generation_after_bos_routes_by_the_streams_base_modality_as_training_does():
    """A utf8 stream is BOS text... EOS: training routes its bytes as text. Generation from [BOS] must too, given
    the stream's base modality (the CLI passes the serializer's); the default (special, the qa rule) would route
    them as special, and with text in its own copy that changes every logit."""
    T = int(Modality.TEXT)
    m = tiny([(4, 32, dict(M2, modality_experts=["text"])), (4, 16, dict(TF, modality_experts=["text"]))])
    prompt, pmod = torch.tensor([[vocab.BOS]]), torch.tensor([[S]])
    new = m.generate(prompt, 7, temperature=0, modality=pmod, base_modality=T)
    seq = torch.cat([prompt, new], 1)
    track = torch.tensor([[S] + [T if t < 256 else S for t in new[0].tolist()]])
    full = m(seq, track)  # logits[t] predict token t from the tokens before it
    assert torch.equal(full[0, 1:].argmax(-1), new[0])  # greedy == the forward over the training track
    dec = m.decoder
    for base, want in ((None, S), (T, T)):
        st = dec.new_state(1)
        if base is not None:
            st.base = base
        dec.feed(st, prompt, pmod)
        assert int(dec.next_modality(st, torch.tensor([[104]]))) == want
        dec.feed(st, torch.tensor([[104, vocab.EOS]]), torch.tensor([[want, S]]))  # after EOS: base again
        assert int(dec.next_modality(st, torch.tensor([[105]]))) == want


# ------------------------------------------------------------------------------------------------------
# per-modality parameters


def expert_params(m, e: int):
    """(name, slice) of expert e in every stacked per-modality parameter of the model."""
    for name, mod in m.named_modules():
        if isinstance(mod, (ExpertLinear, ExpertRMSNorm)):
            yield f"{name}.weight", lambda t, mod=mod: t[e]
            if getattr(mod, "bias", None) is not None:
                yield f"{name}.bias", lambda t: t[e]
    for name, p in m.named_parameters():
        if name.endswith("dt_bias") and p.dim() == 2:
            yield name, lambda t: t[e]


@pytest.mark.parametrize("name", list(BLOCKS))
def test_an_expert_is_used_only_by_its_modality(name):
    m = tiny([(4, 32, aware(BLOCKS[name])), (4, 16, aware(BLOCKS[name]))])
    params = dict(m.named_parameters())
    x = torch.randint(0, 256, (2, 24))
    for with_image in (False, True):
        mod = torch.tensor([[S, Q, Q, Q, A, A, S, Q] * 3] * 2)
        if with_image:
            mod[:, 8:13] = IM
        m.zero_grad()
        m.nll(x, modality=mod).sum().backward()
        grads = {n: sl(params[n].grad).abs().max().item() for n, sl in expert_params(m, 0)}  # expert 0 = image
        assert grads and len(grads) >= 4 * len(m.stage_blocks()) // 2
        if with_image:
            assert all(v > 0 for v in grads.values()), grads
        else:
            assert all(v == 0 for v in grads.values()), grads  # exactly zero: never touched
            other = {n: sl(params[n].grad).abs().max().item() for n, sl in expert_params(m, 1)}
            assert all(v > 0 for v in other.values())
    # and the image expert's weights change nothing on a stream without image bytes, everything with them
    mod = torch.tensor([[S, Q, Q, Q, A, A, S, Q] * 3] * 2)
    before = m(x, mod)
    with torch.no_grad():
        for n, sl in expert_params(m, 0):
            sl(params[n]).add_(torch.randn_like(sl(params[n])))
    assert torch.equal(m(x, mod), before)
    mod[:, 3] = IM
    assert not torch.allclose(m(x, mod)[:, 4:], before[:, 4:])


# ------------------------------------------------------------------------------------------------------
# errors, the dense model, checkpoints


def test_missing_or_misshapen_modality_raises():
    m = tiny([(4, 32, aware(M2)), (4, 16, TF)])
    x = torch.randint(0, 256, (1, 9))
    for call in (lambda: m(x), lambda: m.nll(x), lambda: m.feed(m.new_state(1), x),
                 lambda: m.generate(x, 2), lambda: m.score(x[0], [[1]])):
        with pytest.raises(ValueError, match="modality-aware"):
            call()
    with pytest.raises(ValueError, match="does not match"):
        m(x, torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="modality="):
        m.nll(x, torch.zeros_like(x))
    from omnibyte.loss import compute_loss, per_token_nll
    from omnibyte.stream import Batch, ByteStream

    batch = Batch.collate([ByteStream.from_bytes(b"abcdefghi", Modality.QUESTION)])
    assert torch.isfinite(m.batch_loss(batch).loss)  # batch_loss passes batch.modality
    assert torch.isfinite(compute_loss(m, batch.tokens, batch.loss_mask, batch.modality).loss)
    assert per_token_nll(m, batch.tokens, modality=batch.modality).shape == (1, 9)


def test_dense_models_are_unchanged_and_keys_line_up():
    """A dense model: no modality needed (and a given one ignored), keys as before. The modality-aware twin has
    the same keys; split parameters gain a leading expert dimension."""
    dense = tiny([(4, 32, M2), (4, 16, TF)])
    assert not dense.modality_aware and not dense.stream_meta.modality_aware
    x = torch.randint(0, 256, (1, 13))
    assert torch.equal(dense(x), dense(x, torch.full_like(x, IM)))
    assert not any("expert" in k for k in dense.state_dict())
    for blk in BLOCKS.values():
        d = tiny([(4, 32, blk), (4, 16, blk)]).state_dict()
        a = tiny([(4, 32, aware(blk)), (4, 16, aware(blk))]).state_dict()
        assert set(a) == set(d)
        split = [k for k in a if a[k].shape != d[k].shape]
        assert split and all(a[k].shape == (3, *d[k].shape) for k in split)
        assert not any(k.endswith(("A_log", "D", "conv1d.weight")) for k in split)  # shared


def test_checkpoint_round_trip(tmp_path):
    from omnibyte.checkpoint import load_weights, save_checkpoint

    m = tiny([(4, 32, aware(M2)), (4, 16, aware(TF))])
    x, mod = torch.randint(0, 256, (1, 15)), mixed_track(1, 15)
    ck = save_checkpoint(tmp_path / "ck", 1, model_state=m.state_dict(), optim_state={}, rng=[], state={"step": 1})
    m2 = tiny([(4, 32, aware(M2)), (4, 16, aware(TF))], seed=5)
    assert not torch.equal(m2(x, mod), m(x, mod))
    m2.load_state_dict(load_weights(ck))
    assert torch.equal(m2(x, mod), m(x, mod))


def test_graph_step_refuses_and_generate_falls_back():
    from omnibyte.model.inference.graphs import GraphStepper

    m = tiny([(4, 32, aware(M2K)), (4, 16, TF)])
    st = m.new_state(1)
    m.feed(st, torch.tensor([[1, 2, 3]]), torch.tensor([[S, IM, IM]]))
    with pytest.raises(NotImplementedError, match="modality-aware"):
        GraphStepper(m, st)


def test_flops_per_byte_equal_the_dense_twin():
    from omnibyte.model.flops import train_flops_per_step

    for blk in (dict(M2, mlp_ratio=2.0), M1, TF):
        d = tiny([(4, 32, blk), (4, 16, TF)])
        a = tiny([(4, 32, aware(blk)), (4, 16, aware(TF))])
        assert sum(p.numel() for p in a.parameters()) > 2 * sum(p.numel() for p in d.parameters()) // 1.5
        assert train_flops_per_step(a, 2, 64) == train_flops_per_step(d, 2, 64)


def test_attention_flops_follow_heads_times_head_dim_not_the_stage_width():
    """A block's head_dim may set the attention apart from the stage width (4 heads x 16 on a 32-wide stage):
    QK^T and AV run at heads x head_dim; the count used the stage width."""
    from omnibyte.model.flops import train_flops_per_step

    def model(hd):
        return tiny([(4, 32, dict(TF, heads=4, head_dim=hd)), (4, 16, TF)])

    m8, m16 = model(8), model(16)  # 4 x 8 = the stage width; 4 x 16 = twice it
    positions, T = 2 * 64 / m8.units[0], 64 / m8.units[0]
    layers = len(m8.blocks[0].layers)
    more_weights = sum(p.numel() for p in m16.blocks[0].parameters() if p.dim() == 2) - \
        sum(p.numel() for p in m8.blocks[0].parameters() if p.dim() == 2)  # the wider qkv and out projections
    attention_at_32 = 2 * layers * positions * T * 32
    assert train_flops_per_step(m16, 2, 64) - train_flops_per_step(m8, 2, 64) == \
        3 * (2 * more_weights * positions + attention_at_32)  # the attention term doubled with heads x head_dim


def test_optimizer_never_decays_stacked_biases_and_norms():
    from omnibyte.optim import build_optimizer
    from omnibyte.runconfig import TrainConfig

    m = tiny([(4, 32, aware(dict(M1, bias=True))), (4, 16, aware(TF))])
    t = TrainConfig(weight_decay=0.1, lr=1e-3)
    decayed = {id(p) for p in build_optimizer(m, t).param_groups[0]["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in decayed}
    assert any(n.endswith("in_proj.weight") for n in names)
    assert not any(n.endswith(("bias", "norm1.weight", "norm2.weight")) for n in names)


# ------------------------------------------------------------------------------------------------------
# the GPU kernels against the twin


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mamba2_kernels_match_the_twin():
    from omnibyte.model.blocks.experts import Routing
    from omnibyte.model.blocks.mamba2 import load_mamba_kernels

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not installed")
    torch.manual_seed(0)
    m = tiny([(64, 64, aware(dict(M2, name="mamba2", headdim=16, chunk_size=16))), (4, 32, TF)]).cuda()
    mix = m.blocks[0].layers[0].mixer
    u = torch.randn(2, 48, 64, device="cuda", requires_grad=True)
    mod = mixed_track(2, 48).cuda()
    r = Routing(m.blocks[0].expert_of_modality[mod], m.blocks[0].num_experts)
    got = mix(u, None, r)  # Triton kernels
    want = mix.forward_ref(u, None, r)  # the twin
    # the dense kernel test's criteria (test_model_mamba.py): the Triton dots run in TF32 even for fp32 inputs
    # (measured there on an H100/H200: max abs err 1.5e-4, gradient relative error 1.3e-2), so elementwise fp32
    # tolerances cannot hold; a wrong expert's weights or dt_bias would be off by O(1). The glue itself is
    # checked exactly on CPU (test_mamba2_kernel_glue.py).
    err = (got - want).abs().max().item()
    assert err < 1e-2 * max(1.0, want.abs().max().item()), err
    g1 = torch.autograd.grad(got.sum(), [u, mix.in_proj.weight, mix.dt_bias])
    g2 = torch.autograd.grad(want.sum(), [u, mix.in_proj.weight, mix.dt_bias])
    for name, a, b in zip(("u", "in_proj", "dt_bias"), g1, g2):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 3e-2, (name, rel)
    x = torch.randint(0, 256, (2, 40), device="cuda")
    xm = mixed_track(2, 40, seed=4).cuda()
    with torch.no_grad():
        full = m(x, xm)
        st = m.new_state(2)
        outs = [m.feed(st, x[:, :9], xm[:, :9])] + [m.feed(st, x[:, t:t + 1], xm[:, t:t + 1]) for t in range(9, 39)]
    err = (torch.stack(outs, 1) - full[:, 9:]).abs().max().item()
    assert err < 2e-3, err  # as test_gpu_cached_generation_matches_forward (dense)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mamba1_scan_kernel_matches_the_reference_scan():
    """Mamba-1 with per-modality dt_proj (its bias folded into delta): mamba-ssm's compiled selective scan (no
    cache) against the reference scan (with a cache) on the same CUDA inputs."""
    from omnibyte.model.blocks.experts import Routing
    from omnibyte.model.blocks.mamba1 import _selective_scan_fn

    if _selective_scan_fn() is None:
        pytest.skip("mamba-ssm's selective_scan_cuda not compiled")
    m = tiny([(64, 64, aware(M1)), (4, 32, TF)]).cuda()
    mix = m.blocks[0].layers[0].mixer
    u = torch.randn(2, 48, 64, device="cuda")
    r = Routing(m.blocks[0].expert_of_modality[mixed_track(2, 48).cuda()], m.blocks[0].num_experts)
    assert torch.allclose(mix(u, None, r), mix(u, {}, r), atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------------------------------------
# the config trains


FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"
TINY = [f"model.stages.{i}.{k}={v}" for i in (0, 1) for k, v in (("width", 16), ("layers", 1))] + [
    "model.stages.0.block.headdim=16", "model.stages.0.block.d_state=8", "model.stages.1.block.heads=2"]


def test_mom_config_trains_and_evaluates_on_cpu(tmp_path, capsys):
    from omnibyte.cli import main
    from omnibyte.logging import read_metrics

    runs = tmp_path / "runs"
    assert main(["train", "clevr_vqa_png_mom", f"task.root={FIXTURE}", "serializer.image.size=[16,12]",
                 "model.stages.0.length=128", "data.seq_len=1024", *TINY, "train.steps=6", "train.warmup=1",
                 "train.eval_every=0", "train.ckpt_every=0", "data.batch_size=4", "data.workers=0", "train.progress=false",
                 "train.log_every=1", "preset=full", "eval.report=false", "train.lr=3e-3", f"out_dir={runs}", "--quiet"]) == 0
    run = runs / "clevr_vqa_png_mom"
    losses = [r["loss"] for r in read_metrics(run) if r["split"] == "train"]
    assert len(losses) == 6 and all(v is not None and v == v for v in losses)  # every step finite
    assert losses[-1] < losses[0], losses
    capsys.readouterr()
    assert main(["eval", str(run), "eval.max_samples=3"]) == 0  # VQA rank + generate with the modality tracks
    out = capsys.readouterr().out
    task = json.loads(out[out.index("{"):])["task"]
    assert task["num_samples"] == 3 and set(task["modes"]) == {"generate", "rank"}
    assert main(["generate", str(run), "--prompt", "Is there", "--max-new-bytes", "3"]) == 2  # no modality given
    assert "--modality" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "Is there", "--max-new-bytes", "3", "--modality", "question",
                 "--quiet"]) == 0


def test_init_from_a_dense_run_copies_it_into_every_expert(tmp_path):
    """train.init_from of a dense run into the modality-aware twin: every expert starts as the dense weights, so
    the model computes the dense model's logits for any modality track; another architecture still fails."""
    from omnibyte.checkpoint import save_checkpoint
    from omnibyte.startup import init_weights_from

    x, mod = torch.randint(0, 256, (2, 19)), mixed_track(2, 19)
    for blk in (dict(M2, mlp_ratio=2.0), M1, TF):
        dense = tiny([(4, 32, blk), (4, 16, TF)])
        ck = save_checkpoint(tmp_path / blk["name"], 1, model_state=dense.state_dict(), optim_state={}, rng=[],
                             state={"step": 1})
        m = tiny([(4, 32, aware(blk)), (4, 16, aware(TF))], seed=1)
        init_weights_from(m, str(ck), ())
        assert torch.allclose(m(x, mod), dense(x), atol=1e-5)
    with pytest.raises(ConfigError, match="another architecture"):
        init_weights_from(tiny([(4, 32, aware(M2)), (2, 16, aware(TF))]), str(ck), ())


def test_init_from_a_modality_aware_run_needs_the_same_assignment_of_modalities_to_copies(tmp_path):
    """Copies are stacked by index: the same shapes with another assignment would start each modality from
    another modality's weights (found in review); it is refused, naming the stage and both assignments."""
    from omnibyte.checkpoint import save_checkpoint
    from omnibyte.startup import init_weights_from

    x, mod = torch.randint(0, 256, (2, 19)), mixed_track(2, 19)
    src = tiny([(4, 32, aware(M2)), (4, 16, aware(TF))])
    stages = [{"block": {"name": "mamba2", "modality_experts": GROUPS}},
              {"block": {"name": "transformer", "modality_experts": GROUPS}}]
    ck = save_checkpoint(tmp_path / "src", 1, model_state=src.state_dict(), optim_state={}, rng=[],
                         state={"step": 1, "config": {"model": {"stages": stages}}})
    same = tiny([(4, 32, aware(M2)), (4, 16, aware(TF))], seed=1)
    init_weights_from(same, str(ck), ())
    assert torch.allclose(same(x, mod), src(x, mod), atol=1e-5)
    swapped = [["question", "answer"], "image"]
    other = tiny([(4, 32, dict(M2, modality_experts=swapped)), (4, 16, aware(TF))], seed=1)
    with pytest.raises(ConfigError, match=r"stage 0 assigns modalities .*\[\['image'\], \['question', 'answer'\]\]"):
        init_weights_from(other, str(ck), ())
    init_weights_from(other, str(ck), (1,))  # only the stage whose assignment matches


def test_pg19_scoring_routes_a_modality_aware_model():
    from omnibyte.stream import ByteStream
    from omnibyte.tasks.pg19 import score_stream

    m = tiny([(4, 32, aware(M2)), (4, 16, aware(TF))])
    s = ByteStream.concat([ByteStream.special(vocab.BOS), ByteStream.from_bytes(b"a tiny book", Modality.TEXT)])
    total, count = score_stream(m, s, context=len(s), stride=len(s))
    x, mod = torch.from_numpy(s.tokens.astype("int64"))[None], torch.from_numpy(s.modality.astype("int64"))[None]
    with torch.no_grad():
        want = m.nll(x, modality=mod)[0, 1:].sum()
    assert count == len(s) - 1 and abs(total - float(want)) < 1e-4

