"""Speculative decoding (omnibyte.model.inference.speculative): the multi-position verification pass equals
step-by-step feed, rollback equals feeding only the kept bytes, greedy output equals plain greedy decoding,
and sampled output follows the model's own distribution (rejection sampling)."""

from __future__ import annotations

import copy

import pytest
import torch

from omnibyte.model.inference.sampling import sampling_probs
from omnibyte.model.inference.speculative import (
    Drafter,
    ModelDrafter,
    SelfDrafter,
    accept,
    accept_greedy,
    verify,
)
from tests.model_helpers import M1, M2, TF, one_thread, tiny  # noqa: F401 - one_thread is an autouse fixture

# (name, stages, draft stages): 1-, 2- and 3-stage models with Transformer and recurrent (Mamba) stages, global
# and inner; patch products 4, 4, 4, 6 and 1
CONFIGS = {
    "tf_tf": ([(16, 16), (4, 16)], [(16, 8), (4, 8)]),
    "m2_tf": ([(16, 16, M2), (4, 16)], [(16, 8, M2), (2, 8)]),
    "tf_m1": ([(16, 16), (4, 16, M1)], [(16, 8), (4, 8)]),
    "m2_tf_tf": ([(8, 16, M2), (3, 16), (2, 16)], [(16, 8), (4, 8)]),
    "m1_flat": ([(64, 16, M1)], [(64, 8, M1)]),  # one stage over bytes (MambaByte-style)
}


def _models(name, seed=0):
    stages, draft = CONFIGS[name]
    return tiny(stages, seed=seed), tiny(draft, seed=seed + 100)


