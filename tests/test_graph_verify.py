"""Static verification passes on a GraphStepper's buffers (omnibyte.model.inference.graph_verify,
``generate(..., draft=..., graph_verify=True)``): the pass's logits equal single stepper feeds and the eager
``verify`` from every start phase (T below, at and past the patch, two boundaries included), rollback to every
kept prefix equals feeding only that prefix, greedy output equals plain greedy, sampling stays exact, and models
it does not cover fall back to the eager passes; with the stepper compiled, the compiled pass equals the
uncompiled one. Off CUDA the pass runs without graphs; ``test_gpu_*`` check the captured graphs."""

from __future__ import annotations

import pytest
import torch

from omnibyte.model.inference.drafters import Drafter, LookupDrafter
from omnibyte.model.inference.graph_verify import StaticVerifier, _segment, segments, static_support, verifier
from omnibyte.model.inference.graphs import GraphStepper
from omnibyte.model.inference.speculative import ModelDrafter, verify
from tests.model_helpers import M2, M2K, TF, one_thread, tiny  # noqa: F401 - one_thread is an autouse fixture
from tests.test_lookup_drafter import _echo_prompt, _lookup_sampling_prompt
from tests.test_speculative import _exact_joint, _models, _peaked_pair, _tv

STAGES = [(16, 16, M2), (4, 16)]  # test_speculative's m2_tf: patches of 4 bytes


def _stepper(m, tokens: torch.Tensor, use_graphs: bool = False, kernels: bool | None = None) -> GraphStepper:
    """A GraphStepper holding the state after ``tokens`` (>= Q_0 of them) in its static buffers (``kernels``: the
    decode kernels for its steps and the passes' segments; default: on CUDA)."""
    st = m.new_state(tokens.shape[0], tokens.device)
    m.feed(st, tokens)
    gs = GraphStepper(m, st, use_graphs=use_graphs, kernels=kernels)
    gs._convert()
    return gs


def _feeds(gs: GraphStepper, toks: torch.Tensor) -> torch.Tensor:
    return torch.stack([gs.feed(toks[:, i:i + 1]) for i in range(toks.shape[1])], dim=1)


def test_segments():
    assert segments(1, 4, 4) == [(0, 2, 1), (3, 3, 0)]
    assert segments(0, 5, 4) == [(0, 3, 0), (4, 4, 0)]  # two boundaries
    assert segments(2, 2, 4) == [(0, 1, 2)]


def test_static_pass_equals_single_feeds_and_eager_verify():
    m = tiny(STAGES)
    Q0 = m.units[0]
    g = torch.Generator().manual_seed(0)
    for plen in range(Q0, 2 * Q0):  # every start phase
        prompt = torch.randint(0, 256, (2, plen), generator=g)
        for T in (1, Q0 - 1, Q0, Q0 + 1, Q0 + 2):
            toks = torch.randint(0, 256, (2, T), generator=g)
            ref = _feeds(_stepper(m, prompt), toks)
            st = m.new_state(2)
            m.feed(st, prompt)
            eager = verify(m.decoder, st, toks).logits
            ver = StaticVerifier(_stepper(m, prompt))
            out = ver.run(toks)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)
            assert torch.equal(ver.argmax, out.argmax(-1))
            with pytest.raises(RuntimeError, match="not rolled back"):
                ver.run(toks)


def test_rollback_to_every_keep_equals_feeding_the_kept_prefix():
    m = tiny(STAGES)
    Q0 = m.units[0]
    g = torch.Generator().manual_seed(1)
    for plen in range(Q0, 2 * Q0):
        prompt = torch.randint(0, 256, (1, plen), generator=g)
        T = Q0 + 1
        toks = torch.randint(0, 256, (1, T), generator=g)
        after = torch.randint(0, 256, (1, Q0 + 2), generator=g)  # on across a boundary
        for keep in range(1, T + 1):
            gs = _stepper(m, prompt)
            ver = StaticVerifier(gs)
            ver.run(toks)
            ver.rollback(keep)
            ref = _stepper(m, torch.cat((prompt, toks[:, :keep]), dim=1))
            assert gs.n == ref.n and torch.equal(gs.window, ref.window)
            torch.testing.assert_close(_feeds(gs, after[:, :2]), _feeds(ref, after[:, :2]), atol=1e-5, rtol=0)
            # and a second pass from there (snapshots, window and position all right)
            torch.testing.assert_close(ver.run(after[:, 2:]), _feeds(ref, after[:, 2:]), atol=1e-5, rtol=0)
            ver.rollback(1)
        with pytest.raises(ValueError, match="keep must be"):
            ver.run(toks)
            ver.rollback(T + 1)


