"""End-to-end CPU runs of the engine: learning, the run directory, eval/generate/plot, NaN steps, init_from."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from omnibyte.cli import main
from omnibyte.config import ConfigError
from omnibyte.logging import read_metrics
from omnibyte.model import build_model

TINY = {
    "seed": 0,
    "task": {"name": "synthetic_text", "samples": {"train": 512, "validation": 16}},
    "serializer": {"name": "utf8", "eos": True},
    "model": {"name": "mblm", "stages": [
        {"length": 16, "width": 48, "layers": 1, "block": {"name": "transformer", "heads": 2}},
        {"length": 4, "width": 32, "layers": 1, "block": {"name": "transformer", "heads": 2}}]},
    "data": {"seq_len": 64, "batch_size": 8, "shuffle_buffer": 64},
    "train": {"steps": 40, "lr": 3e-3, "min_lr": 3e-4, "warmup": 5, "log_every": 5, "eval_every": 20,
              "ckpt_every": 20, "progress": False},
    "eval": {"max_samples": 8},
}


def write_config(tmp_path, name="tiny", **sections):
    cfg = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    cfg["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    assert main(["train", str(write_config(tmp)), "--quiet"]) == 0
    return tmp / "runs" / "tiny"


def test_short_run_learns_and_writes_a_complete_run_dir(trained):
    run = trained
    for name in ("config.resolved.yaml", "metrics.jsonl", "train.log", "checkpoints/latest", "checkpoints/best.json"):
        assert (run / name).is_file(), name
    assert list((run / "events").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000020", "step_000040"]
    for f in ("model.safetensors", "optimizer.pt", "rng.pt", "state.json"):
        assert (run / "checkpoints/step_000040" / f).is_file()
    records = read_metrics(run)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert train[-1]["loss"] < 0.7 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    assert all(k in train[-1] for k in ("bpb", "bpb/text", "lr", "grad_norm", "bytes_per_s"))
    evals = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["bpb"] < evals[0]["bpb"]
    # weights load without unpickling code, with the token contract recorded
    weights = load_file(str(run / "checkpoints/step_000040/model.safetensors"))
    assert "head.weight" in weights
    state = json.loads((run / "checkpoints/step_000040/state.json").read_text())
    assert state["contract_version"] == 1 and state["step"] == 40 and state["config"]["train"]["steps"] == 40
    torch.load(run / "checkpoints/step_000040/optimizer.pt", weights_only=True)


def test_eval_generate_plot(trained, capsys):
    run = trained
    assert main(["eval", str(run), "validation"]) == 0
    out = json.loads((run / "eval/validation_40.json").read_text())
    assert out["step"] == 40 and out["bpb"] > 0 and "bpb/text" in out
    import h5py

    with h5py.File(run / "eval/validation_40.h5") as f:
        assert f["nll"].shape == f["tokens"].shape and f.attrs["step"] == 40
        mask = f["loss_mask"][:]
        bpb = float((f["nll"][:] * mask).sum() / mask.sum() / 0.6931471805599453)
    assert bpb == pytest.approx(out["bpb"], rel=1e-4)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "The red", "--max-new-bytes", "20", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The red")
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("fused", [False, True])  # fused: the skip is decided on the device (omnibyte.nonfinite)
def test_nan_steps_are_skipped_and_counted(tmp_path, fused):
    cfg = write_config(tmp_path, train={"steps": 8, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
                                        "inject_nan_at": [3, 4], "fused_optimizer": fused})
    assert main(["train", str(cfg), "--quiet"]) == 0
    train = [r for r in read_metrics(tmp_path / "runs/tiny") if r["split"] == "train"]
    assert [r["bad_steps"] for r in train] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert train[2]["loss"] is None and train[4]["loss"] is not None  # nothing counted from skipped steps


@pytest.mark.parametrize("fused", [False, True])
def test_too_many_bad_steps_in_a_row_fail(tmp_path, capsys, fused):
    # fused: the host learns of it at the next log line (step 5) and names the step where the limit was reached;
    # the checkpoint due at step 5 is not written
    cfg = write_config(tmp_path, train={"steps": 8, "inject_nan_at": [2, 3, 4], "max_bad_steps": 3,
                                        "ckpt_every": 5, "fused_optimizer": fused})
    assert main(["train", str(cfg), "--quiet"]) == 1
    assert "3 non-finite steps in a row (train.max_bad_steps=3) at step 4" in capsys.readouterr().err
    assert not (tmp_path / "runs/tiny/checkpoints/step_000005").exists()


def test_init_from_loads_all_or_selected_stages(trained, tmp_path):
    src = load_file(str(trained / "checkpoints/step_000040/model.safetensors"))
    frozen = {"steps": 1, "inject_nan_at": [1], "warmup": 0,  # the one step is skipped: weights as loaded
              "eval_every": 0, "ckpt_every": 0,
              "init_from": str(trained)}
    assert main(["train", str(write_config(tmp_path, "all", train=frozen)), "--quiet"]) == 0
    got = load_file(str(tmp_path / "runs/all/checkpoints/step_000001/model.safetensors"))
    assert all(torch.equal(got[k], src[k]) for k in src)
    log_text = (tmp_path / "runs/all/train.log").read_text()  # logged before train.log opened, kept
    assert f"init_from {trained}" in log_text and "loaded" in log_text and "parameters" in log_text
    frozen["init_stages"] = [0]
    assert main(["train", str(write_config(tmp_path, "stage0", train=frozen)), "--quiet"]) == 0
    got = load_file(str(tmp_path / "runs/stage0/checkpoints/step_000001/model.safetensors"))
    stage0 = [k for k in src if k.startswith(("blocks.0.", "start.0", "patch_embed.0.", "to_next.0."))]
    assert stage0 and all(torch.equal(got[k], src[k]) for k in stage0)
    assert not torch.equal(got["head.weight"], src["head.weight"])  # the inner stage starts fresh
    # a chosen stage the source holds only in part (here: one layer more than the source's) is refused, naming
    # what is missing; it loaded the first layer and left the second at init, in silence
    deeper = json.loads(json.dumps(TINY["model"]))
    deeper["stages"][0]["layers"] += 1
    with pytest.raises(ConfigError, match=r"missing there: blocks\.0\.layers\.1\."):
        from omnibyte.startup import init_weights_from

        init_weights_from(build_model(deeper), str(trained), (0,))


def _curve(tmp_path, name, **train):
    cfg = write_config(tmp_path, name, train={"steps": 4, "log_every": 1, "eval_every": 0, "ckpt_every": 0, **train})
    assert main(["train", str(cfg), "--quiet"]) == 0
    return [r["loss"] for r in read_metrics(tmp_path / "runs" / name) if r["split"] == "train"]


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    assert _curve(tmp_path, "ac", activation_checkpointing=True) == _curve(tmp_path, "plain")
    log_text = (tmp_path / "runs/ac/train.log").read_text()
    assert "activation checkpointing on 0 blocks" not in log_text and "activation checkpointing on" in log_text


def test_fused_optimizer_follows_the_unfused_one(tmp_path):
    fused = _curve(tmp_path, "fused", fused_optimizer=True)
    assert fused == pytest.approx(_curve(tmp_path, "foreach", fused_optimizer=False), rel=1e-5)
    assert fused != _curve(tmp_path, "fused_lr", fused_optimizer=True, lr=1e-2)  # the test can fail


def test_cuda_graphs_option_is_a_no_op_without_cuda(tmp_path):
    """train.cuda_graphs graphs only stages on mamba-ssm's CUDA kernels (tested on GPU); on CPU it changes
    nothing, and the log says so."""
    assert _curve(tmp_path, "graphs", cuda_graphs=True) == _curve(tmp_path, "plain")
    assert "CUDA graphs for 0 stage block(s)" in (tmp_path / "runs/graphs/train.log").read_text()


def test_cuda_graphs_are_refused_under_fsdp2_by_name():
    """FSDP2 gathers each block's weights from a forward hook, which a captured graph would not replay: the
    combination is a ConfigError that says why and what works (DDP or one process), before any step."""
    from types import SimpleNamespace

    from omnibyte import build_model
    from omnibyte.config import ConfigError
    from omnibyte.parallel import DistInfo, parallelize

    m = build_model({"stages": [{"length": 4, "width": 16, "layers": 1}, {"length": 4, "width": 16, "layers": 1}]})
    tcfg = SimpleNamespace(activation_checkpointing=False, compile=False, cuda_graphs=True)
    with pytest.raises(ConfigError, match=r"cuda_graphs.*fsdp2.*use ddp or one process"):
        parallelize(m, DistInfo(strategy="fsdp2"), tcfg, SimpleNamespace(), bf16=False)


def test_per_block_wrappers_reach_the_model_inside_the_loss_module():
    """AC, compile and FSDP2 act on the model's layers through the BatchLoss wrapper the engine trains."""
    from omnibyte import build_model
    from omnibyte.loss import LossModule as BatchLoss
    from omnibyte.parallel import apply_activation_checkpointing, blocks_of

    m = build_model({"stages": [{"length": 4, "width": 16, "layers": 2}, {"length": 4, "width": 16, "layers": 3}]})
    assert len(blocks_of(BatchLoss(m))) == 5
    assert apply_activation_checkpointing(BatchLoss(m)) == 5