def _stepwise(m, prompt, tokens):
    """Reference: feed the prompt, then one token at a time; the logits after each."""
    st = m.new_state(1)
    m.feed(st, prompt)
    return st, torch.stack([m.feed(st, tokens[:, i:i + 1]) for i in range(tokens.shape[1])], dim=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_verification_logits_equal_stepwise_feed(name):
    m, _ = _models(name)
    P = m.units[0]
    g = torch.Generator().manual_seed(1)
    for plen in (1, P - 1, P, 2 * P + 1):  # prompts ending mid-patch and right at a boundary
        prompt = torch.randint(0, 256, (1, plen), generator=g)
        for T in range(1, P + 3):  # crossing one or two patch boundaries
            toks = torch.randint(0, 256, (1, T), generator=g)
            _, ref = _stepwise(m, prompt, toks)
            st = m.new_state(1)
            m.feed(st, prompt)
            ver = verify(m.decoder, st, toks)
            assert ver.logits.shape == ref.shape
            torch.testing.assert_close(ver.logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rollback_equals_feeding_only_the_kept_tokens(name):
    m, _ = _models(name)
    P = m.units[0]
    g = torch.Generator().manual_seed(2)
    for plen in (1, P + 1, 2 * P - 1):
        prompt = torch.randint(0, 256, (1, plen), generator=g)
        T = P + 2
        toks = torch.randint(0, 256, (1, T), generator=g)
        after = torch.randint(0, 256, (1, P + 1), generator=g)  # continue across a boundary after rollback
        for keep in range(1, T + 1):
            st = m.new_state(1)
            m.feed(st, prompt)
            verify(m.decoder, st, toks).rollback(keep)
            ref_st, _ = _stepwise(m, prompt, toks[:, :keep])
            assert st.length == ref_st.length == plen + keep
            assert torch.equal(st.tokens, ref_st.tokens) and st.offset == ref_st.offset
            for s, (a, b) in enumerate(zip(st.stages, ref_st.stages)):
                assert (a.parent, a.cache.length) == (b.parent, b.cache.length), (keep, s)
            for i in range(after.shape[1]):
                torch.testing.assert_close(m.feed(st, after[:, i:i + 1]), m.feed(ref_st, after[:, i:i + 1]),
                                           atol=1e-5, rtol=0)
            # a second verification from the rolled-back state is right too (and a verification rolls back once)
            st2 = m.new_state(1)
            m.feed(st2, prompt)
            first = verify(m.decoder, st2, toks)
            first.rollback(keep)
            with pytest.raises(RuntimeError, match="once only"):
                first.rollback(keep)
            ver = verify(m.decoder, st2, after)
            _, ref = _stepwise(m, torch.cat((prompt, toks[:, :keep]), 1), after)
            torch.testing.assert_close(ver.logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_speculative_equals_plain_greedy(name):
    for seed in (0, 1):
        m, bad = _models(name, seed)
        P = m.units[0]
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 256, (1 + 2 * seed, P + 1), generator=g)  # ends mid-patch; seed 1: 3 rows
        new = 3 * P + 1  # not a multiple of any draft length > 1
        plain = m.generate(prompt, new, temperature=0)
        for k in range(1, P + 2) if seed == 0 else (2, P + 1):  # every draft length 1..patch + 1
            drafter = ModelDrafter(bad, m)
            out = m.generate(prompt, new, temperature=0, draft=drafter, draft_len=k)
            assert torch.equal(out, plain), (seed, k)
            assert drafter.proposed > 0
        # the target as its own drafter: every draft is kept
        own = ModelDrafter(m, m)
        assert torch.equal(m.generate(prompt, new, temperature=0, draft=own, draft_len=P + 1), plain)
        assert own.accepted == own.proposed


def test_bad_drafter_still_exact_with_low_acceptance():
    m, _ = _models("m2_tf")
    bad = tiny([(16, 8), (4, 8)], seed=7)
    prompt = list(b"The red fox ")
    plain = m.generate(prompt, 40, temperature=0)
    d = ModelDrafter(bad, m)
    assert torch.equal(m.generate(prompt, 40, temperature=0, draft=d, draft_len=4), plain)
    assert d.acceptance < 0.2  # random models disagree


def test_both_models_come_back_in_the_mode_they_came_in():
    m, d = _models("tf_tf")
    m.train(), d.train()
    m.generate(list(b"ab"), 6, temperature=0, draft=d, draft_len=3)
    assert m.training and d.training and all(x.training for x in d.modules())
    d.eval()
    m.generate(list(b"ab"), 6, temperature=0, draft=d, draft_len=3)
    assert m.training and not d.training


def test_stop_tokens_batches_and_edge_lengths():
    m, bad = _models("tf_tf")
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 256, (3, 5), generator=g)
    plain = m.generate(prompts, 30, temperature=0)
    # stop tokens: each row's greedy bytes at different places (one row never stops)
    stops = (int(plain[0, 6]), int(plain[1, 13]))
    ref = m.generate(prompts, 30, temperature=0, stop_tokens=stops)
    for k in (1, 3, 5):
        out = m.generate(prompts, 30, temperature=0, stop_tokens=stops, draft=bad, draft_len=k)
        assert torch.equal(out, ref), k
    # every row stops: the output ends at the last row's stop
    ref = m.generate(prompts[:2], 30, temperature=0, stop_tokens=stops)
    assert torch.equal(m.generate(prompts[:2], 30, temperature=0, stop_tokens=stops, draft=bad, draft_len=3), ref)
    for new in (0, 1, 2):
        assert torch.equal(m.generate(prompts, new, temperature=0, draft=bad, draft_len=4),
                           m.generate(prompts, new, temperature=0))
    # an empty prompt
    assert torch.equal(m.generate([], 9, temperature=0, draft=bad, draft_len=2), m.generate([], 9, temperature=0))


def test_bad_arguments_are_refused():
    m, bad = _models("tf_tf")
    with pytest.raises(ValueError, match="draft_len"):
        m.generate(b"ab", 4, draft=bad, draft_len=0)
    with pytest.raises(ValueError, match="use_graphs"):
        m.generate(b"ab", 4, draft=bad, use_graphs=True)
    with pytest.raises(TypeError, match="draft must be"):
        m.generate(b"ab", 4, draft="runs/x")
    other = tiny([(16, 8), (4, 8)], vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary"):
        m.generate(b"ab", 4, draft=other)
    short = tiny([(2, 8), (4, 8)], block={"name": "transformer", "heads": 2, "positions": "learned"})
    assert short.stream_meta.max_len == 8
    with pytest.raises(ValueError, match="draft model: generation past this model's max_len 8"):
        m.generate(b"abcde", 8, temperature=0, draft=short, draft_len=2)
    for kw in ({}, {"draft": "lookup"}):  # a batch of no rows: one clear error, not a reshape's inside feed
        with pytest.raises(ValueError, match="a batch of no rows"):
            m.generate(torch.zeros(0, 5, dtype=torch.long), 4, temperature=0, **kw)
    assert m.generate(torch.zeros(2, 0, dtype=torch.long), 3, temperature=0).shape == (2, 3)  # empty rows are fine


def test_accept_rejection_where_p_equals_q_draws_from_p(monkeypatch):
    """Where q equals p (to rounding) and the draft is rejected anyway (u at its top), max(0, p - q) is all zero:
    accept draws the correction from p itself, a token p allows, never from an all-zero residual."""
    from omnibyte.model.inference import rounds as rounds_mod

    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, -30.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    q = sampling_probs(logits[:1], 1.0)  # exactly p_0
    monkeypatch.setattr(rounds_mod.torch, "rand", lambda k, generator=None, device=None: torch.ones(k))
    seen = set()
    for _ in range(200):
        kept, x = accept(logits, torch.tensor([0]), q, 1.0, 0, 1.0, g)
        assert kept == 0
        seen.add(x)
    assert seen <= {0, 1, 3} and len(seen) == 3  # from p_0: token 2 has probability ~1e-14


def test_accept_is_exact_rejection_sampling():
    """One verification round with fixed target (p) and draft (q) distributions: the first emitted token is
    distributed as p_0, and the second (given the first draft was kept) as p_1."""
    g = torch.Generator().manual_seed(0)
    V, n = 5, 10000
    logits = torch.randn(3, V, generator=g) * 1.5
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    p = sampling_probs(logits, 1.0)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).T  # (n, 2): draft i drawn from q_i
    first = torch.zeros(V)
    second = torch.zeros(V)
    for d in drafts:
        kept, x = accept(logits, d, q, 1.0, 0, 1.0, g)
        out = d[:kept].tolist() + [x]
        first[out[0]] += 1
        if kept >= 1:
            second[out[1]] += 1
    assert 0.5 * (first / n - p[0]).abs().sum() < 0.025
    assert 0.5 * (second / second.sum() - p[1]).abs().sum() < 0.04
    assert 0.5 * (q[0] - p[0]).abs().sum() > 0.2  # the drafter's own distribution is far from p


def test_accept_greedy_keeps_drafts_while_they_are_the_argmax():
    """accept's greedy rule (temperature 0), which the round loop applies to every row's argmax at once: drafts kept
    up to the first that is not the target's argmax, then the argmax there (the bonus one when all are kept)."""
    logits = torch.full((4, 6), -1.0)
    logits[torch.arange(4), torch.tensor([2, 5, 0, 3])] = 1.0  # argmax 2, 5, 0, then the bonus 3
    for drafts, want in (([2, 5, 0], (3, 3)), ([2, 5, 1], (2, 0)), ([4, 5, 0], (0, 2)), ([], (0, 2))):
        d = torch.tensor(drafts, dtype=torch.long)
        assert accept(logits[:len(drafts) + 1], d, None, 0.0, 0, 1.0, None) == want, drafts
        assert accept_greedy(logits[:len(drafts) + 1].argmax(-1), d) == want, drafts


def _exact_joint(m, prompt, n, temperature, top_k, top_p):
    """The exact distribution of the first n sampled bytes (over the filtered support), from feed."""
    out = {}

    def walk(st_tokens, prob, seq):
        if len(seq) == n:
            out[tuple(seq)] = prob
            return
        st = m.new_state(1)
        p = sampling_probs(m.feed(st, torch.tensor([st_tokens])), temperature, top_k, top_p)[0]
        for t in p.nonzero()[:, 0].tolist():
            walk(st_tokens + [t], prob * float(p[t]), seq + [t])

    walk(list(prompt), 1.0, [])
    return out


def _tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(s, 0) - b.get(s, 0)) for s in set(a) | set(b))


