"""The prompt-lookup drafter (omnibyte.model.inference.drafters.LookupDrafter, ``draft="lookup"``): what it
proposes (the bytes after the longest, most recent earlier match of the context's end), greedy output equal to
plain greedy decoding (with drafts kept and rejected, rows that propose nothing, stop tokens), and sampling
exact with its one-hot drafts (q = None in the rejection scheme)."""

from __future__ import annotations

import pytest
import torch

from omnibyte import vocab
from omnibyte.model.inference.drafters import LookupDrafter
from omnibyte.model.inference.sampling import sampling_probs
from omnibyte.model.inference.speculative import accept, as_drafter
from tests.model_helpers import M2K, TF, one_thread, tiny  # noqa: F401 - one_thread is an autouse fixture
from tests.test_speculative import (
    CONFIGS,
    _assert_chi_square,
    _exact_joint,
    _models,
    _peaked_pair,
    _sample_counts,
    _tv,
)


def _propose(context: bytes | list, k: int, **kw) -> list:
    d = LookupDrafter(**kw)
    d.reset(torch.tensor([list(context)]))
    drafts, q = d.propose(k, 0.0, 0, 1.0, None)
    assert q is None
    return drafts[0].tolist()


def test_lookup_proposes_what_followed_the_best_earlier_match():
    # the longest match wins over a more recent shorter one ("xab" matches 3 bytes at the first occurrence)
    assert bytes(_propose(b"xabCD..yabEF..xab", 2)) == b"CD"
    # equal lengths: the most recent
    assert bytes(_propose(b"abCD..abEF..ab", 2)) == b"EF"
    # a match just before the end continues as a repeating pattern (an overlapping copy)
    assert bytes(_propose(b"abcabcab", 7)) == b"cabcabc"
    assert bytes(_propose(b"aaaa", 5)) == b"aaaaa"
    # nothing matches 2 bytes: nothing proposed; min_ngram=1 falls back to what followed the last byte
    assert _propose(b"abcdef", 4) == []
    assert bytes(_propose(b"zq..xyzw..pz", 3, min_ngram=1)) == b"w.."
    assert _propose(b"abcdez", 3, min_ngram=1) == []  # z never seen before
    # max_ngram caps the comparison: with 2 both matches are equal and the most recent is taken
    assert bytes(_propose(b"xabCD..yabEF..xab", 2, max_ngram=2)) == b"EF"
    # specials (ids >= 256) are tokens like any other
    assert _propose([vocab.BOS, 1, 2, 3, vocab.EOM, 1, 2], 2) == [3, vocab.EOM]
    for bad in (dict(min_ngram=0), dict(min_ngram=3, max_ngram=2), dict(max_ngram=1, min_ngram=1),
                dict(candidates=0)):
        with pytest.raises(ValueError, match="LookupDrafter"):
            LookupDrafter(**bad)


def test_lookup_advance_indexes_the_new_bytes_and_pads_rows():
    d = LookupDrafter()
    d.reset(torch.tensor([list(b"abXYab"), list(b"qrstuv")]))
    drafts, _ = d.propose(3, 0.0, 0, 1.0, None)
    # row 0 drafts "XYa", row 1 has no match: padded with PAD to the longest row
    assert drafts.tolist() == [list(b"XYa"), [vocab.PAD] * 3]
    assert d.draft_lengths(drafts) == [3, 0]  # the pads are not drafted bytes (proposed / accepted)
    d.advance(1, torch.tensor([ord("Z"), ord("t")]))  # every row kept 1 draft, then its own byte
    assert d.hist == [list(b"abXYabXZ"), list(b"qrstuv") + [vocab.PAD, ord("t")]]
    assert d.propose(2, 0.0, 0, 1.0, None)[0].shape == (2, 0)  # "XZ" / "PAD t" seen once only: nothing
    for t in b"ab":  # rounds without drafts: one byte each
        d.advance(0, torch.tensor([t, t]))
    # the appended bytes are indexed: "ab" last followed by "XZ" (more recent than "XY"), then the copy goes on
    assert bytes(d.propose(4, 0.0, 0, 1.0, None)[0][0].tolist()) == b"XZab"


def _echo_prompt(m, n: int = 12) -> list:
    """A prompt whose earlier part holds the model's own greedy continuation after it (found by iterating), so
    lookup drafts are the model's argmax while the echo lasts and wrong after."""
    base, seg = list(b"The red fox "), []
    for _ in range(4):
        new = base[-2:] + m.generate(seg + base, n, temperature=0)[0].tolist()
        if new == seg:
            break
        seg = new
    return seg + base


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lookup_greedy_equals_plain_greedy(name):
    m, _ = _models(name)
    P = m.units[0]
    prompt = _echo_prompt(m)
    plain = m.generate(prompt, 30, temperature=0)
    rejected = 0
    for k in (1, 3, P + 1, 8):
        d = LookupDrafter()
        assert torch.equal(m.generate(prompt, 30, temperature=0, draft=d, draft_len=k), plain), k
        assert d.accepted > 0, k  # kept while the echo lasts
        rejected += d.proposed - d.accepted
    assert rejected > 0  # and wrong after it
    # by name, with min_ngram=1 (drafts every round) and in a batch where one row never matches
    assert torch.equal(m.generate(prompt, 30, temperature=0, draft="lookup", draft_len=4), plain)
    assert torch.equal(m.generate(prompt, 30, temperature=0, draft=LookupDrafter(min_ngram=1), draft_len=4), plain)
    other = torch.randint(0, 256, (1, len(prompt)), generator=torch.Generator().manual_seed(0))
    batch = torch.cat((torch.tensor([prompt]), other))
    want = m.generate(batch, 30, temperature=0)
    assert torch.equal(m.generate(batch, 30, temperature=0, draft="lookup", draft_len=5), want)
    stops = (int(plain[0, 17]),)
    assert torch.equal(m.generate(batch, 30, temperature=0, stop_tokens=stops, draft="lookup", draft_len=5),
                       m.generate(batch, 30, temperature=0, stop_tokens=stops))


