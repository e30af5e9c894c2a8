"""MBLM.score_batch (omnibyte/model/inference/scoring.py) against the reference: the per-prefix loop over
Decoder.score (``StreamModel.score_batch(model, ...)``), on tiny CPU fp32 models of every block kind, prefixes
ending mid-patch and on patch boundaries, candidates shorter than, as long as and longer than a patch; modality-aware
models (experts in the outer stage, the inner stages or both: every call routes as the reference; a wrong route is
caught); and VQA rank-mode predictions before == after through tasks/vqa_eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import M1, M2, M2K, TF, one_thread, tiny  # noqa: F401

from omnibyte import vocab
from omnibyte.model.api import StreamModel
from omnibyte.model.inference import scoring
from omnibyte.model.inference.decoder import Decoder
from omnibyte.tasks.clevr import CLEVR_ANSWERS
from omnibyte.vocab import Modality

FIXTURE = Path(__file__).parent / "fixtures" / "clevr_mini"

MODELS = {  # (length, width[, block]) per stage, outermost first; Q_0 = product of the inner lengths
    "mamba2+transformer": [(8, 32, M2K), (4, 16, TF)],  # the default kinds (mamba2: the twin on CPU)
    "transformer+transformer": [(8, 32, TF), (4, 16, TF)],  # KV caches of different lengths: no merging
    "mamba1+transformer": [(8, 32, M1), (4, 16, TF)],
    "3-stage": [(3, 32, M2), (2, 16, TF), (3, 16, TF)],  # Q_0 = 6
    "1-stage mamba1": [(64, 32, M1)],  # flat byte model: every candidate byte is an outer position
}
LENGTHS = [0, 1, 3, 4, 5, 7, 8, 11, 12, 13, 16, 19]  # ends at and between patch boundaries of 4 and 6
CANDIDATES = [[7], [vocab.EOS], [1, 2], [3, 4, 5, 6], [8, 9, 10, 11, 12, 13, 14], [15] * 13, [],
              [*b"yes", vocab.EOS], [*b"cylinder", vocab.EOS]]
ANSWERS = [[*a.encode(), vocab.EOS] for a in CLEVR_ANSWERS]  # a real closed set: near-ties among equal lengths


def prefixes(seed: int = 1, lengths=LENGTHS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g) for n in lengths]


def reference(model, xs, cands) -> torch.Tensor:
    return StreamModel.score_batch(model, xs, cands)


@pytest.mark.parametrize("bucket", [1, 3, scoring.BUCKET_UNITS])
@pytest.mark.parametrize("name", list(MODELS))
def test_score_batch_equals_the_per_prefix_loop(name, bucket, monkeypatch):
    """Prefills of every exact length (bucket 1) and of bucketed lengths, the rest of each prefix then running
    with its candidates."""
    monkeypatch.setattr(scoring, "BUCKET_UNITS", bucket)
    m = tiny(MODELS[name])
    xs, cands = prefixes(lengths=LENGTHS + [29, 40, 53]), CANDIDATES
    want = reference(m, xs, cands)
    got = m.score_batch(xs, cands)
    assert got.shape == (len(xs), len(cands)) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6), (got - want).abs().max()
    assert (got[:, CANDIDATES.index([])] == 0).all()  # an empty continuation has log-likelihood 0
    got_a, want_a = m.score_batch(xs, ANSWERS), reference(m, xs, ANSWERS)
    assert torch.allclose(got_a, want_a, atol=1e-5, rtol=1e-6)
    assert torch.equal(got_a.argmax(1), want_a.argmax(1))
    assert len(set(want_a.argmax(1).tolist())) > 1  # the predictions depend on the prefix
    # the batch is not a loop in disguise: the reference's feed is never called
    orig = Decoder.feed
    Decoder.feed = lambda *a, **k: pytest.fail("score_batch called Decoder.feed")
    try:
        again = m.score_batch(xs, cands)
    finally:
        Decoder.feed = orig
    assert torch.equal(again, got)


def test_rows_are_independent_of_the_batch_and_its_order():
    m = tiny(MODELS["mamba2+transformer"])
    xs = prefixes()
    full = m.score_batch(xs, CANDIDATES)
    order = list(range(len(xs)))[::-1]
    rev = m.score_batch([xs[i] for i in order], CANDIDATES)
    assert torch.allclose(rev, full[order], atol=1e-5)
    for i in (0, 5, 11):
        assert torch.allclose(m.score_batch([xs[i]], CANDIDATES)[0], full[i], atol=1e-5)
        assert torch.allclose(m.score(xs[i], CANDIDATES), full[i], atol=1e-5)


def test_chunked_rows_and_states(monkeypatch):
    """Chunks of fewer (prefix, candidate) rows, or of one question at a time (state budget), change nothing."""
    m = tiny(MODELS["3-stage"])
    xs = prefixes(2)
    want = m.score_batch(xs, CANDIDATES)
    monkeypatch.setattr(scoring, "MAX_ROWS", 20)
    assert torch.allclose(m.score_batch(xs, CANDIDATES), want, atol=1e-6)
    monkeypatch.setattr(scoring, "MAX_ROWS", 2048)
    monkeypatch.setattr(scoring, "STATE_BYTES", 1)
    assert torch.allclose(m.score_batch(xs, CANDIDATES), want, atol=1e-6)


def test_many_prefixes_of_one_length_and_repeated_prefixes():
    m = tiny(MODELS["mamba2+transformer"])
    xs = prefixes(3, [9] * 5 + [10, 10])
    xs[1] = xs[0].clone()
    got = m.score_batch(xs, CANDIDATES)
    assert torch.allclose(got, reference(m, xs, CANDIDATES), atol=1e-5)
    assert torch.equal(got[0], got[1])


def test_inputs_lists_bytes_and_edge_cases():
    m = tiny(MODELS["transformer+transformer"])
    xs = prefixes()[:4]
    assert m.score_batch(xs, []).shape == (4, 0)
    assert m.score_batch([], CANDIDATES).shape == (0, len(CANDIDATES))
    assert torch.equal(m.score_batch(xs, [[], []]), torch.zeros(4, 2))
    as_list = m.score_batch([x.tolist() for x in xs], [bytes(c) for c in ([7], [1, 2])])
    assert torch.allclose(as_list, reference(m, xs, [[7], [1, 2]]), atol=1e-5)
    assert torch.allclose(m.score_batch([b"", b"ab"], [b"c"]), reference(m, [b"", b"ab"], [b"c"]), atol=1e-5)
    with pytest.raises(ValueError, match="prefix 1 must be a single sequence"):
        m.score_batch([xs[0], torch.zeros(2, 3, dtype=torch.long)], [[1]])


def test_max_len_of_learned_positions():
    """A global stage with learned positions bounds the stream: the batch refuses what the reference refuses
    (prefix + longest candidate past max_len), naming the prefix, and scores up to the bound."""
    m = tiny([(6, 32, dict(TF, positions="learned")), (4, 16, TF)])  # max_len 24
    assert m.stream_meta.max_len == 24
    cands = [[1, 2, 3], [4]]
    for bucket in (1, 2, 4):  # windows of several units ending at the last learned position
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(scoring, "BUCKET_UNITS", bucket)
            fits = prefixes(4, [0, 5, 9, 12, 15, 17, 19, 20, 21])
            assert torch.allclose(m.score_batch(fits, cands), reference(m, fits, cands), atol=1e-5)
    over = prefixes(4, [3, 22])
    with pytest.raises(ValueError, match="max_len"):
        reference(m, over, cands)
    with pytest.raises(ValueError, match=r"prefix 1 \(22 tokens\).*max_len 24"):
        m.score_batch(over, cands)


def test_eval_mode_no_grad_and_training_flag_restored():
    m = tiny([(8, 32, M2K), (4, 16, TF)], dropout=0.3)
    xs = prefixes()[:6]
    want = reference(m, xs, CANDIDATES)  # eval mode (tiny() returns the model in eval mode)
    m.train()
    with torch.enable_grad():
        got = m.score_batch(xs, CANDIDATES)
        ref_train = reference(m, xs, CANDIDATES)
    assert m.training and not got.requires_grad
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(ref_train, want, atol=1e-5)  # no dropout


def test_bf16_weights():
    """Weights in bf16 (no autocast): both paths compute in the head's dtype."""
    m = tiny(MODELS["mamba2+transformer"]).to(torch.bfloat16)
    xs = prefixes()[:6]
    got, want = m.score_batch(xs, ANSWERS), reference(m, xs, ANSWERS)
    assert got.dtype == want.dtype == torch.float32
    _same_where_decided(got, want, tol=0.25)


