"""Shared tiny model configs for the model tests, and the benchmarks as modules for theirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnibyte import build_model

TF = {"name": "transformer", "heads": 2}
M2 = {"name": "mamba2_ref", "d_state": 8, "headdim": 8, "chunk_size": 4}
M2K = dict(M2, name="mamba2")
M1 = {"name": "mamba1", "d_state": 4}
TF360 = {"name": "transformer", "heads": 16, "head_dim": 64, "mlp_hidden": 1344}  # the 360M config's local layer


def tiny(stages, block=TF, seed=0, **kw):
    """stages: list of (length, width) or (length, width, block) tuples, outermost first."""
    torch.manual_seed(seed)
    nodes = []
    for st in stages:
        length, width = st[0], st[1]
        blk = st[2] if len(st) > 2 else block
        nodes.append({"length": length, "width": width, "layers": 2, "block": dict(blk)})
    return build_model({"stages": nodes, **kw}).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and CI boxes are often oversubscribed)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_cached_matches_forward(m, x: torch.Tensor, prompt: int, atol: float) -> None:
    """Feeding ``x`` through the generation cache (a prompt, then one token at a time) gives the logits of
    the full forward at every position from ``prompt`` on."""
    full = m(x)
    st = m.new_state(x.shape[0])
    outs = [m.feed(st, x[:, :prompt])]
    for t in range(prompt, x.shape[1] - 1):
        outs.append(m.feed(st, x[:, t:t + 1]))
    assert torch.allclose(torch.stack(outs, 1), full[:, prompt:], atol=atol)


def stepper_logits(model, x: torch.Tensor, kernels: bool, prompt: int = 9, end: int | None = None,
                   use_graphs: bool = False):
    """Logits of a GraphStepper (eager unless ``use_graphs``; ``kernels``: its decode kernels) after feeding
    ``x[:, :prompt]`` eagerly then one byte at a time up to ``end`` (default: all but the last byte), stacked
    (N, end - prompt + 1, V), and the stepper (to ask which kernels it used)."""
    from omnibyte.model.inference.graphs import GraphStepper

    end = x.shape[1] - 1 if end is None else end
    st = model.new_state(x.shape[0])
    gs = GraphStepper(model, st, use_graphs=use_graphs, kernels=kernels)
    outs = [model.feed(st, x[:, :prompt])] + [gs.feed(x[:, t:t + 1]) for t in range(prompt, end)]
    return torch.stack(outs, 1), gs


BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(monkeypatch, name: str):
    """``benchmarks/NAME.py`` as a module (the benchmarks are scripts, not a package: their folder goes on sys.path
    for their ``_common`` import, for this test only)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