def test_greedy_with_lookup_drafts_equals_plain_greedy():
    m = tiny(STAGES)
    P = m.units[0]
    prompt = _echo_prompt(m)
    plain = m.generate(prompt, 30, temperature=0)
    rejected = 0
    for k in (1, 3, P - 1, P, P + 1, 8):
        d = LookupDrafter()
        assert torch.equal(m.generate(prompt, 30, temperature=0, draft=d, draft_len=k, graph_verify=True), plain), k
        assert d.accepted > 0, k
        rejected += d.proposed - d.accepted
    assert rejected > 0
    (gs,) = m.decoder.kept_steppers()  # the pass ran on the kept stepper's buffers
    assert verifier(gs).passes > 0 and verifier(gs).pending is None
    # a batch where one row never matches, stop tokens, short and empty prompts, few new bytes
    other = torch.randint(0, 256, (1, len(prompt)), generator=torch.Generator().manual_seed(0))
    batch = torch.cat((torch.tensor([prompt]), other))
    kw = dict(temperature=0, draft="lookup", draft_len=5, graph_verify=True)
    assert torch.equal(m.generate(batch, 30, **kw), m.generate(batch, 30, temperature=0))
    stops = (int(plain[0, 17]),)
    assert torch.equal(m.generate(batch, 30, stop_tokens=stops, **kw),
                       m.generate(batch, 30, temperature=0, stop_tokens=stops))
    for p, new in ((list(b"abab"), 20), (list(b"ab"), 20), ([], 9), (prompt, 0), (prompt, 1), (prompt, 2)):
        want = m.generate(p, new, temperature=0)
        assert torch.equal(m.generate(p, new, temperature=0, draft=LookupDrafter(min_ngram=1), draft_len=5,
                                      graph_verify=True), want), (len(p), new)


def test_greedy_with_a_model_drafter_equals_plain_greedy():
    m, bad = _models("m2_tf")
    P = m.units[0]
    prompt = torch.randint(0, 256, (3, P + 1), generator=torch.Generator().manual_seed(0))
    plain = m.generate(prompt, 3 * P + 1, temperature=0)
    for k in (2, P + 1):
        d = ModelDrafter(bad, m)
        assert torch.equal(m.generate(prompt, 3 * P + 1, temperature=0, draft=d, draft_len=k, graph_verify=True),
                           plain), k
    own = ModelDrafter(m, m)  # every draft kept: rollback(T) each round
    assert torch.equal(m.generate(prompt, 3 * P + 1, temperature=0, draft=own, draft_len=P + 1, graph_verify=True),
                       plain)
    assert own.accepted == own.proposed
    # prompts shorter than a patch: eager passes on the stepper's state until it holds Q_0 bytes, then static ones
    for p in (list(b"a"), []):
        want = m.generate(p, 20, temperature=0)
        assert torch.equal(m.generate(p, 20, temperature=0, draft=ModelDrafter(bad, m), draft_len=5,
                                      graph_verify=True), want), len(p)


