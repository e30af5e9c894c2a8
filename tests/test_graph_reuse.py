"""generate(use_graphs=True) keeps its GraphStepper between calls (issue 17): the stepper -- static buffers,
compiled steps, captured CUDA graphs -- is reset to each call's prompt, so a call pays no capture once its key
(batch rows, device, dtype, autocast, compile flags) has been seen, and gives exactly the bytes a fresh stepper
would. Off CUDA ``Decoder.static_step_off_cuda`` runs the same static step eagerly, which is what these CPU
tests drive; ``test_gpu_*`` check the CUDA-graph path itself."""

from __future__ import annotations

import copy

import pytest
import torch

from omnibyte.model.inference.decoder import Decoder, StepperCache
from omnibyte.model.inference.graphs import GraphStepper
from tests.model_helpers import M2, M2K, TF, one_thread, tiny  # noqa: F401 - one_thread is an autouse fixture

STAGES = [(4, 32, M2), (4, 32, TF)]


@pytest.fixture
def static(monkeypatch):
    monkeypatch.setattr(Decoder, "static_step_off_cuda", True)


def _kept(m) -> list:
    return list(m._graph_steppers.steppers.values())


def _fresh(m):
    """The same weights with nothing kept (a copy starts with an empty stepper cache)."""
    return copy.deepcopy(m)


def _calls():
    g = torch.Generator().manual_seed(0)
    # prompts ending mid-patch, at a boundary, shorter than a patch (the stepper starts eagerly) and empty
    return [(torch.randint(0, 256, (2, n), generator=g), new) for n, new in ((13, 21), (8, 9), (2, 17), (0, 6))]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_consecutive_calls_equal_a_fresh_stepper(static, temperature):
    m = tiny(STAGES)
    for i, (prompt, new) in enumerate(_calls()):
        kw = dict(temperature=temperature, top_k=8)
        got = m.generate(prompt, new, use_graphs=True, generator=torch.Generator().manual_seed(i), **kw)
        want = _fresh(m).generate(prompt, new, use_graphs=True, generator=torch.Generator().manual_seed(i), **kw)
        assert torch.equal(got, want), i
        assert len(_kept(m)) == 1  # one key throughout: one stepper, reset each call
    if temperature == 0:  # and the static step is the model: greedy bytes as eager decoding
        prompt, new = _calls()[0]
        assert torch.equal(m.generate(prompt, new, temperature=0, use_graphs=True),
                           m.generate(prompt, new, temperature=0))


def test_stepper_kept_per_key_and_bounded(static):
    m = tiny(STAGES)
    p2, p3 = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (3, 9))
    m.generate(p2, 6, temperature=0, use_graphs=True)
    (first,) = _kept(m)
    assert first.ready and first.N == 2
    m.generate(p2[:, :5], 11, temperature=0, use_graphs=True)
    assert _kept(m) == [first]  # same key: the same object
    m.generate(p3, 6, temperature=0, use_graphs=True)
    kept = _kept(m)
    assert len(kept) == 2 and kept[0] is first and kept[1].N == 3  # another batch size: another stepper
    m.generate(p3[:1], 6, temperature=0, use_graphs=True)
    kept = _kept(m)
    assert len(kept) == StepperCache.size == 2 and first not in kept  # the least recently used key goes
    assert [s.N for s in kept] == [3, 1]
    m.decoder.clear_steppers()
    assert _kept(m) == []
    with pytest.raises(ValueError, match="3 rows for a stepper of 2"):
        first.reset(m.new_state(3))


def test_new_weights_in_place_and_replaced(static):
    m = tiny(STAGES)
    other = tiny(STAGES, seed=3).state_dict()
    prompt = torch.randint(0, 256, (1, 11))
    before = m.generate(prompt, 15, temperature=0, use_graphs=True)
    (st,) = _kept(m)
    m.load_state_dict(other)  # copies into the same tensors: the stepper (and its graphs) stays valid
    got = m.generate(prompt, 15, temperature=0, use_graphs=True)
    assert _kept(m) == [st]
    assert torch.equal(got, _fresh(m).generate(prompt, 15, temperature=0, use_graphs=True))
    assert not torch.equal(got, before)
    m.load_state_dict(tiny(STAGES, seed=4).state_dict(), assign=True)  # new tensors: a new stepper
    got = m.generate(prompt, 15, temperature=0, use_graphs=True)
    assert _kept(m) and _kept(m)[0] is not st
    assert torch.equal(got, _fresh(m).generate(prompt, 15, temperature=0, use_graphs=True))
    st = _kept(m)[0]
    m.blocks[1].layers[1] = copy.deepcopy(m.blocks[1].layers[0])  # a replaced module: a new stepper
    got = m.generate(prompt, 15, temperature=0, use_graphs=True)
    assert _kept(m)[0] is not st
    assert torch.equal(got, _fresh(m).generate(prompt, 15, temperature=0, use_graphs=True))