def _same_where_decided(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """bf16: scores within ``tol`` nats, and the same argmax wherever the reference's best beats its second
    by more than the largest difference seen (a near-tie may flip on rounding; the check must be meaningful)."""
    diff = float((got - want).abs().max())
    assert diff < tol, f"largest score difference {diff:.4g} (tolerance {tol})"
    top2 = want.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * diff
    assert decided.sum() >= len(want) // 2, (f"too many near-ties for a meaningful comparison: {int(decided.sum())} "
                                             f"of {len(want)} decided at difference {diff:.4g}")
    differ = (got.argmax(1) != want.argmax(1)) & decided
    assert not differ.any(), f"{int(differ.sum())} decided predictions differ (difference {diff:.4g})"


@pytest.mark.parametrize("experts", [False, True], ids=["dense", "aware"])
@pytest.mark.parametrize("device,bf16", [("cpu", True), pytest.param("cuda", True, marks=pytest.mark.gpu),
                                         pytest.param("cuda", False, marks=pytest.mark.gpu)])
def test_same_predictions_under_the_precision_policy(device, bf16, experts):
    """The run's precision policy (bf16 autocast; on CUDA the Mamba-2 Triton kernels when installed): batched and
    loop under the same precision agree to rounding and give the same predictions (dense and modality-aware)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from omnibyte.precision import autocast

    outer, inner = dict(M2K, d_state=32, headdim=16, chunk_size=16), TF
    if experts:
        outer, inner = aware(outer), aware(inner)
    m = tiny([(8, 64, outer), (4, 32, inner)], init_std=0.2).to(device)
    xs = prefixes(5, LENGTHS + [37, 61, 64, 90])
    ms = [t.to(device) for t in tracks(xs, 5)] if experts else None
    xs = [x.to(device) for x in xs]
    with autocast(torch.device(device), bf16):
        got, want = m.score_batch(xs, ANSWERS, modalities=ms), StreamModel.score_batch(m, xs, ANSWERS, ms)
    assert got.dtype == want.dtype == torch.float32
    _same_where_decided(got.cpu(), want.cpu(), tol=0.5 if bf16 else 0.05)  # CUDA fp32: TF32 in Triton dots


def _vqa_setup():
    from omnibyte.data.items import eval_items
    from omnibyte.registry import SERIALIZERS, TASKS
    from omnibyte.runconfig import DataConfig

    task = TASKS.build({"name": "clevr_vqa", "root": str(FIXTURE)})
    ser = SERIALIZERS.build({"name": "qa", "image": {"name": "png", "method": "reencode", "size": [8, 6]},
                             "order": ["question", "image", "question", "answer"]})
    items = {s: list(eval_items(DataConfig(), task, ser, s)) for s in ("train", "val")}
    return task, items


class Loop:
    """The same model with score_batch forced to the per-question reference loop (the scorer before)."""

    def __init__(self, model):
        self.m = model

    def __getattr__(self, k):
        return getattr(self.m, k)

    def score_batch(self, prefixes, candidates, modalities=None):
        return StreamModel.score_batch(self.m, prefixes, candidates, modalities)


@pytest.mark.parametrize("name", ["mamba2+transformer", "3-stage", "aware"])
def test_vqa_rank_predictions_before_equal_after(tmp_path, name):
    """tasks/vqa_eval in rank mode on CLEVR-format items (12 questions, prompts of several lengths): the batched
    scorer predicts exactly what the per-question loop predicts, in batches of any size."""
    task, items = _vqa_setup()
    stages = AWARE_MODELS["mamba2 both"] if name == "aware" else MODELS[name]  # aware: the prompts' tracks route
    m = tiny(stages, init_std=0.3)  # larger weights: answers far from ties, so the check means something
    lengths = {len(it.stream) for s in items.values() for it in s}
    assert len(lengths) >= 4
    for split, its in items.items():
        before = task.evaluate(Loop(m), its, split=split, mode="rank", progress=False, out_dir=tmp_path / "before")
        for rb in (1, 5, 256):
            after = task.evaluate(m, its, split=split, mode="rank", progress=False, rank_batch_size=rb,
                                  batch_size=2, out_dir=tmp_path / f"after{rb}")
            assert after["accuracy"] == before["accuracy"]
            a = (tmp_path / f"after{rb}" / f"vqa_{split}_predictions.jsonl").read_text()
            b = (tmp_path / "before" / f"vqa_{split}_predictions.jsonl").read_text()
            assert a == b
        preds = [json.loads(line)["pred_rank"] for line in b.splitlines()]
        assert len(preds) == len(its)
    # the margins are real: the loop's best answer beats the second by far more than the two scorers differ
    from omnibyte.tasks.vqa_eval import answer_candidates, prompt_of

    cands = answer_candidates(task.answer_vocab)
    prompts = [prompt_of(it) for s in items.values() for it in s]
    xs = [torch.as_tensor(p.tokens.astype("int64")) for p in prompts]
    ms = [torch.as_tensor(p.modality.astype("int64")) for p in prompts] if name == "aware" else None
    got, want = m.score_batch(xs, cands, modalities=ms), StreamModel.score_batch(m, xs, cands, ms)
    top2 = want.topk(2, dim=1).values
    assert float((got - want).abs().max()) < 1e-4 < float((top2[:, 0] - top2[:, 1]).min())


# ------------------------------------------------------------------------------------------------------
# modality-aware models (modality_experts): every call of the batch routes as the reference does


def aware(blk):
    return dict(blk, modality_experts=["image", ["question", "answer"]])  # 3 experts: the rest is text+special


AWARE_MODELS = {  # experts in the outer stage, the inner stage(s) or both
    "mamba2 outer": [(8, 32, aware(M2K)), (4, 16, TF)],
    "mamba2 inner": [(8, 32, M2K), (4, 16, aware(M2))],
    "mamba2 both": [(8, 32, aware(M2K)), (4, 16, aware(TF))],
    "mamba1 outer": [(8, 32, aware(M1)), (4, 16, TF)],
    "mamba1 inner": [(8, 32, M2K), (4, 16, aware(M1))],
    "mamba1 both": [(8, 32, aware(M1)), (4, 16, aware(M1))],
    "transformer outer": [(8, 32, aware(TF)), (4, 16, TF)],  # KV caches of different lengths: no merging
    "transformer inner": [(8, 32, TF), (4, 16, aware(TF))],
    "transformer both": [(8, 32, aware(TF)), (4, 16, aware(TF))],
    "3-stage all": [(3, 32, aware(M2)), (2, 16, aware(TF)), (3, 16, aware(M1))],  # Q_0 = 6, Q_1 = 3
    "3-stage middle": [(3, 32, M2), (2, 16, aware(TF)), (3, 16, TF)],
    "1-stage": [(48, 32, aware(M1))],
}
AWARE_LENGTHS = [0, 1, 3, 4, 5, 7, 8, 11, 12, 13, 16, 19, 24]  # at and between boundaries of 4 and 6
# candidates of length 0, 1, 2, up to a patch and longer; segments that change inside a candidate
AWARE_CANDIDATES = CANDIDATES + [[5, vocab.SOM_IMAGE, 6, 7, 8, 9, vocab.EOM, 10, 11],
                                 [vocab.SOM_ANSWER, *b"two", vocab.EOS]]


def tracks(xs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Modality tracks of runs of random modalities (patches that span modalities); in place, the prefixes end
    in turn with SOM_ANSWER (candidate bytes: answer), SOM_IMAGE (image), EOS (special) or a byte (its own)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, x in enumerate(xs):
        mod = torch.empty(len(x), dtype=torch.long)
        t = 0
        while t < len(x):
            n = int(torch.randint(1, 7, (1,), generator=g))
            mod[t:t + n] = int(torch.randint(0, 5, (1,), generator=g))
            t += n
        if len(x) > 1 and i % 4 < 3:
            x[-1] = (vocab.SOM_ANSWER, vocab.SOM_IMAGE, vocab.EOS)[i % 4]
            mod[-1] = int(Modality.SPECIAL)
        out.append(mod)
    return out


def aware_case(seed: int = 1, lengths=AWARE_LENGTHS):
    xs = prefixes(seed, lengths)
    return xs, tracks(xs, seed)


@pytest.mark.parametrize("name", list(AWARE_MODELS))
def test_modality_aware_score_batch_equals_the_per_prefix_loop(name, monkeypatch):
    """Prefixes ending at and between patch boundaries, after every kind of open segment; candidates of length
    0, 1 and longer than a patch: the batch equals the loop (Decoder.score with the prefix's track), with the
    same argmax, in exact-length and bucketed prefills, without calling the reference's feed."""
    m = tiny(AWARE_MODELS[name])
    assert m.stream_meta.modality_aware
    xs, ms = aware_case()
    want = StreamModel.score_batch(m, xs, AWARE_CANDIDATES, ms)
    for bucket in (1, scoring.BUCKET_UNITS):
        monkeypatch.setattr(scoring, "BUCKET_UNITS", bucket)
        with monkeypatch.context() as mp:
            mp.setattr(Decoder, "feed", lambda *a, **k: pytest.fail("score_batch called Decoder.feed"))
            got = m.score_batch(xs, AWARE_CANDIDATES, modalities=ms)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-6), (bucket, (got - want).abs().max())
        assert torch.equal(got.argmax(1), want.argmax(1))
        assert (got[:, AWARE_CANDIDATES.index([])] == 0).all()