@pytest.mark.parametrize("graph_verify", [True, "aligned"])
def test_lookup_sampling_through_the_static_pass_follows_the_model_distribution(graph_verify):
    """As test_lookup_drafter's sampling test (temperature 1, top-k 2, 250 samples, two rows per call) on a
    Mamba-2 global stage through the static pass, patch-aligned or not: the first 3 bytes follow the model's exact
    joint."""
    m, _ = _peaked_pair("m2_tf")
    prompt = _lookup_sampling_prompt(m, list(b"abcde"), 2)
    exact = _exact_joint(m, prompt, 3, 1.0, 2, 1.0)
    d, n, g = LookupDrafter(), 250, torch.Generator().manual_seed(0)
    counts: dict = {}
    for _ in range(n // 2):
        out = m.generate(torch.tensor([prompt] * 2), 3, temperature=1.0, top_k=2, generator=g, draft=d,
                         draft_len=2, graph_verify=graph_verify)
        for seq in map(tuple, out.tolist()):
            assert seq in exact, seq
            counts[seq] = counts.get(seq, 0) + 1
    assert 0 < d.accepted < d.proposed  # drafts kept and rejected
    assert verifier(m.decoder.kept_steppers()[0]).passes > 0
    tv = _tv(exact, {s: c / n for s, c in counts.items()})
    assert tv < 0.15, tv
    if graph_verify == "aligned":  # shorter drafts than the eager passes': other draws, the same distribution
        return
    # the same draws as the eager passes (the same generator calls in the same order)
    for seed in range(8):
        kw = dict(temperature=1.0, top_k=2, draft="lookup", draft_len=2)
        assert torch.equal(m.generate(torch.tensor([prompt] * 2), 6, generator=torch.Generator().manual_seed(seed),
                                      graph_verify=True, **kw),
                           m.generate(torch.tensor([prompt] * 2), 6, generator=torch.Generator().manual_seed(seed),
                                      **kw))


def test_static_support_says_which_models_fall_back(caplog):
    """static_support (what omnibyte generate's precision line reads before decoding) names the reason exactly where
    generate(..., graph_verify=True) falls back to the eager passes, and builds nothing it keeps."""
    import logging

    for name in ("m2_tf", "tf_tf", "m2_tf_tf", "tf_m1", "m1_flat"):
        m, _ = _models(name)
        why = static_support(m)
        with caplog.at_level(logging.INFO, logger="omnibyte.model"):
            caplog.clear()
            m.generate(b"abcabcab", 6, temperature=0, draft="lookup", graph_verify=True)
        fell_back = [r.getMessage() for r in caplog.records if "no static verification" in r.getMessage()]
        assert bool(fell_back) == (why is not None), (name, why, fell_back)
        assert why is None or f"({why})" in fell_back[0], (why, fell_back)
        assert (static_support(m, passes=False) is None) == (name in ("m2_tf", "m2_tf_tf")), name
    m, _ = _models("m2_tf")
    m.decoder.clear_steppers()
    assert static_support(m) is None and m.decoder.kept_steppers() == []
    assert "no cached byte decoder" in static_support(torch.nn.Linear(2, 2))


def test_models_without_a_static_pass_fall_back_to_the_eager_one():
    for name in ("tf_tf", "m2_tf_tf"):  # a Transformer global stage; three stages
        m, _ = _models(name)
        prompt = _echo_prompt(m)
        want = m.generate(prompt, 20, temperature=0)
        assert torch.equal(m.generate(prompt, 20, temperature=0, draft="lookup", draft_len=4, graph_verify=True),
                           want)
    with pytest.raises(NotImplementedError, match="two stages"):
        StaticVerifier(_stepper(m, torch.zeros(1, 8, dtype=torch.long)))
    with pytest.raises(ValueError, match="graph_verify=True is for speculative"):
        m.generate(b"ab", 4, graph_verify=True)
    m = tiny(STAGES)
    with pytest.raises(ValueError, match="use_graphs"):
        m.generate(b"ab", 4, draft="lookup", use_graphs=True)
    p = list(b"abcabcabcab")
    assert torch.equal(m.generate(p, 9, temperature=0, draft="lookup", graph_verify=True, use_graphs=True),
                       m.generate(p, 9, temperature=0))


class _Gappy(Drafter):
    """Drafts constant bytes, row b ``b`` fewer than row 0 (padded, ``draft_lengths``), and nothing at all every
    third round (a plain step): every branch of the round loop."""

    def reset(self, context):
        self.n, self.B = 0, context.shape[0]

    def propose(self, k, temperature, top_k, top_p, generator):
        self.n += 1
        self.lengths = [0] * self.B if self.n % 3 == 0 else [max(0, k - b) for b in range(self.B)]
        return torch.full((self.B, max(self.lengths)), 101), None

    def draft_lengths(self, drafts):
        return list(self.lengths)

    def advance(self, kept, tokens):
        pass


def test_the_static_and_eager_passes_share_one_round_loop():
    """speculative.rounds serves both backends: with the same generator the static passes give the eager ones'
    bytes and statistics (drafted, kept, rounds) -- greedy and sampled, stop tokens, rounds without drafts, short
    drafts padded, a last byte as a plain step, prompts shorter than a patch (eager passes on the stepper's state)."""
    m, d = _peaked_pair("m2_tf")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (3, 9), generator=g), torch.tensor([list(b"ab")] * 2)]
    ran = 0
    for prompt in prompts:
        plain = m.generate(prompt, 17, temperature=0)
        for temperature, stops in ((0, ()), (0, (int(plain[0, 5]), int(plain[1, 9]))), (1.0, ()), (1.0, (97, 98))):
            for mk in (_Gappy, lambda: ModelDrafter(d, m), lambda: LookupDrafter(min_ngram=1)):
                for new, k in ((17, 3), (6, 5), (2, 1)):
                    got = []
                    for graph_verify in (False, True):
                        dr = mk()
                        out = m.generate(prompt, new, temperature=temperature, top_k=3, stop_tokens=stops,
                                         generator=torch.Generator().manual_seed(1), draft=dr, draft_len=k,
                                         graph_verify=graph_verify)
                        got.append((out.tolist(), dr.proposed, dr.accepted, dr.rounds))
                    assert got[0] == got[1], (temperature, stops, mk, new, k)
                    ran += got[0][3]
    assert ran > 0 and verifier(m.decoder.kept_steppers()[0]).passes > 0