def _sample_counts(m, drafter, prompt, samples, temperature, top_k, top_p, seed, draft_len, exact, rows=2):
    """``samples`` draws of 3 bytes, ``rows`` per generate call: the rows of a batch advance together (each
    round by the shortest acceptance), and each row must still follow the model's distribution."""
    g = torch.Generator().manual_seed(seed)
    counts: dict = {}
    for _ in range(samples // rows):
        out = m.generate(torch.tensor([prompt] * rows), 3, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=g, draft=drafter, draft_len=draft_len)
        for seq in map(tuple, out.tolist()):
            assert seq in exact, seq  # never outside the filtered support
            counts[seq] = counts.get(seq, 0) + 1
    return counts


def _peaked_pair(name, noise=0.5):
    """A target with peaked byte distributions and a drafter that partly agrees with it (a noisy copy)."""
    m, _ = _models(name)
    with torch.no_grad():
        m.head.weight.mul_(40)
        d = copy.deepcopy(m)
        g = torch.Generator().manual_seed(5)
        d.head.weight.add_(torch.randn(d.head.weight.shape, generator=g) * noise * d.head.weight.std())
    return m, d


def test_speculative_sampling_follows_the_model_distribution():
    """The first 3 sampled bytes (bytes 2 and 3 come from a verification round) follow the model's exact joint
    distribution under temperature and top-k, with a drafter that half agrees with the model (drafts kept and
    rejected; a drafter whose drafts were always kept would give its own distribution, far from it). 250
    samples, two rows per call: a coarse bound; the slow chi-square test below is the fine one."""
    m, d = _peaked_pair("tf_tf")
    prompt = list(b"abcde")
    exact = _exact_joint(m, prompt, 3, 1.0, 2, 1.0)
    assert len(exact) == 8
    assert _tv(exact, _exact_joint(d, prompt, 3, 1.0, 2, 1.0)) > 0.5  # the test can tell the two apart
    n, drafter = 250, ModelDrafter(d, m)
    counts = _sample_counts(m, drafter, prompt, n, 1.0, 2, 1.0, 0, 2, exact)
    assert 0.2 < drafter.acceptance < 0.9, drafter.acceptance  # both branches of the rejection scheme ran
    tv = _tv(exact, {s: c / n for s, c in counts.items()})
    assert tv < 0.15, tv


def _assert_chi_square(counts: dict, exact: dict, n: int) -> None:
    """``n`` samples' ``counts`` follow the ``exact`` distribution: a chi-square test at the 0.1% level over the
    sequences expected at least 5 times, the rest pooled in one cell; at least 5 cells."""
    big = [s for s, p in exact.items() if n * p >= 5]
    obs = [counts.get(s, 0) for s in big] + [n - sum(counts.get(s, 0) for s in big)]
    exp = [n * exact[s] for s in big] + [n * (1 - sum(exact[s] for s in big))]
    cells = [(o, e) for o, e in zip(obs, exp) if e > 1e-9]
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    assert len(cells) >= 5
    assert chi2 < _chi2_critical_999(len(cells) - 1), (chi2, len(cells))


def _chi2_critical_999(dof: int) -> float:
    """The 0.999 quantile of chi-square with ``dof`` degrees of freedom (Wilson-Hilferty; within ~1% here)."""
    z = 3.090232
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


@pytest.mark.slow
def test_speculative_sampling_chi_square_top_p():
    """As above with a Mamba-2 global stage, temperature 0.9, top-k 3 and nucleus 0.9, drafts of 2 bytes and
    2,500 samples (2 rows per call): a chi-square test at the 0.1% level (cells expected below 5 counts pooled)."""
    m, d = _peaked_pair("m2_tf", noise=0.2)
    prompt = list(b"abcde")
    n, drafter = 2500, ModelDrafter(d, m)
    exact = _exact_joint(m, prompt, 3, 0.9, 3, 0.9)
    counts = _sample_counts(m, drafter, prompt, n, 0.9, 3, 0.9, 1, 2, exact, rows=2)
    assert 0.1 < drafter.acceptance < 0.9, drafter.acceptance  # rows kept the shorter acceptance of the two
    _assert_chi_square(counts, exact, n)


class _Constant(Drafter):
    """Always drafts the same byte (a deliberately poor drafter that needs no model)."""

    def reset(self, context):
        pass

    def propose(self, k, temperature, top_k, top_p, generator):
        toks = torch.full((1, k), 101)
        if temperature <= 0:
            return toks, None
        return toks, sampling_probs(torch.zeros(1, k, 264).index_fill_(2, torch.tensor([101]), 50.0), 1.0)

    def advance(self, kept, token):
        pass


def test_any_drafter_subclass_gives_exact_greedy_output():
    m, _ = _models("m2_tf_tf")
    plain = m.generate(b"hello", 25, temperature=0)
    d = _Constant()
    assert torch.equal(m.generate(b"hello", 25, temperature=0, draft=d, draft_len=3), plain)
    assert d.proposed > 0


class _Silent(Drafter):
    """Never drafts anything: every round is a plain step."""

    def reset(self, context):
        self.B = context.shape[0]

    def propose(self, k, temperature, top_k, top_p, generator):
        return torch.zeros(self.B, 0, dtype=torch.long), None

    def advance(self, kept, tokens):
        pass


@pytest.mark.parametrize("graph_verify", [False, True])
def test_acceptance_is_none_until_something_was_drafted(graph_verify, caplog):
    """Drafter.acceptance is None, not NaN, while nothing was drafted (no round, or only plain steps), and the
    debug line says there is no rate (it printed "nan%"); once drafts were verified it is kept / drafted."""
    import logging

    m, _ = _models("m2_tf")
    assert Drafter().acceptance is None
    plain = m.generate(b"hello", 9, temperature=0)
    for d, new in ((_Silent(), 9), (_Constant(), 1)):  # only plain steps; one byte, the prefill's: no round
        with caplog.at_level(logging.DEBUG, logger="omnibyte.model"):
            caplog.clear()
            out = m.generate(b"hello", new, temperature=0, draft=d, draft_len=3, graph_verify=graph_verify)
        assert torch.equal(out, plain[:, :new])
        assert d.proposed == d.accepted == d.rounds == 0 and d.acceptance is None, type(d).__name__
        line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("speculative decoding: 0 rounds")]
        assert line and "no acceptance rate" in line[0] and "nan" not in line[0], line
    d = _Constant()
    with caplog.at_level(logging.DEBUG, logger="omnibyte.model"):
        caplog.clear()
        m.generate(b"hello", 9, temperature=0, draft=d, draft_len=3, graph_verify=graph_verify)
    assert d.proposed > 0 and d.acceptance == d.accepted / d.proposed
    assert f"({100 * d.acceptance:.1f}%)" in caplog.text