def test_modality_aware_candidates_route_by_the_open_segment(monkeypatch):
    """The check above can fail: candidate bytes routed by a wrong modality (the segment open after the prefix
    ignored) or a wrong prefix track change the scores far past the tolerance."""
    m = tiny(AWARE_MODELS["mamba2 both"])
    xs, ms = aware_case()
    want = StreamModel.score_batch(m, xs, AWARE_CANDIDATES, ms)
    right = scoring.next_modality
    monkeypatch.setattr(scoring, "next_modality",
                        lambda tok, seg: right(tok, torch.full_like(seg, int(Modality.TEXT))))
    wrong = m.score_batch(xs, AWARE_CANDIDATES, modalities=ms)
    assert (wrong - want).abs().max() > 1e-2
    monkeypatch.setattr(scoring, "next_modality", right)
    other = m.score_batch(xs, AWARE_CANDIDATES, modalities=[(t + 1) % 5 for t in ms])
    assert (other - want).abs().max() > 1e-2


def test_modality_aware_random_batches(monkeypatch):
    """Random batches (lengths, candidate sets with specials, bucket sizes, row chunks) equal the loop."""
    m = tiny(AWARE_MODELS["3-stage all"])
    g = torch.Generator().manual_seed(11)
    tokens = [*range(0, 256, 17), vocab.SOM_ANSWER, vocab.SOM_TEXT, vocab.EOM, vocab.EOS]
    for trial in range(12):
        monkeypatch.setattr(scoring, "BUCKET_UNITS", int(torch.randint(1, 5, (1,), generator=g)))
        monkeypatch.setattr(scoring, "MAX_ROWS", int(torch.randint(1, 12, (1,), generator=g)))
        lengths = torch.randint(0, 26, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        cands = [[tokens[i] for i in torch.randint(0, len(tokens), (int(torch.randint(0, 9, (1,), generator=g)),),
                                                   generator=g)] for _ in range(int(torch.randint(1, 4, (1,),
                                                                                                  generator=g)))]
        xs, ms = aware_case(trial, lengths)
        got, want = m.score_batch(xs, cands, modalities=ms), StreamModel.score_batch(m, xs, cands, ms)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-6), (trial, lengths, cands, scoring.BUCKET_UNITS)