def test_aligned_passes_stay_in_one_patch_and_equal_plain_greedy(monkeypatch):
    """graph_verify="aligned": every static pass is one within-patch segment (a global step only where it starts a
    patch), its length is 1 + min(draft_len, the room left in the patch) -- one length per start phase, so one
    graph each -- and greedy output is plain greedy's (lookup and model drafters, a batch, stops, short prompts)."""
    m = tiny(STAGES)
    Q0 = m.units[0]
    seen = []
    run = StaticVerifier._pass

    def record(self, phase0, T):
        seen.append((phase0, T))
        return run(self, phase0, T)

    monkeypatch.setattr(StaticVerifier, "_pass", record)
    prompt = _echo_prompt(m)
    plain = m.generate(prompt, 40, temperature=0)
    for k in (1, 3, Q0 - 1, Q0, Q0 + 3):
        seen.clear()
        d = LookupDrafter()
        out = m.generate(prompt, 40, temperature=0, draft=d, draft_len=k, graph_verify="aligned")
        assert torch.equal(out, plain), k
        assert seen and d.accepted > 0, k
        for phase0, T in seen:
            assert len(segments(phase0, T, Q0)) == 1, (k, phase0, T)  # no second local segment in a pass
            assert T == 1 + min(k, Q0 - 1 - phase0), (k, phase0, T)  # the room left in the patch
        assert len({T for _, T in seen}) <= Q0 and len(set(seen)) == len({p for p, _ in seen})  # one T per phase
    # unaligned passes of the same drafts do cross patches
    seen.clear()
    assert torch.equal(m.generate(prompt, 40, temperature=0, draft=LookupDrafter(), draft_len=Q0, graph_verify=True),
                       plain)
    assert any(len(segments(p0, T, Q0)) > 1 for p0, T in seen)
    other = torch.randint(0, 256, (1, len(prompt)), generator=torch.Generator().manual_seed(0))
    batch = torch.cat((torch.tensor([prompt]), other))
    kw = dict(temperature=0, draft="lookup", draft_len=5, graph_verify="aligned")
    stops = (int(plain[0, 17]),)
    assert torch.equal(m.generate(batch, 30, stop_tokens=stops, **kw),
                       m.generate(batch, 30, temperature=0, stop_tokens=stops))
    md, bad = _models("m2_tf")
    for p in (torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(2)), list(b"a"), []):
        want = md.generate(p, 20, temperature=0)
        got = md.generate(p, 20, temperature=0, draft=ModelDrafter(bad, md), draft_len=6, graph_verify="aligned")
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="graph_verify must be"):
        m.generate(prompt, 4, temperature=0, draft="lookup", graph_verify="yes")