class _Scripted(Drafter):
    """Drafts the target's own greedy bytes (``plain``, (B, new)): row 0 all k, the other rows only their first
    ``short``, padded to k with bytes the greedy model rejects (not its own), declared through ``draft_lengths``."""

    def __init__(self, plain, short):
        super().__init__()
        self.plain, self.short, self.script = plain, short, []

    def reset(self, context):
        self.pos = 1  # the context ends with the first generated byte

    def propose(self, k, temperature, top_k, top_p, generator):
        B = self.plain.shape[0]
        self.lengths = [k] + [min(k, self.short)] * (B - 1)
        toks = (self.plain[:, self.pos:self.pos + k] + 1) % 256  # every one wrong
        for b, n in enumerate(self.lengths):
            toks[b, :n] = self.plain[b, self.pos:self.pos + n]
        self.script.append(list(self.lengths))
        return toks, None

    def draft_lengths(self, drafts):
        return list(self.lengths)

    def advance(self, kept, tokens):
        self.pos += kept + 1


@pytest.mark.parametrize("graph_verify", [False, True])
@pytest.mark.parametrize("short", [0, 2])
def test_padded_draft_slots_are_not_counted_as_drafted(short, graph_verify):
    """A batch where one row drafts fewer bytes than the other (none at all, or 2 of 4): its pad slots are not
    drafted bytes. drafted == the rows' real draft lengths summed, kept == the real drafts emitted (the batch
    keeps the short row's count each round), acceptance == kept / drafted (counting the pads as drafted bytes
    understated it: for short=2 a round of 4 + 2 real drafts, 2 + 2 kept, read as 4 kept of 8)."""
    m, _ = _models("m2_tf")
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = m.generate(prompt, 21, temperature=0)
    d = _Scripted(plain, short)
    out = m.generate(prompt, 21, temperature=0, draft=d, draft_len=4, graph_verify=graph_verify)
    assert torch.equal(out, plain)
    assert d.rounds == len(d.script) > 0
    assert d.proposed == sum(map(sum, d.script))
    assert d.accepted == sum(min(r[1:]) * len(r) for r in d.script)  # each round every row keeps the short count
    assert d.acceptance == d.accepted / d.proposed
    old = sum(len(r) * r[0] for r in d.script)  # the batch's draft length for every row, pads included
    assert d.proposed < old and (d.acceptance > d.accepted / old if short else d.accepted == 0)
    # a drafter that declares an impossible count is refused, not counted
    bad = _Scripted(plain, short)
    bad.draft_lengths = lambda drafts: [5, 0]
    with pytest.raises(ValueError, match="draft_lengths"):
        m.generate(prompt, 21, temperature=0, draft=bad, draft_len=4, graph_verify=graph_verify)


