"""Multimodal Pathway (``train.pathway_from``) and ``omnibyte merge``: lambda = 0 is the base model exactly,
gradients reach lambda (and W' only when it trains), the merged run computes the pathway model's logits with the
base model's parameter count, mismatched layers are named, and a pathway run trains, resumes exactly (without its
auxiliary run) and merges into a run that evaluates and generates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train_run import write_config
from torch import nn

from omnibyte import build_model
from omnibyte.cli import main
from omnibyte.config import ConfigError, to_dict
from omnibyte.pathway import PathwayLinear, attach_pathway, merge_modules, merge_state_dict, pathway_targets
from omnibyte.provenance import read as read_provenance
from omnibyte.runconfig import PATHWAY_LAYERS, load_run_config

M2 = {"name": "mamba2_ref", "d_state": 8, "headdim": 8, "chunk_size": 4, "mlp_ratio": 1.0, "bias": True}
M1 = {"name": "mamba1", "d_state": 4}
TF = {"name": "transformer", "heads": 2, "bias": True}


def _model(seed, inner=TF, outer=M2, width=(32, 32)):
    torch.manual_seed(seed)
    return build_model({"stages": [{"length": 4, "width": width[0], "layers": 2, "block": dict(outer)},
                                   {"length": 4, "width": width[1], "layers": 2, "block": dict(inner)}]}).eval()


def _pathway(seed=0, aux_seed=1, layers=PATHWAY_LAYERS[:6], train_aux=True, **kw):
    base, aux = _model(seed, **kw), _model(aux_seed, **kw)
    names = attach_pathway(base, layers, (), aux, train_aux)
    return base, aux, names


def _lambdas(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PathwayLinear):
                m.pathway_lambda.copy_(torch.randn((), generator=g))


TOKENS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("outer", [M2, M1], ids=["mamba2", "mamba1"])
def test_lambda_zero_is_the_base_model_exactly(outer):
    layers = PATHWAY_LAYERS if outer is M1 else PATHWAY_LAYERS[:6]
    model, _, names = _pathway(outer=outer, layers=layers)
    base = _model(0, outer=outer)
    kinds = {n.rpartition(".")[2] for n in names}
    assert kinds == ({"in_proj", "out_proj", "x_proj", "dt_proj"} if outer is M1 else
                     {"in_proj", "out_proj", "gate_up", "down"}) | {"qkv", "out", "gate_up", "down"}
    assert len(names) == 16  # 2 stages x 2 layers x 4 linear layers each
    with torch.no_grad():
        assert torch.equal(model(TOKENS), base(TOKENS))
    # the base weights keep their keys; the pathway adds three per layer beside them
    keys, base_keys = set(model.state_dict()), set(base.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == {f"{n}.{k}" for n in names for k in ("aux_weight", "aux_bias", "pathway_lambda")
                                if k != "aux_bias" or model.get_submodule(n).base_bias is not None}


def test_a_pathway_model_counts_the_base_models_flops_plus_the_weight_combination():
    """One matrix multiply per layer, by W + lambda W': the auxiliary weights add no per-position FLOPs (the
    transfer study's FLOPs-per-step column compares arms by this count), only 5 per auxiliary element a step."""
    from omnibyte.model.flops import PATHWAY_FLOPS_PER_AUX_ELEMENT, train_flops_per_step

    model, _, names = _pathway()
    base = _model(0)
    aux = sum(model.get_submodule(n).aux_weight.numel() for n in names)
    assert aux > 0
    assert train_flops_per_step(model, 2, 64) == train_flops_per_step(base, 2, 64) + PATHWAY_FLOPS_PER_AUX_ELEMENT * aux
    merge_modules(model)  # merged: the base model again
    assert train_flops_per_step(model, 2, 64) == train_flops_per_step(base, 2, 64)