def test_draft_names_are_registered():
    m, _ = _models("tf_tf")
    assert isinstance(as_drafter("lookup", m), LookupDrafter)
    with pytest.raises(TypeError, match=r"one of \['lookup'\], got 'nope'"):
        m.generate(b"ab", 4, draft="nope")


def test_accept_with_one_hot_q_is_exact():
    """A drafter whose drafts are certain: q one-hot at each draft (given as None; an explicit one-hot q gives
    the same draws). The first emitted token follows p_0 and the second (after a kept draft) p_1, whether the
    drafts are likely or not."""
    g = torch.Generator().manual_seed(0)
    V, n = 5, 6000
    logits = torch.randn(3, V, generator=g) * 1.5
    p = sampling_probs(logits, 1.0)
    for likely, drafts in ((True, p[:2].argmax(-1)), (False, p[:2].argmin(-1))):
        first, second = torch.zeros(V), torch.zeros(V)
        for _ in range(n):
            kept, x = accept(logits, drafts, None, 1.0, 0, 1.0, g)
            out = drafts[:kept].tolist() + [x]
            first[out[0]] += 1
            if kept >= 1:
                second[out[1]] += 1
        assert 0.5 * (first / n - p[0]).abs().sum() < 0.025
        if likely:  # (an unlikely first draft is kept too rarely to count the second)
            assert 0.5 * (second / second.sum() - p[1]).abs().sum() < 0.05
        one_hot = torch.nn.functional.one_hot(drafts, V).float()
        ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        assert [accept(logits, drafts, one_hot, 1.0, 0, 1.0, ga) for _ in range(200)] == \
               [accept(logits, drafts, None, 1.0, 0, 1.0, gb) for _ in range(200)]
    # a draft outside the filtered support (top-k) is never kept
    kept, x = accept(logits, p[:2].argmin(-1), None, 1.0, 2, 1.0, g)
    assert kept == 0 and x in p[0].topk(2).indices.tolist()


def _lookup_sampling_prompt(m, base: list, top_k: int) -> list:
    """A prompt that, for each first byte the model may sample after it, holds earlier "last byte, that byte,
    y, z" with y the model's second choice after them: the drafts are kept sometimes and rejected sometimes."""
    seg: list = []
    for _ in range(4):
        prompt = seg + base
        st = m.new_state(1)
        p1 = sampling_probs(m.feed(st, torch.tensor([prompt])), 1.0, top_k, 1.0)[0]
        new = []
        for x in p1.nonzero()[:, 0].tolist():
            st = m.new_state(1)
            y = m.feed(st, torch.tensor([prompt + [x]]))[0].topk(2).indices.tolist()
            new += [base[-1], x, y[1], y[0]]
        if new == seg:
            break
        seg = new
    return seg + base


def test_lookup_sampling_follows_the_model_distribution():
    """The first 3 sampled bytes (2 and 3 from a verification of lookup drafts) follow the model's exact joint
    distribution (temperature 1, top-k 2); drafts kept and rejected. 250 samples, two rows per call."""
    m, _ = _peaked_pair("tf_tf")
    prompt = _lookup_sampling_prompt(m, list(b"abcde"), 2)
    exact = _exact_joint(m, prompt, 3, 1.0, 2, 1.0)
    assert len(exact) == 8 and max(exact.values()) < 0.6
    d = LookupDrafter()
    n = 250
    counts = _sample_counts(m, d, prompt, n, 1.0, 2, 1.0, 0, 2, exact)
    assert 0.1 < d.acceptance < 0.9, d.acceptance
    tv = _tv(exact, {s: c / n for s, c in counts.items()})
    assert tv < 0.15, tv


@pytest.mark.slow
def test_lookup_sampling_chi_square():
    """As above with a Mamba-2 global stage, temperature 0.9 and top-k 3, 2,500 samples: chi-square at 0.1%."""
    m, _ = _peaked_pair("m2_tf", noise=0.2)
    prompt = _lookup_sampling_prompt(m, list(b"abcde"), 3)
    n, d = 2500, LookupDrafter()
    exact = _exact_joint(m, prompt, 3, 0.9, 3, 1.0)
    counts = _sample_counts(m, d, prompt, n, 0.9, 3, 1.0, 1, 2, exact, rows=2)
    assert 0.05 < d.acceptance < 0.95, d.acceptance
    _assert_chi_square(counts, exact, n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_lookup_greedy_equals_plain_graphed_greedy():
    """On CUDA (mamba-ssm kernels): speculative decoding with lookup drafts gives the bytes of plain greedy
    decoding, eager and CUDA-graphed, drafts kept and rejected."""
    from omnibyte.model.blocks.mamba2 import load_mamba_kernels

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not loadable")
    m = tiny([(16, 64, dict(M2K, d_state=32, headdim=16, chunk_size=16)), (4, 64, TF)]).cuda()
    prompt = torch.tensor([_echo_prompt(m)], device="cuda")
    plain = m.generate(prompt, 48, temperature=0)
    assert torch.equal(m.generate(prompt, 48, temperature=0, use_graphs=True), plain)
    for k in (1, 4, 8):
        d = LookupDrafter()
        assert torch.equal(m.generate(prompt, 48, temperature=0, draft=d, draft_len=k), plain), k
        assert d.accepted > 0