def test_modality_aware_needs_a_track_per_prefix():
    """No track, too few, or one of the wrong length: a clear error naming the prefix, never a guessed route."""
    m = tiny(AWARE_MODELS["transformer outer"])
    xs, ms = aware_case(lengths=[3, 9])
    with pytest.raises(ValueError, match="modality track of every prefix"):
        m.score_batch(xs, [[1]])
    with pytest.raises(ValueError, match="1 modality tracks for 2 prefixes"):
        m.score_batch(xs, [[1]], modalities=ms[:1])
    with pytest.raises(ValueError, match=r"prefix 1 has shape \(8,\)"):
        m.score_batch(xs, [[1]], modalities=[ms[0], ms[1][:8]])
    dense = tiny(MODELS["mamba2+transformer"])  # a dense model ignores the tracks, as its reference does
    assert torch.equal(dense.score_batch(xs, [[1]], modalities=ms), dense.score_batch(xs, [[1]]))


@pytest.mark.parametrize("name", ["mamba2+transformer", "transformer+transformer", "3-stage"])
def test_random_batches(name, monkeypatch):
    """Random batches (lengths, candidate sets, bucket sizes): every mix of prefill groups, offsets and window
    widths equals the loop (e.g. a batch whose widest window is also its longest offset's)."""
    m = tiny(MODELS[name])
    g = torch.Generator().manual_seed(7)
    for trial in range(30):
        monkeypatch.setattr(scoring, "BUCKET_UNITS", int(torch.randint(1, 5, (1,), generator=g)))
        lengths = torch.randint(0, 30, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        cands = [torch.randint(0, 256, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(int(torch.randint(1, 4, (1,), generator=g)))]
        xs = prefixes(trial, lengths)
        got, want = m.score_batch(xs, cands), reference(m, xs, cands)
        assert torch.allclose(got, want, atol=1e-5), (trial, lengths, [len(c) for c in cands], scoring.BUCKET_UNITS)