def test_gradient_reaches_lambda_and_aux_only_when_it_trains():
    for train_aux in (True, False):
        model, _, names = _pathway(train_aux=train_aux)
        model.train()
        model(TOKENS).logsumexp(-1).mean().backward()
        for n in names:
            m = model.get_submodule(n)
            assert m.pathway_lambda.grad is not None and m.pathway_lambda.grad.abs() > 0, n
            assert m.aux_weight.requires_grad is train_aux
            if train_aux:  # d/dW' = lambda * d/dW_eff: zero at lambda = 0, but a gradient
                assert m.aux_weight.grad is not None and not m.aux_weight.grad.any()
            else:
                assert m.aux_weight.grad is None and (m.aux_bias is None or m.aux_bias.grad is None)
    model, _, names = _pathway()
    _lambdas(model)
    model.train()
    model(TOKENS).logsumexp(-1).mean().backward()
    assert all(model.get_submodule(n).aux_weight.grad.abs().sum() > 0 for n in names)


def test_the_effective_weight_is_what_readers_of_weight_get():
    """Kernels that read ``layer.weight`` instead of calling the layer (mamba-ssm's fused out_proj, the Mamba-1
    CUDA scan's dt_proj, the decode kernels) get W + lambda W', also under torch.compile."""
    model, aux, names = _pathway()
    _lambdas(model)
    m = model.get_submodule(names[0])
    lam = m.pathway_lambda
    assert torch.equal(m.weight, m.base_weight + lam * aux.get_submodule(names[0]).weight)
    assert torch.equal(m.bias, m.base_bias + lam * aux.get_submodule(names[0]).bias)
    assert not torch.equal(m.weight, m.base_weight)

    class Reader(nn.Module):  # consumes the weight directly, as the kernels do
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return (x[..., None, :] * self.lin.weight).sum(-1) + self.lin.bias + self.lin(x)

    x = torch.randn(3, m.in_features)
    reader = Reader(m)
    want = (x[..., None, :] * m.weight).sum(-1) + m.bias + torch.nn.functional.linear(x, m.weight, m.bias)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.allclose(torch.compile(reader, backend="eager")(x), want, atol=1e-6)
    torch._dynamo.reset()


def test_merge_gives_the_pathway_logits_with_the_base_parameter_count():
    model, _, names = _pathway()
    _lambdas(model)
    base = _model(0)
    merged, layers = merge_state_dict(model.state_dict())
    assert layers == sorted(names)
    fresh = _model(5)
    fresh.load_state_dict(merged, strict=True)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(fresh) == n(base) < n(model)
    with torch.no_grad():
        want = model(TOKENS)
        assert not torch.allclose(want, base(TOKENS), atol=1e-3)  # lambda != 0 changes the model
        assert torch.allclose(fresh(TOKENS), want, atol=1e-5, rtol=0)
        assert merge_modules(model) == len(names) and not any(isinstance(m, PathwayLinear) for m in model.modules())
        assert torch.allclose(model(TOKENS), want, atol=1e-5, rtol=0)


def test_mismatched_layers_are_named_with_both_shapes():
    base = _model(0)
    with pytest.raises(ConfigError, match=r"blocks\.1\.layers\.0\.attn\.qkv: weight shape \(96, 32\) in this "
                                          r"model, \(144, 48\) in the auxiliary model"):
        attach_pathway(base, PATHWAY_LAYERS[:6], (), _model(1, width=(32, 48)), True)
    assert not any(isinstance(m, PathwayLinear) for m in base.modules())  # nothing replaced on failure
    torch.manual_seed(1)
    shallow = build_model({"stages": [{"length": 4, "width": 32, "layers": 1, "block": M2},
                                      {"length": 4, "width": 32, "layers": 2, "block": TF}]})
    with pytest.raises(ConfigError, match=r"layer blocks\.0\.layers\.1\.mixer\.in_proj is not in the auxiliary"):
        attach_pathway(base, PATHWAY_LAYERS[:6], (), shallow, True)
    with pytest.raises(ConfigError, match=r"blocks\.1\.layers\.0\.attn\.qkv: bias \(96,\) in this model, no bias"):
        attach_pathway(base, ("qkv",), (1,), _model(1, inner={**TF, "bias": False}), True)
    base.blocks[1].layers[0].attn.qkv = nn.Sequential(base.blocks[1].layers[0].attn.qkv)
    with pytest.raises(ConfigError, match=r"blocks\.1\.layers\.0\.attn\.qkv is a Sequential, not an nn.Linear"):
        attach_pathway(base, PATHWAY_LAYERS[:6], (), _model(1), True)