@pytest.mark.slow
def test_compiled_blocks_follow_eager(tmp_path):
    eager, compiled = _curve(tmp_path, "eager"), _curve(tmp_path, "compiled", compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_grad_accumulation_matches_the_bigger_batch(tmp_path):
    """Concat rows carry equal weight, so 2 micro-batches of 4 rows = 1 batch of the same 8 rows."""
    cfg = write_config(tmp_path, "accum", data={"batch_size": 4},
                       train={"steps": 4, "grad_accum": 2, "log_every": 1, "eval_every": 0, "ckpt_every": 0})
    assert main(["train", str(cfg), "--quiet"]) == 0
    big = _curve(tmp_path, "big")
    accum, big_norms = ([(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "runs" / n) if r["split"] == "train"]
                        for n in ("accum", "big"))
    assert [a[0] for a in accum] == pytest.approx(big, rel=1e-5)
    assert [a[1] for a in accum] == pytest.approx([b[1] for b in big_norms], rel=1e-4)  # gradients, not just Adam


def test_grad_accumulation_weighs_micro_batches_by_their_loss_weight(tmp_path):
    """Padded rows carry different loss weights: the step's gradient is that of sum(w * nll) / sum(w) over the
    whole step, so 8 x 1, 4 x 2 and 1 x 8 rows give one loss and one gradient norm (a mean of per-micro-batch
    means gave 0.661 / 0.670 / 0.684)."""
    norms = {}
    for rows, accum in ((8, 1), (4, 2), (1, 8)):
        name = f"r{rows}x{accum}"
        model = json.loads(json.dumps(TINY["model"]))
        model["stages"][0]["length"] = 64  # 64 patches of 4 bytes: rows up to 256
        cfg = write_config(tmp_path, name, model=model,
                           data={"batch_size": rows, "packing": "pad", "pad_to": "longest", "seq_len": 256,
                                 "shuffle": False, "workers": 0},
                           train={"steps": 2, "grad_accum": accum, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
                                  "warmup": 0})
        assert main(["train", str(cfg), "--quiet"]) == 0
        norms[name] = [x for r in read_metrics(tmp_path / "runs" / name) if r["split"] == "train"
                       for x in (r["loss"], r["grad_norm"])]
    ref = norms.pop("r8x1")
    for name, got in norms.items():
        assert got == pytest.approx(ref, rel=1e-4), name


def test_logged_skip_counts_are_summed_over_ranks(monkeypatch):
    """metrics.jsonl's data/* counts used to be rank 0's alone under DDP."""
    from omnibyte import parallel, train

    gathered = [{"task_skipped": 2, "overlong": 1}, {"task_skipped": 3, "bad_sample": 4}]
    monkeypatch.setattr(parallel, "all_gather_object", lambda obj, info: gathered)
    assert train.summed_counts({"task_skipped": 2, "overlong": 1}, None) == \
        {"bad_sample": 4, "overlong": 1, "task_skipped": 5}


def test_a_resumed_run_follows_its_own_config_schedule(tmp_path):
    """Raising train.steps on resume: the first step after it ran at the old schedule's lr (its min_lr); a run
    resuming another run's checkpoint trained with that run's lr and weight decay."""
    from omnibyte.optim import lr_factor
    from omnibyte.runconfig import TrainConfig

    cfg = write_config(tmp_path, train={"steps": 20, "log_every": 1, "eval_every": 0, "ckpt_every": 20})
    assert main(["train", str(cfg), "--quiet"]) == 0
    assert main(["train", str(cfg), "train.steps=40", "--quiet"]) == 0
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "runs" / "tiny") if r["split"] == "train"}
    t40 = TrainConfig(**{**TINY["train"], "steps": 40})
    assert lrs[21] == pytest.approx(t40.lr * lr_factor(20, t40)) and lrs[22] == pytest.approx(t40.lr * lr_factor(21, t40))
    step20 = tmp_path / "runs" / "tiny" / "checkpoints" / "step_000020"
    assert main(["train", str(cfg), "run_name=other", f"train.resume={step20}", "train.steps=22", "train.lr=1e-4",
                 "train.min_lr=1e-5", "--quiet"]) == 0
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "runs" / "other") if r["split"] == "train"}
    t = TrainConfig(**{**TINY["train"], "steps": 22, "lr": 1e-4, "min_lr": 1e-5})
    assert lrs[21] == pytest.approx(t.lr * lr_factor(20, t))


