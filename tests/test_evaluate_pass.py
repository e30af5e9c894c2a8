"""One forward per eval batch: ``evaluate_bpb_per_token`` (bits per byte, per-token rows, image bits from the same
pass) equals ``evaluate_bpb`` through the training loss module, dense and modality-aware, and what it hands
``visit`` is the model's per-token nats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import M2, TF, one_thread, tiny  # noqa: F401  (one_thread: autouse fixture)

from omnibyte.evaluate import PerTokenRows, evaluate_bpb, evaluate_bpb_per_token
from omnibyte.loss import LossModule, per_token_nll
from omnibyte.stream import Batch, ByteStream
from omnibyte.vocab import Modality


def _batches(seed=0, n=3, rows=3):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        streams = []
        for r in range(rows):
            L = int(rng.integers(20, 64))
            text = bytes(rng.integers(0, 256, L // 2).tolist())
            image = bytes(rng.integers(0, 256, L - L // 2).tolist())
            s = ByteStream.concat([ByteStream.from_bytes(text, modality=Modality.TEXT, loss=float(r % 2)),
                                   ByteStream.from_bytes(image, modality=Modality.IMAGE, loss=1.0)])
            streams.append(ByteStream(s.tokens, s.loss_mask, s.modality, id=f"b{b}r{r}"))
        out.append(Batch.collate(streams, pad_to_multiple=16))
    return out


@pytest.mark.parametrize("experts", [False, True], ids=["dense", "aware"])
def test_one_pass_gives_evaluate_bpbs_result_and_the_per_token_nats(experts):
    outer = dict(M2, modality_experts=["image"]) if experts else M2
    m = tiny([(4, 32, outer), (4, 16, TF)])
    batches = _batches()
    want = evaluate_bpb(LossModule(m), batches, torch.device("cpu"))
    seen = []
    rows = PerTokenRows()
    got = evaluate_bpb_per_token(m, batches, torch.device("cpu"),
                                 visit=lambda b, nll: (seen.append((b, nll)), rows(b, nll)))
    assert got == want  # exactly: the same sums of the same nats
    assert [b for b, _ in seen] == batches
    for b, nll in seen:
        ref = per_token_nll(m, b.tokens, modality=b.modality)
        assert torch.equal(nll, ref)
    assert len(rows.rows) == sum(len(b) for b in batches)
    assert got["bpb"] > 0 and "bpb/image" in got and "bpb/text" in got