def test_stage_and_layer_selection():
    model = _model(0)
    assert all(n.startswith("blocks.1.") for n in pathway_targets(model, PATHWAY_LAYERS[:6], (-1,)))
    assert {n.rpartition(".")[2] for n in pathway_targets(model, ("qkv", "in_proj"), ())} == {"qkv", "in_proj"}
    with pytest.raises(ConfigError, match=r"pathway_stages=\[2\]: the model has stages 0\.\.1"):
        pathway_targets(model, PATHWAY_LAYERS[:6], (2,))
    with pytest.raises(ConfigError, match="no layer named"):
        pathway_targets(model, ("x_proj",), ())  # a Mamba-1 layer in a model without one


def test_pathway_keys_validate_in_the_config():
    with pytest.raises(ConfigError, match="pathway_layers.*qkvv"):
        load_run_config("debug_tiny", ["train.pathway_from=runs/x", "train.pathway_layers=[qkvv]"])
    with pytest.raises(ConfigError, match="used with train.pathway_from"):
        load_run_config("debug_tiny", ["train.pathway_stages=[0]"])
    with pytest.raises(ConfigError, match="used with train.pathway_from"):
        load_run_config("debug_tiny", ["train.pathway_train_aux=false"])


def test_the_pathway_config_builds_its_base_model_with_pathway_layers():
    """configs/pathway_pg19_to_clevr_png.yaml: its auxiliary run is read at train start (it need not exist to
    load the config); the base model it builds has every default layer kind the pathway wraps."""
    from test_configs import tiny_overrides

    cfg = load_run_config("pathway_pg19_to_clevr_png", tiny_overrides("pathway_pg19_to_clevr_png"))
    assert cfg.train.pathway_from.endswith("pg19_lm") and not cfg.train.init_from and cfg.train.pathway_train_aux
    pg19 = load_run_config("pg19_lm", tiny_overrides("pg19_lm"))
    model = build_model(cfg.model)
    assert to_dict(cfg.model) == to_dict(pg19.model)  # the same-named layers exist in the auxiliary model
    names = attach_pathway(model, cfg.train.pathway_layers, cfg.train.pathway_stages, build_model(pg19.model), True)
    assert {n.rpartition(".")[2] for n in names} == {"qkv", "out", "gate_up", "down", "in_proj", "out_proj"}


# ---------------------------------------------------------------------------------------------------------
# end to end: an auxiliary run, a pathway run (trained, resumed, frozen aux), merge, eval, generate