def _live_state(gs: GraphStepper) -> list[torch.Tensor]:
    return [gs.window, gs.ctx[1], *(t for c in gs.caches for d in c for t in d.values())]


def _compiled_pass_walk(m, Ts, passes: int, seed: int) -> StaticVerifier:
    """A verifier whose pass is compiled (``stepper.compiled``; the stepper's own steps eager, so only the pass
    compiles) beside an uncompiled one on the same state: ``passes`` passes of T in ``Ts`` in turn, each rolled back
    to a kept prefix cycling through 1..T (so the start phases change). Logits and argmax equal after each pass,
    position, window, context and every cache after each rollback; returns the compiled verifier."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (2, m.units[0]), generator=g)
    gs = _stepper(m, prompt)
    gs.compiled = True
    comp, eager = StaticVerifier(gs), StaticVerifier(_stepper(m, prompt))
    assert comp.compile and not eager.compile
    for i in range(passes):
        T = Ts[i % len(Ts)]
        toks = torch.randint(0, 256, (2, T), generator=g)
        a, b = comp.run(toks).clone(), eager.run(toks).clone()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert torch.equal(comp.argmax, eager.argmax) and torch.equal(comp.argmax, a.argmax(-1))
        keep = 1 + (i * 3 + i // len(Ts)) % T
        comp.rollback(keep)
        eager.rollback(keep)
        assert comp.st.n == eager.st.n
        for x, y in zip(_live_state(comp.st), _live_state(eager.st), strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert eager.segment is _segment and comp.segment is not _segment  # only the first compiled
    return comp


@pytest.mark.slow  # ~10 s of dynamo tracing on 2 cores (CI runs -m slow too)
def test_compiled_pass_equals_the_uncompiled_pass(monkeypatch):
    """Where the stepper is compiled, a segment's local stage, head and argmax is one torch.compile'd function.
    Here with backend aot_eager (dynamo's capture and the functionalised in-place writes into the static KV, without
    inductor's slow CPU codegen; the slow test below runs inductor): from every start phase, T below and past the
    patch, the logits, argmax and the state after rollback equal the uncompiled pass's, and ONE graph serves every
    segment of every pass length -- more segments than dynamo's recompile limit, none recompiled (nor run eagerly:
    fullgraph). (It was one compile per segment: up to 16 for T = 9 over patches of 8, which did not fit a 170-s
    benchmark on an H100.)"""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(StaticVerifier, "compile_backend", "aot_eager")
    m = tiny(STAGES)
    Q0 = m.units[0]
    Ts = (Q0 - 1, Q0 + 1)
    graphs = counters["stats"]["unique_graphs"]
    comp = _compiled_pass_walk(m, Ts, 40, 0)
    want = {(T, *seg) for T in Ts for phase0 in range(Q0) for seg in segments(phase0, T, Q0)}
    assert set(comp.segs) == want  # every segment of every start phase ran
    assert len(want) > dynamo_config.recompile_limit
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph for all of them, no recompiles


def test_compile_pass_off_keeps_the_eager_pass_under_a_compiled_stepper(monkeypatch):
    """StaticVerifier.compile_pass = False (benchmarks/generate.py --verify-compile 0): a compiled stepper's passes
    run their eager torch ops, so the two can be timed in one job."""
    m = tiny(STAGES)
    toks = torch.randint(0, 256, (1, m.units[0] + 1))
    st = m.new_state(1, toks.device)
    m.feed(st, toks)
    gs = GraphStepper(m, st, compile=True)
    assert StaticVerifier(gs).compile
    monkeypatch.setattr(StaticVerifier, "compile_pass", False)
    assert not StaticVerifier(gs).compile


@pytest.mark.slow  # inductor's CPU codegen of the segment function
def test_compiled_pass_inductor_and_greedy():
    """As above with inductor (the backend used on GPU; T past the patch, every start phase), and greedy
    speculative decoding with compile_step=True (the stepper's steps and the passes compiled) gives plain greedy's
    bytes."""
    m = tiny(STAGES)
    Q0 = m.units[0]
    comp = _compiled_pass_walk(m, (Q0 + 1,), 6, 1)
    assert len(comp.segs) >= 4
    prompt = _echo_prompt(m)
    plain = m.generate(prompt, 24, temperature=0)
    d = LookupDrafter()
    assert torch.equal(m.generate(prompt, 24, temperature=0, draft=d, draft_len=2, graph_verify=True,
                                  compile_step=True), plain)
    assert d.accepted > 0
    (gs,) = [s for s in m.decoder.kept_steppers() if s.compiled]
    assert verifier(gs).passes > 0 and verifier(gs).segs


_INTERLEAVED = r"""
import json, random, sys, torch
sys.path.insert(0, sys.argv[1])
from model_helpers import tiny, M2
from omnibyte.model.inference.graphs import GraphStepper
from omnibyte.model.inference.graph_verify import StaticVerifier
m = tiny([(16, 32, M2), (4, 32, {"name": "transformer", "heads": 3, "head_dim": 8, "mlp_hidden": 40})])
x = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(0))
random.seed(0)
with torch.no_grad():
    full = m(x)
    st = m.new_state(2)
    m.feed(st, x[:, :6])
    gs = GraphStepper(m, st, use_graphs=False, kernels=True)
    gs._convert()
    from omnibyte.model.inference import graph_verify
    seg_calls = []
    real = graph_verify._segment_kernels
    graph_verify._segment_kernels = lambda *a: seg_calls.append(1) or real(*a)
    default = StaticVerifier(gs).kernels  # 2 x 4 rows per segment: over kernels.MAX_ROWS, torch segments
    StaticVerifier.kernel_segments = True  # asked for: the segments through the kernels too
    v, n, worst, passes = StaticVerifier(gs), 6, 0.0, 0
    while n < 55:
        if random.random() < 0.5:  # a pass of T tokens, keeping a random prefix
            T = random.choice([2, 3, 5, 6])
            keep = random.randint(1, T)
            out = v.run(x[:, n:n + T].clone())
            worst = max(worst, (out[:, :keep] - full[:, n + 1:n + 1 + keep]).abs().max().item())
            v.rollback(keep)
            n, passes = n + keep, passes + 1
        else:  # a plain step through the kernels
            o = gs.feed(x[:, n:n + 1])
            n += 1
            worst = max(worst, (o - full[:, n]).abs().max().item())
