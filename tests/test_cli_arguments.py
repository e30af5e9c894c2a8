"""Every bad CLI argument of ``generate`` and ``prepare clevr-synth``, every duplicate YAML key, model shapes that
cannot be built and an explicit ``--checkpoint best`` that cannot be honoured: a one-line
``omnibyte <verb>: error: ...`` naming the argument or key, exit code 2, no traceback (the hardening issue)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest

from omnibyte.cli import main
from omnibyte.config import ConfigError, load_yaml


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run with two checkpoints and a best.json naming step 1 or 2."""
    tmp = tmp_path_factory.mktemp("cliargs")
    assert main(["train", "debug_tiny", "train.steps=2", "train.eval_every=1", "train.ckpt_every=1",
                 "train.keep_last=2", "eval.max_samples=4", "data.batch_size=2", "model.stages.0.length=4",
                 "data.seq_len=32", "out_dir=" + str(tmp), "--quiet"]) == 0
    return tmp / "debug_tiny"


def _error(capsys, verb: str, argv: list[str], *names: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert err.startswith(f"omnibyte {verb}: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


# ------------------------------------------------------------------------------------------------
# generate


GENERATE_BAD = {
    ("--top-k", "-3"): "--top-k",
    ("--max-new-bytes", "-5"): "--max-new-bytes",
    ("--max-new-bytes", "0"): "--max-new-bytes",
    ("--temperature", "-1"): "--temperature",
    ("--temperature", "nan"): "--temperature",
    ("--top-p", "0"): "--top-p",
    ("--top-p", "1.5"): "--top-p",
    ("--num", "0"): "--num",
    ("--num", "-1"): "--num",
    ("--draft-len", "0"): "--draft-len",
    ("--draft", "x", "--compile"): "--compile",
    ("--graph-verify",): "--draft",  # graph verification verifies drafts
    ("--draft", "lookup", "--graph-verify", "--no-graphs"): "--no-graphs",
    ("--draft", "lookup", "--aligned"): "--graph-verify",  # aligned shapes the static passes
    ("--draft-layers", "1,1"): "--draft-layers",
    ("--draft", "self", "--draft-layers", "1,x"): "--draft-layers",
    ("--lookup-ngram", "2,8"): "--draft lookup",  # lookup's tuning without the lookup drafter
    ("--draft", "lookup", "--lookup-ngram", "3"): "--lookup-ngram",
    ("--draft", "lookup", "--lookup-ngram", "a,b"): "--lookup-ngram",
}


@pytest.mark.parametrize("arg", list(GENERATE_BAD), ids=" ".join)
def test_generate_refuses_out_of_range_arguments(run, capsys, arg):
    _error(capsys, "generate", ["generate", str(run), *arg], GENERATE_BAD[arg])


def test_generate_refuses_a_prompt_file_that_is_not_a_readable_file(run, tmp_path, capsys):
    err = _error(capsys, "generate", ["generate", str(run), "--prompt-file", str(tmp_path)], "--prompt-file")
    assert "directory" in err
    _error(capsys, "generate", ["generate", str(run), "--prompt-file", str(tmp_path / "absent")], "--prompt-file")


def test_a_prompt_file_is_printed_before_its_continuation_as_a_prompt_is(run, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("The ")
    common = ["generate", str(run), "--max-new-bytes", "8", "--seed", "3", "--quiet"]
    capsys.readouterr()
    assert main([*common, "--prompt", "The "]) == 0
    given = capsys.readouterr().out
    assert main([*common, "--prompt-file", str(tmp_path / "p.txt")]) == 0
    assert capsys.readouterr().out == given and given.startswith("The ")


def test_generate_follows_the_runs_precision_policy_as_ask_does(run, capsys, monkeypatch):
    """generate ran in fp32 while ask and eval ran under the run's bf16 autocast: the same greedy prompt could
    answer differently in the two commands. It now decodes under the same policy (eager paths) and logs it."""
    import torch

    from omnibyte.commands.generate import precision_of
    from omnibyte.model.mblm import MBLM
    from omnibyte.run import load_run

    seen = []
    real = MBLM.generate

    def spy(self, *a, **k):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real(self, *a, **k)

    monkeypatch.setattr(MBLM, "generate", spy)
    config = load_run(run).config
    for precision, want in (("bf16", torch.bfloat16), ("fp32", False), ("auto", False)):
        cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
        monkeypatch.setattr("omnibyte.run.load_run",
                            lambda *a, _c=cfg, **k: _with_config(load_run(*a, **k), _c))
        assert main(["generate", str(run), "--prompt", "ab", "--max-new-bytes", "2", "--temperature", "0"]) == 0
        assert seen[-1] == want, (precision, seen)
    cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, precision="auto"))
    cuda = torch.device("cuda")
    assert precision_of(cfg, cuda, graphs=False) and not precision_of(cfg, cuda, graphs=True)


def _with_config(loaded, config):
    try:
        return dataclasses.replace(loaded, config=config)
    except TypeError:
        loaded.config = config
        return loaded


def test_generate_accepts_the_range_edges(run, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_bytes(b"The")
    assert main(["generate", str(run), "--prompt-file", str(prompt), "--max-new-bytes", "1", "--temperature", "0",
                 "--top-k", "0", "--top-p", "1", "--num", "2", "--device", "cpu"]) == 0


def test_generate_with_a_draft_run_prints_the_plain_greedy_output(run, tmp_path, capsys):
    """--draft RUN (here the run drafts for itself): the same greedy text, and the acceptance is logged;
    a draft that is not a run is one error line."""
    argv = ["generate", str(run), "--prompt", "The", "--max-new-bytes", "12", "--temperature", "0", "--device", "cpu"]
    capsys.readouterr()
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--draft", str(run), "--draft-len", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain
    assert "acceptance 100.0%" in out.err
    _error(capsys, "generate", argv + ["--quiet", "--draft", str(tmp_path / "absent")], "absent")
    assert main(argv + ["--draft", "self", "--draft-layers", "1,1"]) == 0  # debug_tiny: 2 stages
    assert capsys.readouterr().out == plain
    assert main(argv + ["--draft", "lookup", "--draft-len", "4"]) == 0  # prompt lookup: no model
    assert capsys.readouterr().out == plain
    assert main(argv + ["--draft", "lookup", "--lookup-ngram", "1,4", "--lookup-candidates", "4"]) == 0
    assert capsys.readouterr().out == plain  # tuned lookup: greedy output unchanged
    _error(capsys, "generate", argv + ["--quiet", "--draft", "lookup", "--lookup-ngram", "5,3"], "--lookup-ngram")
    _error(capsys, "generate", argv + ["--quiet", "--draft", "self", "--draft-layers", "1"], "--draft", "stages")


@pytest.fixture(scope="module")
def mamba_run(tmp_path_factory):
    """debug_tiny with a Mamba-2 global stage (the shape the static verification passes cover)."""
    tmp = tmp_path_factory.mktemp("cliargs_m2")
    assert main(["train", "debug_tiny", "train.steps=1", "train.eval_every=1", "train.ckpt_every=1",
                 "eval.max_samples=1", "data.batch_size=2", "model.stages.0.length=4", "data.seq_len=32",
                 "model.stages.0.block={name: mamba2_ref, d_state: 8, headdim: 8, chunk_size: 4}",
                 "out_dir=" + str(tmp), "--quiet"]) == 0
    return tmp / "debug_tiny"


def test_generate_graph_verify_prints_the_plain_greedy_output(run, mamba_run, capsys, monkeypatch):
    """--draft ... --graph-verify: generate(..., graph_verify=True), the static verification passes (run eagerly
    off CUDA) on a model they cover, the logged eager fallback on one they do not; the greedy text is plain
    decoding's either way. A run with nothing drafted logs no acceptance rate (it said "acceptance nan%")."""
    from omnibyte.model.inference.graph_verify import StaticVerifier

    passes = []
    real = StaticVerifier.run
    monkeypatch.setattr(StaticVerifier, "run", lambda self, toks: passes.append(toks.shape) or real(self, toks))
    for r, static in ((mamba_run, True), (run, False)):
        argv = ["generate", str(r), "--prompt", "The", "--max-new-bytes", "12", "--temperature", "0", "--device",
                "cpu", "--num", "2"]
        capsys.readouterr()
        assert main(argv) == 0
        plain = capsys.readouterr().out
        del passes[:]
        assert main(argv + ["--draft", "self", "--draft-layers", "1,1", "--draft-len", "3", "--graph-verify"]) == 0
        out = capsys.readouterr()
        assert out.out == plain
        assert "kept (acceptance" in out.err and "verification passes" in out.err
        assert bool(passes) == static, (r, passes)
        assert ("no static verification" in out.err) != static, out.err
        assert main(argv + ["--draft", "lookup", "--graph-verify"]) == 0
        assert capsys.readouterr().out == plain
        assert main(argv + ["--draft", "lookup", "--graph-verify", "--aligned"]) == 0  # patch-aligned passes
        assert capsys.readouterr().out == plain
    # one new byte: the prefill's, no round, nothing drafted
    argv[argv.index("12")] = "1"
    assert main(argv + ["--draft", "lookup", "--graph-verify"]) == 0
    err = capsys.readouterr().err
    assert "no bytes drafted, so no acceptance rate (0 verification passes)" in err and "nan" not in err, err


def test_the_precision_line_says_what_decodes_on_cuda(run, mamba_run):
    """On CUDA with --graph-verify (or the plain CUDA-graph step) a model without the static passes (step) decodes
    with the eager ones at the weights' fp32; the line said "the CUDA-graph step" all the same. It now names what
    runs, and claims bf16 for ask and eval only under a bf16 policy. CUDA is absent here: the line is built for a
    CUDA device from the CPU models (static_support needs no GPU)."""
    import torch

    from omnibyte.commands.generate import precision_line
    from omnibyte.run import load_run

    cuda = torch.device("cuda")
    tf, m2 = load_run(run), load_run(mamba_run)  # a Transformer global stage; a Mamba-2 one (static passes)
    cfg = {p: dataclasses.replace(tf.config, train=dataclasses.replace(tf.config.train, precision=p))
           for p in ("auto", "fp32")}
    line = precision_line(cfg["auto"], cuda, tf.model, graphs=True, graph_verify=True)
    assert line.startswith("float32 weights, no autocast (eager verification passes and steps, as this model has "
                           "no static verification: GraphStepper needs a Mamba-2 global stage"), line
    assert "CUDA-graph step" not in line and "without --graph-verify" in line
    line = precision_line(cfg["auto"], cuda, tf.model, graphs=True, graph_verify=False)
    assert line.startswith("float32 weights, no autocast (eager steps, as this model has no CUDA-graph step"), line
    assert "--no-graphs for the same" in line
    line = precision_line(cfg["auto"], cuda, m2.model, graphs=True, graph_verify=True)
    assert line.startswith("float32 weights, no autocast (the CUDA-graph step and static verification passes; ask "
                           "and eval run bf16 autocast"), line
    assert precision_line(cfg["auto"], cuda, m2.model, graphs=True, graph_verify=False).startswith(
        "float32 weights, no autocast (the CUDA-graph step; ")
    assert precision_line(cfg["fp32"], cuda, m2.model, graphs=True, graph_verify=True) == (
        "float32 weights, no autocast (the CUDA-graph step and static verification passes)")  # no bf16 claim
    assert "bf16" not in precision_line(cfg["fp32"], cuda, tf.model, graphs=True, graph_verify=True)
    assert precision_line(cfg["auto"], cuda, tf.model, graphs=False, graph_verify=False).startswith("bf16 autocast")
    assert precision_line(cfg["auto"], torch.device("cpu"), m2.model, False, False) == "fp32 (train.precision)"


# ------------------------------------------------------------------------------------------------
# prepare clevr-synth


CLEVR_BAD = {
    ("--images", "-3"): "--images",
    ("--images", "0"): "--images",
    ("--images", "1"): "--images",  # val would get no image
    ("--images", "5", "--split-names", "train=2,val=1"): "--images",
    ("--split-names", "train=2,val=0"): "val",
    ("--split-names", "train=2,val"): "--split-names",
    ("--split-names", "train=2,train=1"): "train",
    ("--questions-per-image", "-1"): "--questions-per-image",
    ("--questions-per-image", "0"): "--questions-per-image",
    ("--workers", "-2"): "--workers",
}


@pytest.mark.parametrize("arg", list(CLEVR_BAD), ids=" ".join)
def test_clevr_synth_refuses_bad_arguments_and_writes_nothing(tmp_path, capsys, arg):
    out = tmp_path / "s"
    _error(capsys, "prepare", ["prepare", "clevr-synth", "--out", str(out), "--no-render", "--no-progress", *arg],
           CLEVR_BAD[arg])
    assert not out.exists()


def test_clevr_synth_counts_set_the_total_and_may_be_repeated_by_images(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["prepare", "clevr-synth", "--out", str(out), "--no-render", "--no-progress", "--images", "3",
                 "--questions-per-image", "1", "--split-names", "train=2,val=1", "--size", "16x16"]) == 0
    scenes = {s: len(json.loads((out / "scenes" / f"CLEVR_{s}_scenes.json").read_text())["scenes"])
              for s in ("train", "val")}
    assert scenes == {"train": 2, "val": 1}


# ------------------------------------------------------------------------------------------------
# YAML: duplicate keys


def test_duplicate_yaml_keys_are_refused_naming_key_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("extends: debug_tiny\ntrain:\n  steps: 2\n  lr: 1.0e-3\n  steps: 5\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(cfg)
    msg = str(e.value)
    assert "'steps'" in msg and f"{cfg.resolve()}:5" in msg and "line 3" in msg, msg
    _error(capsys, "train", ["train", str(cfg), "--quiet"], "steps", "dup.yaml:5")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("base: &b {x: 1, y: 2}\nk:\n  <<: *b\n  x: 5\n")
    assert load_yaml(cfg)["k"] == {"x": 5, "y": 2}


# ------------------------------------------------------------------------------------------------
# model shapes that cannot be built: refused when the config is read


@pytest.mark.parametrize("override,names", [
    ("model.stages.0.width=90", ("model.stages.0", "width 90", "heads 4")),
    ("model.stages.0.width=20", ("model.stages.0", "width 20", "head_dim")),  # 20 / 4 heads: odd RoPE head_dim
])
def test_width_heads_mismatch_is_a_config_error(tmp_path, capsys, override, names):
    _error(capsys, "train", ["train", "debug_tiny", override, "out_dir=" + str(tmp_path), "--quiet"], *names)
    assert not (tmp_path / "debug_tiny").exists()


def test_learned_positions_shorter_than_seq_len_fail_at_start_up(tmp_path, capsys):
    _error(capsys, "train", ["train", "debug_tiny", "model.stages.0.block.positions=learned", "data.seq_len=257",
                             "out_dir=" + str(tmp_path), "--quiet"], "data.seq_len=257", "model.stages.0", "256")
    assert not (tmp_path / "debug_tiny").exists()


# ------------------------------------------------------------------------------------------------
# --checkpoint best that cannot be honoured


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


@pytest.mark.parametrize("damage", ["garbage", "not-a-mapping", "pruned"])
def test_explicit_best_refuses_when_best_json_is_unusable(run, tmp_path, capsys, caplog, damage):
    from omnibyte.run import find_checkpoint

    r = _copy(run, tmp_path)
    best = r / "checkpoints" / "best.json"
    best.write_text({"garbage": "{not json", "not-a-mapping": "[1, 2]",
                     "pruned": json.dumps({"step": 7, "metric": "bpb", "value": 1.0})}[damage])
    _error(capsys, "eval", ["eval", str(r), "--checkpoint", "best", "eval.per_token=false",
                            "eval.task_metrics=false"], "best.json")
    from omnibyte.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        find_checkpoint(r, "best")
    # the automatic default may fall back, but says so: "latest", and a warning
    with caplog.at_level(logging.WARNING):
        path, which = find_checkpoint(r, None)
    assert which == "latest" and path.name == "step_000002"
    assert any("best checkpoint" in rec.getMessage() for rec in caplog.records)


def test_explicit_best_still_loads_the_best(run):
    from omnibyte.run import find_checkpoint

    step = json.loads((run / "checkpoints" / "best.json").read_text())["step"]
    path, which = find_checkpoint(run, "best")
    assert which == "best" and path.name == f"step_{step:06d}"


def test_an_eval_checkpoint_override_picks_the_checkpoint_it_names(run, tmp_path):
    """`omnibyte eval RUN eval.checkpoint=latest` scored the best checkpoint: the override was applied to the
    loaded config only after the run's recorded eval.checkpoint (auto) had chosen. Against --checkpoint it is a
    conflict, refused."""
    from omnibyte.run import load_run

    r = _copy(run, tmp_path)
    (r / "checkpoints" / "best.json").write_text(json.dumps({"step": 1, "metric": "validation/bpb", "value": 1.0}))
    assert (load_run(r).step, load_run(r).which) == (1, "best")
    latest = load_run(r, overrides=["eval.checkpoint=latest"])
    assert (latest.step, latest.which, latest.config.eval.checkpoint) == (2, "latest", "latest")
    assert load_run(r, overrides=["eval.checkpoint=latest", "eval.checkpoint=best"]).step == 1  # the last one
    assert load_run(r, "latest", overrides=["eval.checkpoint=latest"]).step == 2
    with pytest.raises(ConfigError, match="--checkpoint 1 and the override eval.checkpoint=latest"):
        load_run(r, "1", overrides=["eval.checkpoint=latest"])


def test_an_empty_prompt_starts_where_the_runs_documents_start():
    """An empty prompt became BOS for every run, a token a run without BOS never trained on."""
    from omnibyte import vocab
    from omnibyte.commands.generate import document_start
    from omnibyte.registry import SERIALIZERS

    def utf8(**kw):
        return SERIALIZERS.build({"name": "utf8", **kw})

    assert document_start(utf8(bos=True, eos=True)) == [vocab.BOS]
    assert document_start(utf8(eos=True)) == [vocab.EOS]  # concatenated documents follow EOS
    with pytest.raises(ConfigError, match="neither BOS nor EOS"):
        document_start(utf8())


def test_a_generation_prompt_is_never_cut_by_the_training_length_cap():
    """utf8 with max_bytes: truncate=head fed the model the first max_bytes of the prompt (and the CLI printed
    the whole prompt before the continuation); truncate=error fell back to raw bytes, without the BOS."""
    from omnibyte import vocab
    from omnibyte.commands.generate import prompt_tokens
    from omnibyte.registry import SERIALIZERS

    text = "hello world"
    for truncate in ("head", "error", "tail"):
        ser = SERIALIZERS.build({"name": "utf8", "bos": True, "eos": True, "max_bytes": 4, "truncate": truncate})
        assert prompt_tokens(ser, text, None, raw=False) == [vocab.BOS, *text.encode()], truncate
    qa = SERIALIZERS.build({"name": "qa", "image": {"name": "pixels", "size": [4, 3]}})
    assert prompt_tokens(qa, "hi", None, raw=False) == list(b"hi")  # needs more than text: the bytes themselves
    # a prompt file of a text run is text, serialized as --prompt is (it skipped the serializer: no BOS)
    assert prompt_tokens(ser, "", "héllo".encode(), raw=False) == [vocab.BOS, *"héllo".encode()]
    assert prompt_tokens(ser, "", b"\xff\x00", raw=True) == [255, 0]
    from omnibyte.config import ConfigError

    with pytest.raises(ConfigError, match=r"--prompt-file: not UTF-8 text .* pass --raw"):
        prompt_tokens(ser, "", b"\xff\x00", raw=False)
