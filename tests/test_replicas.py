"""replicas.check: DDP copies that drifted apart stop the run, naming the parameter; identical copies pass.
Two gloo processes on CPU (a rank whose gradients missed the all-reduce is simulated by changing its weights)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omnibyte import replicas
from omnibyte.errors import TrainingError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        for step, drift in ((6, 0.0), (7, 1e-3)):  # identical copies, then rank 1's drifted by 1e-3 in one weight
            if rank == 1 and drift:
                with torch.no_grad():
                    model[1].weight[0, 0] += drift
            try:
                replicas.check(model, step=step)
                out.put((rank, step, None))
            except TrainingError as e:
                out.put((rank, step, str(e)))
    finally:
        dist.destroy_process_group()


def test_drifted_replicas_stop_every_rank_naming_the_parameter():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = {(rank, step): msg for rank, step, msg in (out.get(timeout=120) for _ in range(4))}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0, 6] is None and got[1, 6] is None  # the same parameters pass
    assert got[0, 7] == got[1, 7]  # both ranks stop, with the same message
    msg = got[0, 7]
    assert msg is not None and "after step 7" in msg and "'1.weight'" in msg and "1 of 4 parameters" in msg


def test_fingerprint_is_one_float64_sum_per_parameter():
    model = torch.nn.Linear(3, 2)
    names, v = replicas.fingerprint(model)
    assert names == ["weight", "bias"] and v.dtype == torch.float64
    assert v.tolist() == pytest.approx([model.weight.double().sum().item(), model.bias.double().sum().item()])