def test_init_from_refuses_what_it_would_load_into_the_wrong_place(trained, tmp_path, capsys):
    """init_stages=[-1] from a 2-stage run into a 3-stage model put the source's byte-level block into the middle
    stage; an untied source into a tie_embeddings model kept the head as the embedding, both in silence."""
    frozen = {"steps": 1, "warmup": 0, "eval_every": 0, "ckpt_every": 0, "init_from": str(trained)}
    three = json.loads(json.dumps(TINY["model"]))
    three["stages"] = [{"length": 4, "width": 48, "layers": 1, "block": {"name": "transformer", "heads": 2}},
                       {"length": 4, "width": 32, "layers": 1, "block": {"name": "transformer", "heads": 2}},
                       {"length": 4, "width": 32, "layers": 1, "block": {"name": "transformer", "heads": 2}}]
    capsys.readouterr()
    for sel in ([-1], [1]):
        cfg = write_config(tmp_path, f"three{len(sel)}{sel[0]}", model=three, train={**frozen, "init_stages": sel})
        assert main(["train", str(cfg), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "has 2 stages, this model 3" in err and "innermost stage" in err, sel
    tied = json.loads(json.dumps(TINY["model"]))
    tied["tie_embeddings"] = True
    assert main(["train", str(write_config(tmp_path, "tied", model=tied, train=frozen)), "--quiet"]) == 2
    assert "ties embed.weight and head.weight" in capsys.readouterr().err