@pytest.mark.parametrize("name", ["m2_tf", "m2_tf_tf"])
def test_self_speculation_by_layer_skipping(name):
    """The model's own first layers draft: greedy output is plain greedy's; keeping every layer drafts exactly
    what the model decodes; the model itself is left whole; bad layer counts are refused."""
    m, _ = _models(name)
    m.blocks[0].layers.append(copy.deepcopy(m.blocks[0].layers[0]))  # 3 global layers, so skipping differs
    depth = [len(b.layers) for b in m.blocks]
    plain = m.generate(b"hello wo", 20, temperature=0)
    shallow = SelfDrafter(m, [1] * m.num_stages)
    assert torch.equal(m.generate(b"hello wo", 20, temperature=0, draft=shallow, draft_len=3), plain)
    assert [len(b.layers) for b in m.blocks] == depth
    assert [len(b.layers) for b in shallow.model.blocks] == [1] * m.num_stages
    assert shallow.model.head is m.head and shallow.model.blocks[0].layers[0] is m.blocks[0].layers[0]
    full = SelfDrafter(m, depth)
    assert torch.equal(m.generate(b"hello wo", 20, temperature=0, draft=full, draft_len=5), plain)
    assert full.acceptance == 1.0
    with pytest.raises(ValueError, match="stage 0 has 3 layers"):
        SelfDrafter(m, [4] + depth[1:])
    with pytest.raises(ValueError, match="one per stage"):
        SelfDrafter(m, [1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_speculative_on_the_kernel_path():
    """On CUDA with mamba-ssm's kernels (the in-place step update of the SSM state is what the per-position
    clones guard against): verification logits equal step-by-step feed, and greedy speculative decoding equals
    plain greedy, with a model drafter and with layer skipping."""
    from omnibyte.model.blocks.mamba2 import load_mamba_kernels
    from tests.model_helpers import M2K

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not loadable")
    big = dict(M2K, d_state=32, headdim=16, chunk_size=16)
    m = tiny([(16, 64, big), (4, 64, TF)]).cuda()
    d = tiny([(16, 32, big), (4, 32, TF)], seed=5).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, 256, (1, 23), device="cuda", generator=g)
    toks = torch.randint(0, 256, (1, 7), device="cuda", generator=g)
    _, ref = _stepwise(m, prompt, toks)
    st = m.new_state(1)
    m.feed(st, prompt)
    assert (verify(m.decoder, st, toks).logits - ref).abs().max().item() < 2e-3
    plain = m.generate(prompt, 40, temperature=0)
    for drafter in (ModelDrafter(d, m), ModelDrafter(m, m), SelfDrafter(m, [1, 1])):
        for k in (1, 4, 5):
            assert torch.equal(m.generate(prompt, 40, temperature=0, draft=drafter, draft_len=k), plain), k