print(json.dumps(dict(kernels=gs.kernels, default=default, worst=worst, passes=passes,
                      segment_kernel_calls=len(seg_calls))))
"""


@pytest.mark.slow  # Triton's interpreter in a subprocess: ~5 s
def test_static_passes_interleave_with_the_kernel_step_interpreted():
    """The GraphStepper's Triton decode kernels (under Triton's interpreter) and the static passes -- their segments
    through the same kernels (segment_kernels) -- share the KV buffers: plain kernel steps and passes with random
    rollbacks, interleaved, give the full forward's logits."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _INTERLEAVED, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["kernels"] is True and r["passes"] > 5 and r["segment_kernel_calls"] >= r["passes"]
    assert r["default"] is False  # by default segments of more rows than kernels.MAX_ROWS take the torch ops
    assert r["worst"] < 1e-5, r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", [True, False])
def test_gpu_captured_pass_equals_the_eager_static_pass(kernels, monkeypatch):
    """The CUDA graph of each (start phase, T) -- its segments through the decode kernels (segment_kernels) or torch
    ops -- gives the eager torch static pass's logits, and rollback after a replay leaves the stepper as the eager
    one (then fed on: same logits)."""
    from omnibyte.model.blocks.mamba2 import load_mamba_kernels

    monkeypatch.setattr(StaticVerifier, "kernel_segments", kernels)

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not loadable")
    m = tiny([(16, 64, dict(M2K, d_state=32, headdim=16, chunk_size=16)), (8, 64, TF)]).cuda()
    Q0 = m.units[0]
    g = torch.Generator().manual_seed(0)
    for plen in range(Q0, 2 * Q0):
        prompt = torch.randint(0, 256, (2, plen), generator=g).cuda()
        for T in (3, Q0 + 1):
            toks = torch.randint(0, 256, (2, T), generator=g).cuda()
            graphed = StaticVerifier(_stepper(m, prompt, True, kernels))
            eager = StaticVerifier(_stepper(m, prompt, False, False))
            assert graphed.st.kernels is kernels and graphed.kernels is kernels
            for keep in (1, T):
                a, b = graphed.run(toks).clone(), eager.run(toks).clone()
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
                graphed.rollback(keep)
                eager.rollback(keep)
                nxt = toks[:, :1]
                torch.testing.assert_close(graphed.st.feed(nxt), eager.st.feed(nxt), atol=1e-4, rtol=0)
            assert graphed.captures >= 1 and eager.captures == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_captured_pass_equals_the_eager_static_pass():
    """With the stepper compiled (its steps and the passes' segments torch.compile'd with inductor, before capture):
    the CUDA graph of each (start phase, T) gives the eager static pass's logits and argmax, and rollback leaves the
    stepper as the eager one (then fed on: same logits); greedy speculative decoding with compile_step gives plain
    graphed greedy's bytes."""
    from omnibyte.model.blocks.mamba2 import load_mamba_kernels

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not loadable")
    m = tiny([(16, 64, dict(M2K, d_state=32, headdim=16, chunk_size=16)), (8, 64, TF)]).cuda()
    Q0 = m.units[0]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (2, Q0), generator=g).cuda()
    st = m.new_state(2)
    m.feed(st, prompt)
    graphed = StaticVerifier(GraphStepper(m, st, use_graphs=True, compile=True, kernels=False))  # compiled torch
    graphed.st._convert()
    eager = StaticVerifier(_stepper(m, prompt, False, False))
    T = Q0 + 1
    for i in range(2 * Q0):  # keeps 1..T in turn: every start phase
        toks = torch.randint(0, 256, (2, T), generator=g).cuda()
        a, b = graphed.run(toks).clone(), eager.run(toks).clone()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert torch.equal(graphed.argmax, a.argmax(-1))
        keep = 1 + (i * 3) % T
        graphed.rollback(keep)
        eager.rollback(keep)
        nxt = toks[:, :1]
        torch.testing.assert_close(graphed.st.feed(nxt), eager.st.feed(nxt), atol=1e-4, rtol=0)
    assert graphed.compile and graphed.segs and graphed.captures == len(graphed.graphs) >= 2
    prompt = torch.tensor([_echo_prompt(m)], device="cuda")
    kw = dict(temperature=0, use_graphs=True, compile_step=True)
    plain = m.generate(prompt, 64, **kw)
    d = LookupDrafter()
    assert torch.equal(m.generate(prompt, 64, draft=d, draft_len=8, graph_verify=True, **kw), plain)
    assert d.accepted > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graph_verify_greedy_equals_plain_graphed_greedy():
    """On CUDA: lookup speculative decoding through the captured static passes gives plain graphed greedy's
    bytes (drafts kept and rejected, draft lengths below, at and past the patch)."""
    from omnibyte.model.blocks.mamba2 import load_mamba_kernels

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not loadable")
    m = tiny([(16, 64, dict(M2K, d_state=32, headdim=16, chunk_size=16)), (8, 64, TF)]).cuda()
    prompt = torch.tensor([_echo_prompt(m)], device="cuda")
    plain = m.generate(prompt, 64, temperature=0, use_graphs=True)
    assert torch.equal(m.generate(prompt, 64, temperature=0), plain)
    for k in (3, 8, 9):
        d = LookupDrafter()
        out = m.generate(prompt, 64, temperature=0, draft=d, draft_len=k, graph_verify=True, use_graphs=True)
        assert torch.equal(out, plain), k
        assert d.accepted > 0
    ver = verifier(m.decoder.kept_steppers()[-1])
    assert ver.captures > 0 and ver.st.use_graphs
