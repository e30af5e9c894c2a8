"""A run's lifecycle: identity of a run directory, loading a trained run from its checkpoint's own config,
checkpoint selection, provenance, metrics records, save-before-eval, early stopping."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_train_run import write_config

from omnibyte.cli import main
from omnibyte.logging import read_metrics


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("life")
    cfg = write_config(tmp, train={"steps": 20, "eval_every": 10, "ckpt_every": 10})
    assert main(["train", str(cfg), "--quiet"]) == 0
    return tmp, cfg, tmp / "runs" / "tiny"


def _snapshot(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "events" not in p.parts and p.name not in ("train.log", "provenance.jsonl", ".lock")}


def test_changed_rerun_refuses_lists_the_keys_and_keeps_the_record(finished, capsys):
    tmp, cfg, run = finished
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", str(cfg), "train.lr=1e-2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "0.003" in err and "0.01" in err and "run_name=tiny-2" in err
    assert "Traceback" not in err
    assert main(["train", str(cfg), "model.stages.0.layers=3", "--quiet"]) == 2
    assert "model.stages.0.layers" in capsys.readouterr().err
    assert _snapshot(run) == before  # the record (config.resolved.yaml), checkpoints and metrics untouched
    # the finished run still evaluates
    assert main(["eval", str(run), "eval.per_token=false", "--quiet"]) == 0


def test_same_config_on_a_finished_run_says_so_and_exits_0(finished, capsys):
    tmp, cfg, run = finished
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 0
    assert "is finished" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_keys_that_may_change_resume_the_run(tmp_path):
    cfg = write_config(tmp_path, train={"steps": 10, "eval_every": 10, "ckpt_every": 10})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    record = (run / "config.resolved.yaml").read_bytes()
    assert main(["train", str(cfg), "train.steps=20", "train.log_every=2", "--quiet"]) == 0
    assert max(r["step"] for r in read_metrics(run)) == 20
    assert (run / "config.resolved.yaml").read_bytes() == record  # written once, when the run was created
    from omnibyte.checkpoint import latest_checkpoint, read_state

    assert read_state(latest_checkpoint(run / "checkpoints"))["config"]["train"]["steps"] == 20


def test_a_run_begun_under_an_older_omnibyte_resumes_after_an_upgrade(tmp_path):
    """Options added since a run began are absent from its record: they count as their defaults (an upgrade must
    not make every run refuse to resume), but setting one away from its default is still a different run."""
    import dataclasses

    from omnibyte.config import from_dict, to_dict
    from omnibyte.identity import RunIdentityError, check_rerun
    from omnibyte.runconfig import RunConfig, load_run_config

    cfg = load_run_config("debug_tiny", [f"out_dir={tmp_path}"])
    old = to_dict(cfg)
    for key in ("warm_shapes", "pathway_from", "pathway_layers", "pathway_train_aux"):
        del old["train"][key]  # the record of a run started before these options existed
    for stage in old["model"]["stages"]:
        stage["block"].pop("modality_experts", None)
    old = from_dict(RunConfig, old)  # as open_run_dir reads a record
    check_rerun(old, cfg, tmp_path)  # the defaults: the same run
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pathway_from="runs/pg19_lm"))
    with pytest.raises(RunIdentityError, match="train.pathway_from"):
        check_rerun(old, changed, tmp_path)
    # a performance switch may change on resume
    check_rerun(old, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warm_shapes=True)), tmp_path)


def test_eval_reads_the_checkpoints_own_config_not_the_editable_file(finished):
    tmp, cfg, run = finished
    path = run / "config.resolved.yaml"
    original = path.read_text()
    try:
        data = yaml.safe_load(original)
        data["model"]["stages"][0]["width"] = 8  # a hand edit (or a rewrite by an old omnibyte)
        path.write_text(yaml.safe_dump(data))
        from omnibyte.run import load_run

        loaded = load_run(run, "latest")
        assert loaded.config.model.stages[0].width == 48
        assert main(["eval", str(run), "eval.per_token=false", "--quiet"]) == 0
    finally:
        path.write_text(original)


def test_eval_refuses_overrides_that_change_the_model(finished, capsys):
    _, _, run = finished
    capsys.readouterr()
    assert main(["eval", str(run), "model.stages.0.width=8"]) == 2
    assert "cannot override model.stages.0.width" in capsys.readouterr().err


def test_checkpoint_selection_best_latest_step(finished):
    _, _, run = finished
    from omnibyte.run import find_checkpoint, load_run

    best = json.loads((run / "checkpoints" / "best.json").read_text())
    path, which = find_checkpoint(run)
    assert which == "best" and path.name == f"step_{best['step']:06d}"
    assert find_checkpoint(run, "latest")[0].name == "step_000020"
    assert find_checkpoint(run, 10)[0].name == "step_000010"
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        find_checkpoint(run, 7)
    loaded = load_run(run, "10")
    assert loaded.step == 10 and loaded.which == "step 10"
    res = main(["eval", str(run), "--checkpoint", "10", "eval.per_token=false", "--quiet"])
    assert res == 0 and (run / "eval" / "validation_10.json").is_file()


def test_provenance_and_metrics_records(finished):
    _, _, run = finished
    from omnibyte.checkpoint import latest_checkpoint, read_state
    from omnibyte.provenance import read

    prov = read(run)
    assert prov and prov[0]["git"]["commit"] and prov[0]["argv"] and prov[0]["packages"]["torch"]
    assert prov[0]["world_size"] == 1 and prov[0]["host"] and prov[0]["python"]
    state = read_state(latest_checkpoint(run / "checkpoints"))
    assert state["provenance"]["git"] == prov[0]["git"]
    assert set(state["files"]) >= {"model.safetensors", "optimizer.pt", "rng.pt"}
    recs = read_metrics(run)
    assert all("time" in r and "bytes_seen" in r for r in recs)
    train = [r for r in recs if r["split"] == "train"]
    seen = [r["bytes_seen"] for r in train]
    assert seen == sorted(seen) and seen[0] > 0
    # rows of 64 tokens, 8 rows a step, 5 steps per log line (concat packing: full rows)
    assert seen[0] == 5 * 8 * 64 and seen[-1] == 20 * 8 * 64
    ev = [r for r in recs if r["split"] == "validation"]
    assert [r["bytes_seen"] for r in ev] == [10 * 8 * 64, 20 * 8 * 64]


def test_tensorboard_gets_the_hparams(finished):
    _, _, run = finished
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "events"))
    acc.Reload()
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins
    start = plugins["_hparams_/session_start_info"]
    assert b"train.lr" in start and b"model.stages.0.width" in start


def test_eval_failure_never_loses_trained_steps(tmp_path, monkeypatch):
    """The checkpoint of a step is written before its evaluation; a failing evaluation leaves it on disk and
    the resumed run runs the evaluation it missed."""
    import omnibyte.train as T

    cfg = write_config(tmp_path, train={"steps": 10, "eval_every": 10, "ckpt_every": 0})
    real = T.evaluate_bpb

    def boom(*a, **k):
        raise RuntimeError("eval exploded")

    monkeypatch.setattr(T, "evaluate_bpb", boom)
    with pytest.raises(RuntimeError, match="eval exploded"):
        main(["train", str(cfg), "--quiet"])
    run = tmp_path / "runs" / "tiny"
    from omnibyte.checkpoint import latest_checkpoint, read_state

    state = read_state(latest_checkpoint(run / "checkpoints"))
    assert state["step"] == 10 and state["eval_due"] is True
    monkeypatch.setattr(T, "evaluate_bpb", real)
    assert main(["train", str(cfg), "train.steps=10", "--quiet"]) == 0  # finished, but its eval was due
    assert any(r["split"] == "validation" and r["step"] == 10 for r in read_metrics(run))
    assert (run / "checkpoints" / "best.json").is_file()


def test_early_stopping_with_patience(tmp_path):
    # every step after 5 is skipped (non-finite): the weights stop changing, so no evaluation improves
    cfg = write_config(tmp_path, train={"steps": 200, "eval_every": 5, "ckpt_every": 0, "patience": 2, "log_every": 5,
                                        "inject_nan_at": list(range(6, 201)), "max_bad_steps": 1000})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    evals = [r["step"] for r in read_metrics(run) if r["split"] == "validation"]
    assert evals == [5, 10, 15]
    assert json.loads((run / "checkpoints" / "best.json").read_text())["step"] == 5


@pytest.mark.slow  # several short trainings: the README command's 2-minute budget (CI runs -m slow too)
def test_a_non_finite_evaluation_never_becomes_the_best(tmp_path, monkeypatch, caplog):
    """A NaN first evaluation (e.g. a bf16 overflow) was stored as the best, and every finite one after it
    compared False against NaN: the run kept pointing `best` at its NaN step."""
    import omnibyte.train as T

    real, calls = T.evaluate_bpb, []

    def first_is_nan(*a, **k):
        r = real(*a, **k)
        calls.append(1)
        return {**r, "bpb": float("nan")} if len(calls) == 1 else r

    monkeypatch.setattr(T, "evaluate_bpb", first_is_nan)
    cfg = write_config(tmp_path, train={"steps": 15, "eval_every": 5, "ckpt_every": 5, "keep_last": 5})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    evals = {r["step"]: r["bpb"] for r in read_metrics(run) if r["split"] == "validation"}
    assert list(evals) == [5, 10, 15] and evals[5] is None  # the NaN is recorded (as null)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["step"] == min((10, 15), key=evals.get) and best["value"] == evals[best["step"]]
    assert "not a candidate for the best checkpoint" in caplog.text


def test_resume_never_on_an_existing_run_refuses(finished, capsys):
    _, cfg, run = finished
    capsys.readouterr()
    assert main(["train", str(cfg), "train.resume=never"]) == 2
    assert "never overwritten" in capsys.readouterr().err


def test_opening_a_run_directory_imports_no_code(finished, tmp_path, monkeypatch, capsys):
    """A shared run directory whose config names `plugins: [evilplug]`, with an evilplug.py importable beside
    it: eval, generate and train refuse without --trust-plugins, and the module never runs. (In-process, with
    the plugin's folder on sys.path as `python -m omnibyte` run from there would have it.)"""
    import shutil
    import sys

    _, _, src = finished
    run = tmp_path / "shared_run"
    shutil.copytree(src, run)
    for state in run.glob("checkpoints/step_*/state.json"):
        data = json.loads(state.read_text())
        data["config"]["plugins"] = ["evilplug"]
        state.write_text(json.dumps(data))
    rec = yaml.safe_load((run / "config.resolved.yaml").read_text())
    rec["plugins"] = ["evilplug"]
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(rec))
    marker = tmp_path / "pwned"
    (tmp_path / "evilplug.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "evilplug", raising=False)
    for argv in (["eval", str(run), "eval.per_token=false"], ["generate", str(run), "--max-new-bytes", "2"],
                 ["train", str(run)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "--trust-plugins" in err and "evilplug" in err and "Traceback" not in err
        assert not marker.exists(), argv
    assert main(["eval", str(run), "eval.per_token=false", "--quiet", "--trust-plugins"]) == 0
    assert marker.read_text() == "ran"  # asked for: imported


def test_chosen_buckets_are_recorded_and_a_rerun_matches_them(tmp_path):
    cfg = write_config(tmp_path, data={"packing": "pad", "pad_to": "buckets", "seq_len": 64, "overlong": "crop"},
                       train={"steps": 4, "eval_every": 4, "ckpt_every": 4})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    rec = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert rec["data"]["buckets"] and all(b % 4 == 0 and b <= 64 for b in rec["data"]["buckets"])
    assert main(["train", str(cfg), "train.steps=6", "--quiet"]) == 0  # same YAML (buckets: []) resumes


def test_shape_warm_up_leaves_the_loss_curve_and_weights_unchanged(tmp_path):
    """train.warm_shapes=true runs forward + backward at every bucket before step 1 (kernel autotuning up front);
    it must leave no trace: same losses at every logged step, same final weights."""
    from safetensors.torch import load_file

    from omnibyte.warmup import warm_lengths

    data = {"packing": "pad", "pad_to": "buckets", "seq_len": 64, "overlong": "crop"}
    runs = {}
    for warm in (False, True):
        (tmp_path / str(warm)).mkdir()
        cfg = write_config(tmp_path / str(warm), data=data,
                           train={"steps": 6, "log_every": 1, "eval_every": 6, "ckpt_every": 6,
                                  "warm_shapes": warm})
        assert main(["train", str(cfg), "--quiet"]) == 0
        runs[warm] = tmp_path / str(warm) / "runs" / "tiny"
    log = (runs[True] / "train.log").read_text()
    assert "warmed up" in log and "warmed up" not in (runs[False] / "train.log").read_text()
    curve = {w: [(r["step"], r["loss"]) for r in read_metrics(run) if r["split"] == "train"] for w, run in runs.items()}
    assert len(curve[True]) == 6 and curve[True] == curve[False]
    a, b = (load_file(str(run / "checkpoints" / "step_000006" / "model.safetensors")) for run in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # auto: only on CUDA, not with cuda_graphs (their graphs are captured when training meets each shape); no buckets, no warm-up
    buckets = (16, 32, 64)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert warm_lengths(buckets, "auto", cpu, False) == []
    assert warm_lengths(buckets, "auto", cuda, False) == [64, 32, 16]
    assert warm_lengths(buckets, "auto", cuda, True) == []
    assert warm_lengths(buckets, True, cpu, True) == [64, 32, 16]
    assert warm_lengths((), True, cuda, False) == []  # pad_to seq_len / longest: resolve_buckets() is ()


def test_no_shape_warm_up_for_a_classifier_whose_loss_needs_real_samples():
    """The CNN+LSTM's loss reads each sample's answer: a dummy batch cannot stand for it (it is skipped, not run)."""
    from test_tasks_cnn_lstm import TINY as CNN

    from omnibyte.model import build_model
    from omnibyte.warmup import warm_shapes

    model = build_model({**CNN, "answers": ["yes", "no"]})
    called = []
    assert warm_shapes(lambda batch: called.append(batch), model, [64, 32], 2, torch.device("cpu"), False) == 0.0
    assert not called


def test_build_model_refuses_a_run_directory_and_names_load_run(finished):
    """build_model(run_dir) used to return an untrained model in silence (it found the config by name)."""
    from omnibyte import build_model, load_run
    from omnibyte.config import ConfigError

    _, _, run = finished
    with pytest.raises(ConfigError, match="load_run"):
        build_model(str(run))
    with pytest.raises(ConfigError, match="load_run"):
        build_model(run)
    assert load_run(run, checkpoint="latest").step == 20  # the loader the message names works


def test_a_config_that_fails_at_start_up_does_not_claim_the_run_name(tmp_path, capsys):
    """A typo caught before step 1 used to leave the bad config as the run's record, and the corrected re-run
    was refused as 'another config'."""
    cfg = write_config(tmp_path, train={"steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert main(["train", str(cfg), "eval.split=validaton", "--quiet"]) == 2
    assert "validaton" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny" / "config.resolved.yaml").exists()
    assert main(["train", str(cfg), "--quiet"]) == 0


def test_a_moved_run_trains_where_it_is_and_out_dir_spelling_is_not_identity(finished, tmp_path, monkeypatch):
    """A copied run directory used to train into its old location; a relative out_dir naming the same place
    as the recorded absolute one used to be refused as a different config."""
    import shutil

    from omnibyte.checkpoint import latest_checkpoint, read_state

    src_tmp, cfg, src = finished
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(src, moved, ignore=shutil.ignore_patterns(".lock"))
    before = sorted(p.name for p in (src / "checkpoints").iterdir())
    assert main(["train", str(moved), "train.steps=22", "train.ckpt_every=2", "--quiet"]) == 0
    assert read_state(latest_checkpoint(moved / "checkpoints"))["step"] == 22
    assert sorted(p.name for p in (src / "checkpoints").iterdir()) == before  # the original is untouched
    monkeypatch.chdir(src_tmp)  # the same run, its out_dir spelt relatively
    assert main(["train", str(cfg), "out_dir=runs", "--quiet"]) == 0


def test_export_writes_the_chosen_checkpoints_weights(finished, tmp_path, capsys):
    from safetensors import safe_open

    from omnibyte.checkpoint import load_weights, resolve_checkpoint

    _, _, run = finished
    assert main(["export", str(run), "--checkpoint", "10"]) == 0
    out = run / "export" / "step_000010.safetensors"
    assert str(out) in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["step"] == "10"
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    want = load_weights(resolve_checkpoint(run / "checkpoints" / "step_000010"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert main(["export", str(run), "--checkpoint", "7"]) == 2  # no such step: one clear error
    # another checkpoint's export is not written over the one there (it was, in silence); the same one's is
    capsys.readouterr()
    assert main(["export", str(run), "--checkpoint", "latest", "--out", str(out)]) == 2
    assert "holds the export of" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["step"] == "10"
    assert main(["export", str(run), "--checkpoint", "10", "--out", str(out)]) == 0


def test_an_export_carries_its_config_and_rebuilds_alone(finished, tmp_path):
    """An exported file held weights, step and contract only: nothing said which model they were, so it could not
    be rebuilt or checked. Its metadata now holds the run config; load_export builds the model from the file."""
    from safetensors.torch import save_file

    from omnibyte.config import ConfigError, to_dict
    from omnibyte.export import export_weights, load_export
    from omnibyte.run import load_run

    _, _, run = finished
    out, step = export_weights(run, "10", tmp_path / "x.safetensors")
    model, cfg = load_export(out)
    ref = load_run(run, 10, device="cpu")
    assert to_dict(cfg.model) == to_dict(ref.config.model) and step == 10
    want = ref.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    x = torch.randint(0, 256, (1, 16))
    assert torch.equal(model(x), ref.model(x))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "old.safetensors"), metadata={"step": "1"})
    with pytest.raises(ConfigError, match="no run config in its metadata"):
        load_export(tmp_path / "old.safetensors")


def test_task_only_evaluation_joins_the_checkpoints_record(finished, tmp_path, monkeypatch):
    from omnibyte import data
    from omnibyte.run import evaluate_run, load_run

    _, _, run_dir = finished
    run = load_run(run_dir, "latest")
    first = evaluate_run(run, max_samples=2, per_token=True, task_metrics=False, progress=False, out_dir=tmp_path)
    record = json.loads(open(first["results_file"]).read())
    assert "bpb" in record and "per_token" in record
    monkeypatch.setattr(data, "eval_batches", lambda *a, **k: pytest.fail("bpb=False made the eval batches"))
    monkeypatch.setattr(run.task, "evaluate", lambda model, items, **kw: {"accuracy": 0.5, "n": len(list(items))})
    res = evaluate_run(run, max_samples=3, per_token=False, task_metrics=True, progress=False, out_dir=tmp_path,
                       bpb=False)
    on_disk = json.loads(open(res["results_file"]).read())
    assert record["bpb_max_samples"] == 2 and record["bpb_bf16"] is False
    # the first call's bpb and per-token file stay; each part says what it covers, and the record that they differ
    assert record["bpb_subset"] == {"rule": "spread", "seed": 0, "n": 2, "of": 16}  # which samples, recorded
    assert on_disk == {**record, "task": {"accuracy": 0.5, "n": 3}, "task_max_samples": 3, "task_bf16": False,
                       "task_subset": {"rule": "spread", "seed": 0, "n": 3, "of": 16},
                       "parts": "bits per byte and task results come from different passes: max_samples 2 (bpb) "
                                "vs 3 (task); subset spread 2 of 16 (bpb) vs spread 3 of 16 (task)"}
    assert res["results_file"] == first["results_file"]
    other = dict(record, checkpoint="elsewhere")  # a record of another checkpoint is replaced, not merged
    open(res["results_file"], "w").write(json.dumps(other))
    res = evaluate_run(run, max_samples=3, task_metrics=True, progress=False, out_dir=tmp_path, bpb=False)
    assert "bpb" not in res and "per_token" not in res and res["task"] == {"accuracy": 0.5, "n": 3}
    monkeypatch.undo()  # a later bpb-only pass (run_transfer.py eval --skip-vqa: per-token rows) keeps those results
    again = evaluate_run(run, max_samples=2, per_token=True, task_metrics=False, progress=False, out_dir=tmp_path)
    on_disk = json.loads(open(again["results_file"]).read())
    assert on_disk["task"] == {"accuracy": 0.5, "n": 3} and "bpb" in on_disk and on_disk["task_max_samples"] == 3
    assert "max_samples 2 (bpb) vs 3 (task)" in on_disk["parts"]
    same = evaluate_run(run, max_samples=3, per_token=False, task_metrics=False, progress=False, out_dir=tmp_path)
    assert "parts" not in json.loads(open(same["results_file"]).read())  # both parts over 3 samples now
    # the same checkpoint on other data (a task.root / data.path override): a bpb-only pass kept the earlier task
    # results beside bits per byte of the other data, in one record; refused before scoring, the record kept
    import dataclasses

    from omnibyte.config import ConfigError

    cfg = run.config
    moved = dataclasses.replace(run, config=dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, root="/other")))
    kept = open(same["results_file"]).read()
    with pytest.raises(ConfigError, match="results on other data"):
        evaluate_run(moved, max_samples=3, per_token=False, task_metrics=False, progress=False, out_dir=tmp_path)
    assert open(same["results_file"]).read() == kept


def test_shape_warm_up_batch_covers_every_modality():
    """A modality-aware model's warm-up routes bytes to every expert (each Modality code has a span of each row)."""
    from omnibyte.vocab import Modality
    from omnibyte.warmup import _dummy_batch

    b = _dummy_batch(2, 64, torch.device("cpu"))
    assert set(b.modality.unique().tolist()) == {int(m) for m in Modality}
    assert b.modality.shape == b.tokens.shape == (2, 64) and int(b.tokens.max()) < 256


@pytest.mark.slow  # several short trainings: the README command's 2-minute budget (CI runs -m slow too)
def test_resuming_an_earlier_checkpoint_inside_the_same_run_is_refused(tmp_path, capsys):
    """Resuming step 10 of a run that reached step 20 branched it back: pruning kept the highest steps (it
    deleted the new checkpoints), `latest` named a deleted one, and resume=auto went back to the old trajectory."""
    cfg = write_config(tmp_path, train={"steps": 20, "eval_every": 0, "ckpt_every": 5, "keep_last": 5})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    step10 = run / "checkpoints" / "step_000010"
    before = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    capsys.readouterr()
    assert main(["train", str(cfg), f"train.resume={step10}", "train.steps=12", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "would branch run tiny back" in err and "step_000015, step_000020" in err and "run_name=tiny-from10" in err
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == before  # nothing deleted
    assert main(["train", str(cfg), "run_name=tiny-from10", f"train.resume={step10}", "train.steps=12",
                 "--quiet"]) == 0  # the branch as a new run
    assert (tmp_path / "runs" / "tiny-from10" / "checkpoints" / "step_000012").is_dir()


@pytest.mark.slow  # several short trainings: the README command's 2-minute budget (CI runs -m slow too)
def test_a_branch_selects_its_best_among_its_own_checkpoints(tmp_path, monkeypatch):
    """A branch (train.resume=<another run's checkpoint>) took the source's best and re-evaluated the source's
    step: its best.json named step 10, a checkpoint only the source has, and eval fell back to the latest."""
    import omnibyte.train as T

    at = {}
    real_save = T.Checkpointer.save

    def save(self, step, **kw):
        at["step"] = step
        return real_save(self, step, **kw)

    monkeypatch.setattr(T.Checkpointer, "save", save)  # the source's step 10 is its best; the branch gets worse
    values = {5: 5.0, 10: 2.0, 15: 3.0, 20: 4.0}
    monkeypatch.setattr(T, "evaluate_bpb", lambda *a, **k: {"loss": values[at["step"]], "bpb": values[at["step"]],
                                                             "weight": 1.0})
    cfg = write_config(tmp_path, train={"steps": 10, "eval_every": 5, "ckpt_every": 5, "keep_last": 5})
    assert main(["train", str(cfg), "--quiet"]) == 0
    src = tmp_path / "runs" / "tiny" / "checkpoints"
    assert json.loads((src / "best.json").read_text())["step"] == 10
    assert main(["train", str(cfg), "run_name=tiny-from10", f"train.resume={src / 'step_000010'}",
                 "train.steps=20", "--quiet"]) == 0
    branch = tmp_path / "runs" / "tiny-from10"
    best = json.loads((branch / "checkpoints" / "best.json").read_text())
    assert best["step"] == 15 and (branch / "checkpoints" / "step_000015").is_dir()
    assert [r["step"] for r in read_metrics(branch) if r["split"] == "validation"] == [15, 20]


@pytest.mark.slow  # several short trainings: the README command's 2-minute budget (CI runs -m slow too)
def test_an_evaluation_missed_by_a_crash_stops_the_resumed_run_when_it_reaches_patience(tmp_path, monkeypatch):
    """The resumed run ran the evaluation its crash had missed and ignored that it reached train.patience: it
    trained on and its later evaluation became the best, where the uninterrupted run had stopped. A non-finite
    evaluation (logged as null) is one without improvement after a resume too, as it is in the loop."""
    import omnibyte.train as T

    at, crash = {}, {"at": None}
    real_save = T.Checkpointer.save

    def save(self, step, **kw):
        at["step"] = step
        return real_save(self, step, **kw)

    def scripted(values):
        def ev(*a, **k):
            if at["step"] == crash["at"]:
                raise RuntimeError("simulated crash during the evaluation")
            return {"loss": values[at["step"]], "bpb": values[at["step"]], "weight": 1.0}
        return ev

    monkeypatch.setattr(T.Checkpointer, "save", save)
    cfg = write_config(tmp_path, train={"steps": 12, "eval_every": 2, "ckpt_every": 0, "patience": 2,
                                        "log_every": 2, "keep_last": 10})

    def evals(name):
        return [r["step"] for r in read_metrics(tmp_path / "runs" / name) if r["split"] == "validation"]

    monkeypatch.setattr(T, "evaluate_bpb", scripted({2: 5.0, 4: 6.0, 6: 4.0, 8: 4.5, 10: 4.6, 12: 3.0}))
    assert main(["train", str(cfg), "run_name=straight", "--quiet"]) == 0
    assert evals("straight") == [2, 4, 6, 8, 10]
    crash["at"] = 10
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(cfg), "run_name=cut", "--quiet"])
    crash["at"] = None
    assert main(["train", str(cfg), "run_name=cut", "--quiet"]) == 0
    assert evals("cut") == evals("straight")
    assert json.loads((tmp_path / "runs/cut/checkpoints/best.json").read_text())["step"] == 6

    nan = {2: 5.0, 4: float("nan"), 6: 5.5, 8: 5.6, 10: 5.7, 12: 1.0}  # stops at 6: the NaN counts
    monkeypatch.setattr(T, "evaluate_bpb", scripted(nan))
    assert main(["train", str(cfg), "run_name=nan_straight", "--quiet"]) == 0
    assert evals("nan_straight") == [2, 4, 6]
    crash["at"] = 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(cfg), "run_name=nan_cut", "--quiet"])
    crash["at"] = None
    assert main(["train", str(cfg), "run_name=nan_cut", "--quiet"]) == 0
    assert evals("nan_cut") == [2, 4, 6]
    assert main(["train", str(cfg), "run_name=nan_straight", "--quiet"]) == 0  # stopped early: nothing to do
    assert evals("nan_straight") == [2, 4, 6]


def test_init_stages_without_init_from_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path, train={"steps": 2, "eval_every": 0, "ckpt_every": 0})
    assert main(["train", str(cfg), "train.init_stages=[0]", "--quiet"]) == 2
    assert "train.init_from, which is not set" in capsys.readouterr().err


def test_with_eval_split_train_a_resume_tells_evaluations_from_loss_lines():
    """The loss lines are recorded under split 'train': with eval.split=train a resume took them for evaluations
    (a missed evaluation looked done; patience recounted over loss lines)."""
    from omnibyte.startup import eval_pending, evals_since_best

    loss = [{"step": s, "split": "train", "loss": 1.0, "bpb": 9.0 - s, "lr": 1e-3} for s in (5, 10)]
    evals = [{"step": 5, "split": "train", "loss": 1.0, "bpb": 2.0}]
    assert eval_pending({"step": 10, "eval_due": True}, loss + evals, "train")  # the step-10 line is no evaluation
    assert not eval_pending({"step": 5, "eval_due": True}, loss + evals, "train")
    assert evals_since_best(loss + evals, "train", "bpb", 10) == 0  # one evaluation, the best; loss lines ignored


def test_eval_select_picks_the_best_checkpoint_by_the_named_metric(tmp_path, monkeypatch, capsys):
    """With an auxiliary loss on image bytes, their over-fitting picked the VQA checkpoint (the loss-weighted
    bpb); eval.select=bpb/<modality> selects on one modality's bits per byte instead."""
    import omnibyte.train as T

    real, calls = T.evaluate_bpb, []

    def scripted(*a, **k):  # all bytes get worse after the first eval, the text bytes better
        r = real(*a, **k)
        calls.append(1)
        return {**r, "bpb": float(len(calls)), "bpb/text": 10.0 - len(calls)}

    monkeypatch.setattr(T, "evaluate_bpb", scripted)
    cfg = write_config(tmp_path, train={"steps": 15, "eval_every": 5, "ckpt_every": 5, "keep_last": 5})
    assert main(["train", str(cfg), "eval.select=bpb/text", "--quiet"]) == 0
    best = json.loads((tmp_path / "runs" / "tiny" / "checkpoints" / "best.json").read_text())
    assert best == {"step": 15, "metric": "validation/bpb/text", "value": 7.0}
    assert main(["train", str(cfg), "run_name=plain", "--quiet"]) == 0  # default: the loss-weighted bpb
    assert json.loads((tmp_path / "runs" / "plain" / "checkpoints" / "best.json").read_text())["step"] == 5
    capsys.readouterr()
    assert main(["train", str(cfg), "run_name=answer", "eval.select=bpb/answer", "--quiet"]) != 0
    assert "eval.select=bpb/answer: the validation evaluation has no bpb/answer" in capsys.readouterr().err
    assert main(["train", str(cfg), "run_name=typo", "eval.select=loss", "--quiet"]) == 2
    assert "eval.select='loss': one of bpb, bpb/text" in capsys.readouterr().err


@pytest.mark.slow  # several short trainings: the README command's 2-minute budget (CI runs -m slow too)
def test_early_stopping_counts_the_same_across_a_resume_and_a_stopped_run_stays_stopped(tmp_path, monkeypatch):
    """A checkpoint is written before its step's evaluation: resumed from it, the run missed that evaluation in
    its patience count (it stopped at 8 instead of 10), and a re-run of an early-stopped run trained on."""
    import omnibyte.train as T
    from omnibyte import stopping

    values = {2: 5.0, 4: 6.0, 6: 4.0, 8: 4.5, 10: 4.6, 12: 4.7}
    at = {}
    real_save = T.Checkpointer.save

    def save(self, step, **kw):
        at["step"] = step
        return real_save(self, step, **kw)

    monkeypatch.setattr(T.Checkpointer, "save", save)
    monkeypatch.setattr(T, "evaluate_bpb", lambda *a, **k: {"loss": values[at["step"]], "bpb": values[at["step"]],
                                                             "weight": 1.0})
    cfg = write_config(tmp_path, train={"steps": 12, "eval_every": 2, "ckpt_every": 0, "patience": 2,
                                        "log_every": 2})

    def evals(name):
        return [r["step"] for r in read_metrics(tmp_path / "runs" / name) if r["split"] == "validation"]

    assert main(["train", str(cfg), "run_name=straight", "--quiet"]) == 0
    assert evals("straight") == [2, 4, 6, 8, 10]
    monkeypatch.setattr(stopping.StopRequests, "due", lambda self, step: "test stop" if step == 6 else None)
    assert main(["train", str(cfg), "run_name=cut", "--quiet"]) == 0
    monkeypatch.setattr(stopping.StopRequests, "due", lambda self, step: None)
    assert main(["train", str(cfg), "run_name=cut", "--quiet"]) == 0
    assert evals("cut") == evals("straight")
    assert main(["train", str(cfg), "run_name=cut", "--quiet"]) == 0  # stopped early: nothing to do
    assert evals("cut") == evals("straight")
    assert max(r["step"] for r in read_metrics(tmp_path / "runs" / "cut")) == 10


@pytest.mark.slow  # two short trainings: the README command's 2-minute budget (CI runs -m slow too)
def test_an_attempt_that_died_before_its_first_checkpoint_leaves_no_curve_in_tensorboard(tmp_path, monkeypatch):
    """Started again from step 0, the run reset metrics.jsonl but TensorBoard showed the dead attempt's points
    beside the new ones (no purge at step 0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from omnibyte import stopping

    cfg = write_config(tmp_path, train={"steps": 8, "log_every": 1, "eval_every": 0, "ckpt_every": 0})

    def crash(self, step):
        if step == 5:
            raise RuntimeError("simulated crash before the first checkpoint")

    monkeypatch.setattr(stopping.StopRequests, "due", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(cfg), "--quiet"])
    monkeypatch.setattr(stopping.StopRequests, "due", lambda self, step: None)
    assert main(["train", str(cfg), "--quiet"]) == 0
    acc = EventAccumulator(str(tmp_path / "runs" / "tiny" / "events"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))


def test_evaluations_of_the_training_split_are_a_curve_of_their_own(tmp_path):
    """With eval.split=train the evaluations and the loss lines were both split 'train': plots, TensorBoard and the
    analysis drew them as one zigzag curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from omnibyte import analysis as A
    from omnibyte.plot import plot_run

    cfg = write_config(tmp_path, train={"steps": 10, "log_every": 5, "eval_every": 5, "ckpt_every": 5})
    assert main(["train", str(cfg), "eval.split=train", "--quiet"]) == 0
    run = A.load_run(tmp_path / "runs" / "tiny")
    assert A.splits_of(run) == ["train", "train_eval"]
    (steps, loss), (esteps, eloss) = A.curve(run, "loss", "train"), A.curve(run, "loss", "train_eval")
    assert list(steps) == list(esteps) == [5, 10] and list(loss) != list(eloss)
    acc = EventAccumulator(str(run.path / "events"))
    acc.Reload()
    assert "train_eval/bpb" in acc.Tags()["scalars"] and [e.step for e in acc.Scalars("train/loss")] == [5, 10]
    assert plot_run(run.path).is_file()