SHORT = {"steps": 8, "log_every": 2, "eval_every": 4, "ckpt_every": 4, "warmup": 2, "keep_last": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pathway")
    aux_cfg = write_config(tmp, "aux", train={**SHORT, "steps": 4}, seed=7)
    assert main(["train", str(aux_cfg), "--quiet"]) == 0
    aux = tmp / "runs/aux"
    assert main(["train", str(write_config(tmp, "pw", train={**SHORT, "pathway_from": str(aux)})), "--quiet"]) == 0
    return tmp, aux, tmp / "runs/pw"


def test_a_pathway_run_records_its_source_and_trains_lambda(runs):
    tmp, aux, pw = runs
    aux_state = json.loads((aux / "checkpoints/step_000004/state.json").read_text())
    first = read_provenance(pw)[0]["pathway_from"]
    assert first["source"] == str(aux) and first["step"] == 4 and first["run"] == "aux"
    assert first["weights_sha256"] == aux_state["files"]["model.safetensors"] and first["train_aux"] is True
    assert json.loads((pw / "checkpoints/step_000008/state.json").read_text())["provenance"]["pathway_from"] == first
    w = load_file(str(pw / "checkpoints/step_000008/model.safetensors"))
    lams = {k: v for k, v in w.items() if k.endswith(".pathway_lambda")}
    assert len(lams) == first["layers"] == 8 and all(v.item() != 0 for v in lams.values())  # 2 stages x 1 layer x 4
    a = load_file(str(aux / "checkpoints/step_000004/model.safetensors"))
    assert any(not torch.equal(w[k.replace("pathway_lambda", "aux_weight")], a[k.replace("pathway_lambda", "weight")])
               for k in lams)  # W' trained
    log_text = (pw / "train.log").read_text()
    assert "pathway from" in log_text and "auxiliary parameters (trained)" in log_text


def test_frozen_aux_weights_stay_the_auxiliary_runs(runs):
    tmp, aux, _ = runs
    cfg = write_config(tmp, "frozen", train={**SHORT, "steps": 4, "pathway_from": str(aux),
                                             "pathway_train_aux": False, "pathway_stages": [1]})
    assert main(["train", str(cfg), "--quiet"]) == 0
    w = load_file(str(tmp / "runs/frozen/checkpoints/step_000004/model.safetensors"))
    a = load_file(str(aux / "checkpoints/step_000004/model.safetensors"))
    aux_keys = [k for k in w if k.endswith((".aux_weight", ".aux_bias"))]
    assert aux_keys and all(k.startswith("blocks.1.") for k in aux_keys)
    assert all(torch.equal(w[k], a[k.replace(".aux_", ".")]) for k in aux_keys)


def test_a_pathway_run_resumes_exactly_without_its_auxiliary_run(runs, tmp_path):
    """Cut the run back to its step-4 checkpoint, move the auxiliary run away, resume: the step-8 weights and
    optimizer state are the uninterrupted run's, bit for bit."""
    tmp, aux, pw = runs
    cut = tmp_path / "runs/pw"
    shutil.copytree(pw, cut)
    shutil.rmtree(cut / "checkpoints/step_000008")
    (cut / "checkpoints/latest").write_text("step_000004\n")
    moved = tmp_path / "aux_moved"
    shutil.move(str(aux), moved)
    try:
        cfg = write_config(tmp_path, "pw", train={**SHORT, "pathway_from": str(aux)})
        assert main(["train", str(cfg), "--quiet"]) == 0
    finally:
        shutil.move(str(moved), aux)
    resumed = read_provenance(cut)[-1]  # the resuming process records the source the run started with
    assert resumed["resume_from"].endswith("step_000004") and resumed["pathway_from"] == read_provenance(pw)[0][
        "pathway_from"]
    got = load_file(str(cut / "checkpoints/step_000008/model.safetensors"))
    want = load_file(str(pw / "checkpoints/step_000008/model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    o1 = torch.load(cut / "checkpoints/step_000008/optimizer.pt", weights_only=True)["optimizer"]["state"]
    o2 = torch.load(pw / "checkpoints/step_000008/optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert o1.keys() == o2.keys() and all(torch.equal(o1[i]["exp_avg"], o2[i]["exp_avg"]) for i in o2)


def test_merge_writes_a_run_with_the_pathway_logits_that_evaluates_and_generates(runs, capsys):
    from omnibyte.registry import MODELS
    from omnibyte.run import load_run

    tmp, aux, pw = runs
    assert main(["merge", str(pw), "--checkpoint", "latest"]) == 0
    out = tmp / "runs/pw_merged"
    assert "merged 8 pathway layers" in capsys.readouterr().out
    merged = load_run(out)
    assert merged.step == 8 and merged.which == "latest" and not merged.config.train.pathway_from
    assert merged.state["merged_from"]["run"] == str(pw) and merged.state["merged_from"]["pathway_from"]["step"] == 4
    assert "merged by `omnibyte merge` from pathway run" in merged.config.notes
    # the pathway model, rebuilt as training rebuilds it, and loaded strictly from its checkpoint
    cfg = load_run(pw).config
    pathway = MODELS.build(cfg.model)
    n_base = sum(p.numel() for p in pathway.parameters())
    attach_pathway(pathway, cfg.train.pathway_layers, cfg.train.pathway_stages, None, True)
    pathway.load_state_dict(load_file(str(pw / "checkpoints/step_000008/model.safetensors")), strict=True)
    pathway.eval()
    assert sum(p.numel() for p in merged.model.parameters()) == n_base < sum(p.numel() for p in pathway.parameters())
    with torch.no_grad():
        want = pathway(TOKENS)
        assert torch.allclose(merged.model(TOKENS), want, atol=1e-5, rtol=0)
        assert torch.allclose(load_run(pw, "latest").model(TOKENS), want, atol=1e-5, rtol=0)  # merged on load
    prompt = b"the cat "
    gen = merged.model.generate(prompt, max_new_bytes=12, temperature=0.0)
    assert len(gen) and torch.equal(torch.as_tensor(gen), torch.as_tensor(
        load_run(pw, "latest").model.generate(prompt, max_new_bytes=12, temperature=0.0)))
    assert torch.equal(torch.as_tensor(gen), torch.as_tensor(  # the unmerged pathway model's cached decoding
        pathway.generate(prompt, max_new_bytes=12, temperature=0.0)))
    assert main(["eval", str(out), "--quiet"]) == 0
    assert json.loads((out / "eval/validation_8.json").read_text())["bpb"] > 0
    assert main(["merge", str(pw)]) == 2  # the output exists: never overwritten
    assert "exists and is not empty" in capsys.readouterr().err
    # the merged run is weights only: training on from it is refused, a new run starts from it with init_from
    assert main(["train", str(out), "train.steps=10", "--quiet"]) == 2
    assert "written by `omnibyte merge`" in capsys.readouterr().err


def test_export_of_a_pathway_run_is_merged_and_loads_strictly_into_the_base_model(runs, tmp_path):
    """export used to copy the raw checkpoint: base W under the weight keys plus aux / lambda tensors, which a
    non-strict load into the base model silently turned into the untrained-pathway base model."""
    from omnibyte.registry import MODELS
    from omnibyte.run import load_run

    _, _, pw = runs
    out = tmp_path / "pw.safetensors"
    assert main(["export", str(pw), "--checkpoint", "latest", "--out", str(out)]) == 0
    weights = load_file(str(out))
    assert not any(k.rpartition(".")[2] in ("aux_weight", "aux_bias", "pathway_lambda") for k in weights)
    base = MODELS.build(load_run(pw).config.model)
    base.load_state_dict(weights, strict=True)
    base.eval()
    with torch.no_grad():
        assert torch.allclose(base(TOKENS), load_run(pw, "latest").model(TOKENS), atol=1e-5, rtol=0)


def test_init_from_a_pathway_run_takes_its_merged_weights(runs):
    tmp, _, pw = runs
    frozen = {"steps": 1, "inject_nan_at": [1], "warmup": 0, "eval_every": 0, "ckpt_every": 0,  # step skipped
              "init_from": str(pw / "checkpoints/step_000008")}
    assert main(["train", str(write_config(tmp, "from_pw", train=frozen)), "--quiet"]) == 0
    got = load_file(str(tmp / "runs/from_pw/checkpoints/step_000001/model.safetensors"))
    want, _ = merge_state_dict(load_file(str(pw / "checkpoints/step_000008/model.safetensors")))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_merge_refuses_a_run_without_pathway(runs, capsys):
    _, aux, _ = runs
    assert main(["merge", str(aux)]) == 2
    assert "not a Multimodal Pathway checkpoint" in capsys.readouterr().err


def test_a_missing_auxiliary_run_is_refused_before_anything_is_written(tmp_path, capsys):
    cfg = write_config(tmp_path, "orphan", train={**SHORT, "pathway_from": str(tmp_path / "nowhere")})
    assert main(["train", str(cfg), "--quiet"]) == 2
    assert "train.pathway_from=" in capsys.readouterr().err
    assert not (tmp_path / "runs/orphan/config.resolved.yaml").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("outer", [dict(M2, name="mamba2"), M1], ids=["mamba2-kernels", "mamba1-cuda-scan"])
def test_kernel_paths_use_the_pathway_weight(outer):
    """On CUDA the Mamba stages run mamba-ssm's kernels (the fused Mamba-2 path reads out_proj.weight; the Mamba-1
    scan reads dt_proj.weight): the pathway model must equal its merge there too."""
    layers = PATHWAY_LAYERS if outer is M1 else PATHWAY_LAYERS[:6]
    model, _, _ = _pathway(outer=outer, layers=layers)
    _lambdas(model)
    model = model.cuda()
    merged = _model(5, outer=outer).cuda()
    merged.load_state_dict(merge_state_dict(model.state_dict())[0], strict=True)
    x = TOKENS.cuda()
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), atol=1e-4, rtol=1e-4)