def test_copies_and_views_do_not_share_steppers(static):
    from omnibyte.model.inference.speculative import skip_layers

    m = tiny(STAGES)
    m.generate(b"hello there", 6, temperature=0, use_graphs=True)
    (st,) = _kept(m)
    view = skip_layers(m, [1, 1])  # a shallow copy: its own cache, the model's left alone
    view.decoder.generate(b"hello there", 6, temperature=0, use_graphs=True)
    assert _kept(m) == [st] and _kept(view)[0] is not st
    assert _kept(view)[0].model is view
    c = copy.deepcopy(m)
    assert not c.__dict__["_graph_steppers"].steppers
    import pickle

    assert not pickle.loads(pickle.dumps(m)).__dict__["_graph_steppers"].steppers


def test_without_the_switch_cpu_decodes_eagerly():
    m = tiny(STAGES)
    m.generate(b"hello", 6, temperature=0, use_graphs=True)
    assert "_graph_steppers" not in m.__dict__


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_model():
    from omnibyte.model.blocks.mamba2 import load_mamba_kernels

    if load_mamba_kernels() is None:
        pytest.skip("mamba-ssm Triton kernels not loadable")
    return tiny([(4, 64, dict(M2K, d_state=32, headdim=16, chunk_size=16)), (4, 64, TF)]).cuda()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("compile_step", [False, True])
def test_gpu_graphed_generate_twice_equals_eager(compile_step):
    """Consecutive graphed calls (different prompts and lengths; greedy and seeded sampling) give what a fresh
    stepper gives and, uncompiled, the eager bytes; calls after the first capture nothing (their graphs are the
    first call's); new weights loaded in place decode with the same graphs."""
    m = _gpu_model()
    g = torch.Generator(device="cuda").manual_seed(0)
    calls = [(torch.randint(0, 256, (2, n), device="cuda", generator=g), new)
             for n, new in ((13, 24), (9, 31), (2, 17))]
    kw = dict(use_graphs=True, compile_step=compile_step)
    for temperature in (0.0, 1.0):
        outs, captured = [], []
        for prompt, new in calls:
            gen = torch.Generator(device="cuda").manual_seed(1)
            outs.append(m.generate(prompt, new, temperature=temperature, top_k=16, generator=gen, **kw))
            (st,) = _kept(m)
            captured.append(st.captures)
        assert len(st.graphs) == 4 and captured == [captured[0]] * len(calls)  # 4 phases, captured once
        for (prompt, new), got in zip(calls, outs):
            if temperature == 0 and not compile_step:
                assert torch.equal(got, m.generate(prompt, new, temperature=0))
            m.decoder.clear_steppers()  # a fresh stepper (same modules: a compiled step is not recompiled)
            gen = torch.Generator(device="cuda").manual_seed(1)
            assert torch.equal(got, m.generate(prompt, new, temperature=temperature, top_k=16, generator=gen, **kw))
    (st,) = _kept(m)
    m.load_state_dict(tiny([(4, 64, dict(M2K, d_state=32, headdim=16, chunk_size=16)), (4, 64, TF)],
                           seed=3).state_dict())
    prompt, new = calls[0]
    got = m.generate(prompt, new, temperature=0, **kw)
    assert _kept(m) == [st]  # in-place weights: the same graphs read them
    if not compile_step:
        assert torch.equal(got, m.generate(prompt, new, temperature=0))
    m.decoder.clear_steppers()
    assert torch.equal(got, m.generate(prompt, new, temperature=0, **kw))


def test_graph_stepper_counts_captures_only_on_cuda(static):
    m = tiny(STAGES)
    m.generate(b"hello there", 9, temperature=0, use_graphs=True)
    (st,) = _kept(m)
    assert isinstance(st, GraphStepper) and st.captures == 0 and not st.graphs
