"""Fault injection: corrupt checkpoints, a second writer, a full disk, a foreign ``latest`` pointer. Each ends
with no trained step lost and one clear message (never a raw traceback, never torch's weights_only advice)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_run import write_config

from omnibyte.cli import main
from omnibyte.logging import read_metrics


@pytest.fixture
def two_ckpts(tmp_path):
    cfg = write_config(tmp_path, train={"steps": 20, "eval_every": 10, "ckpt_every": 10})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    return cfg, run, run / "checkpoints" / "step_000020", run / "checkpoints" / "step_000010"


def _truncate(path, keep=100):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _flip(path, at=None):
    data = bytearray(path.read_bytes())
    i = len(data) - 17 if at is None else at  # inside the tensor data, past the safetensors header
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / "model.safetensors"),
    "a byte flipped in the weights": lambda c: _flip(c / "model.safetensors"),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "garbage rng": lambda c: (c / "rng.pt").write_bytes(b"not a torch file at all" * 10),
    "damaged state.json": lambda c: (c / "state.json").write_text('{"step": 20, "config": {'),
    "missing weights": lambda c: (c / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(two_ckpts, damage, caplog, capsys):
    cfg, run, newest, previous = two_ckpts
    DAMAGE[damage](newest)
    from omnibyte.run import load_run

    loaded = load_run(run, "latest")
    assert loaded.step == 10  # eval of the default checkpoint falls back, with a warning naming the problem
    assert any("skipping checkpoint step_000020" in r.getMessage() for r in caplog.records)
    # resume falls back too and trains the lost steps again
    assert main(["train", str(cfg), "--quiet"]) == 0
    steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert steps[-1] == 20
    # an explicit request for the damaged checkpoint is one clear error
    capsys.readouterr()
    shutil.rmtree(run / "checkpoints" / "step_000020")
    shutil.copytree(previous, run / "checkpoints" / "step_000020")  # (a fresh copy to damage again)
    import json

    state = json.loads((run / "checkpoints/step_000020/state.json").read_text())
    state["step"] = 20
    (run / "checkpoints/step_000020/state.json").write_text(json.dumps(state))
    DAMAGE[damage](run / "checkpoints/step_000020")
    rc = main(["eval", str(run), "--checkpoint", "20", "eval.per_token=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "step_000020" in err and "Traceback" not in err and "weights_only=False" not in err


def test_a_flipped_byte_is_caught_by_its_checksum(two_ckpts):
    _, run, newest, _ = two_ckpts
    _flip(newest / "model.safetensors")
    from omnibyte.checkpoint import CheckpointError, verify_checkpoint

    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        verify_checkpoint(newest)


def test_latest_may_only_point_inside_its_run(two_ckpts, tmp_path, caplog):
    _, run, newest, _ = two_ckpts
    other = tmp_path / "elsewhere" / "step_000999"
    shutil.copytree(newest, other)
    (run / "checkpoints" / "latest").write_text(str(other) + "\n")
    from omnibyte.checkpoint import latest_checkpoint

    assert latest_checkpoint(run / "checkpoints") == newest
    assert any("not a checkpoint name of this run" in r.getMessage() for r in caplog.records)


def test_a_second_writer_refuses_naming_the_holder(two_ckpts, capsys):
    cfg, run, _, _ = two_ckpts
    from omnibyte.lock import RunLock

    before = (run / "metrics.jsonl").read_bytes()
    with RunLock(run):
        capsys.readouterr()
        assert main(["train", str(cfg), "train.steps=30", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "one writer per run directory" in err
    assert (run / "metrics.jsonl").read_bytes() == before
    # the lock of a dead holder is taken over
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from omnibyte.lock import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert main(["train", str(cfg), "train.steps=30", "--quiet"]) == 0


def test_a_full_disk_during_a_checkpoint_write_says_so_and_loses_nothing(two_ckpts, monkeypatch, capsys):
    cfg, run, newest, _ = two_ckpts
    import torch

    real_save = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert main(["train", str(cfg), "train.steps=30", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "Traceback" not in err
    monkeypatch.setattr(torch, "save", real_save)
    from omnibyte.checkpoint import latest_checkpoint

    assert latest_checkpoint(run / "checkpoints", verify=True) == newest  # the previous checkpoint is whole
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert main(["train", str(cfg), "train.steps=30", "--quiet"]) == 0


def test_torchs_unexpected_pos_error_on_a_full_disk_is_translated(tmp_path, monkeypatch):
    from omnibyte import checkpoint as C

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    err = C._space_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), tmp_path)
    assert isinstance(err, C.CheckpointError) and "no space left on device" in str(err)
    # other errors on a nearly full disk stay themselves (they used to be reported as a full disk)
    assert C._space_error(RuntimeError("CUDA error: an illegal memory access"), tmp_path) is None
    assert C._space_error(OSError(errno.EACCES, "Permission denied"), tmp_path) is None


@pytest.mark.slow
def test_a_real_full_disk(tmp_path, capsys):
    """On a 1.5 MB tmpfs (where the machine lets the test mount one) the second checkpoint cannot be written."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC test covers the path")
    try:
        cfg = write_config(tmp_path, train={"steps": 30, "eval_every": 10, "ckpt_every": 10})
        text = cfg.read_text().replace(str(tmp_path / "runs"), str(mnt / "runs"))
        cfg.write_text(text)
        capsys.readouterr()
        rc = main(["train", str(cfg), "--quiet"])
        err = capsys.readouterr().err
        run = mnt / "runs" / "tiny"
        from omnibyte.checkpoint import latest_checkpoint

        assert rc == 2, err[-2000:]
        assert "no space left on device while writing" in err and "Traceback" not in err
        intact = latest_checkpoint(run / "checkpoints", verify=True)
        assert intact is not None and intact.name in ("step_000010", "step_000020")
    finally:
        import gc

        gc.collect()  # drop file handles of the failed run before unmounting
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --- bad evaluation data: refused before step 1, never after training -----------------------------------------

CLEVR_MINI = Path(__file__).parent / "fixtures" / "clevr_mini"
CLEVR_TINY = ["serializer.image.size=[16,12]", "model.stages.0.length=128", "data.seq_len=1024",
              "train.steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.progress=false", "preset=full",
              "eval.report=false", "data.batch_size=2"] + [
    f"model.stages.{i}.{k}={v}" for i in (0, 1) for k, v in (("width", 16), ("layers", 1))] + [
    "model.stages.0.block.headdim=16", "model.stages.0.block.d_state=8", "model.stages.1.block.heads=2"]


def _clevr_with_bad_val(tmp_path, which: tuple[str, ...]) -> Path:
    import shutil

    root = tmp_path / "clevr"
    shutil.copytree(CLEVR_MINI, root)
    for name in which:  # cut each named val image in half: a truncated PNG
        img = root / "images" / "val" / name
        img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    return root


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_bad_val_data_is_refused_before_step_1(tmp_path, capsys, policy):
    """A bad val sample (fail policy), or a val split emptied by on_bad_sample=skip, used to surface only at the
    first evaluation, after training; now the run refuses before step 1 and writes no checkpoint."""
    bad = ("CLEVR_val_000000.png",) if policy == "fail" else ("CLEVR_val_000000.png", "CLEVR_val_000001.png")
    root = _clevr_with_bad_val(tmp_path, bad)
    runs = tmp_path / "runs"
    rc = main(["train", "clevr_vqa_png", f"task.root={root}", f"task.on_bad_sample={policy}", *CLEVR_TINY,
               f"out_dir={runs}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert ("val/0" in err and "truncated PNG" in err) if policy == "fail" else ("no rows" in err and "val" in err), err[-2000:]
    run = runs / "clevr_vqa_png"
    assert not list((run / "checkpoints").glob("step_*")) and not (run / "metrics.jsonl").exists()


# --- real processes: kill -9 inside checkpoint writes, a second `omnibyte train` ------------------------------


def _train_proc(cfg, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "omnibyte", "train", str(cfg), "--quiet", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _train_losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["split"] == "train"}


@pytest.mark.slow
def test_kill_9_inside_checkpoint_writes_then_resume_follows_the_uninterrupted_curve(tmp_path):
    """The process is killed (SIGKILL) while a checkpoint's temporary folder exists, three times; each resume
    starts from the last complete checkpoint and the finished curve equals an uninterrupted run's, step for
    step. (The in-process test of an interrupted write uses an exception; this one kills the process.)"""
    import signal
    import time

    steps = 30
    train = {"steps": steps, "log_every": 1, "ckpt_every": 1, "eval_every": 0, "keep_last": 2}
    data = {"workers": 0}
    ref_cfg = write_config(tmp_path, "ref", train=train, data=data)
    assert main(["train", str(ref_cfg), "--quiet"]) == 0
    ref = _train_losses(tmp_path / "runs" / "ref")

    cfg = write_config(tmp_path, "killed", train=train, data=data)
    ckdir = tmp_path / "runs" / "killed" / "checkpoints"
    kills = 0
    while kills < 3:
        proc = _train_proc(cfg)
        deadline, caught = time.time() + 60, False
        while time.time() < deadline and proc.poll() is None:
            if ckdir.is_dir() and any(e.name.startswith(".tmp-") for e in os.scandir(ckdir)):
                caught = True
                break
        if not caught:  # the run ended (or never wrote) before a write could be caught
            proc.kill()
            proc.wait()
            pytest.fail("no checkpoint write caught in flight: " + proc.stderr.read().decode()[-2000:])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert max(_train_losses(tmp_path / "runs" / "killed")) < steps  # the kills came before the end
    assert main(["train", str(cfg), "--quiet"]) == 0
    assert _train_losses(tmp_path / "runs" / "killed") == ref
    assert not list(ckdir.glob(".tmp-*"))  # the dead writers' temporary folders are gone


@pytest.mark.slow
def test_a_second_train_process_on_a_running_run_refuses(tmp_path, capsys):
    """Two `omnibyte train` processes on one run directory: the second refuses at once, naming the first's
    pid; the first finishes its run untouched."""
    import time

    cfg = write_config(tmp_path, train={"steps": 400, "eval_every": 0, "ckpt_every": 100, "log_every": 10})
    run = tmp_path / "runs" / "tiny"
    first = _train_proc(cfg)
    deadline = time.time() + 60
    while time.time() < deadline and not _train_losses(run) and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read().decode()[-2000:]
    capsys.readouterr()
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"pid {first.pid}" in err and "Traceback" not in err
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    assert max(_train_losses(run)) == 400


def test_resuming_under_another_world_size_refuses_and_says_what_to_do(two_ckpts):
    """A checkpoint of a 1-process run resumed by 2 processes (each owns a fixed slice of the data stream):
    a clear refusal naming both counts and the way on (a new run with train.init_from), nothing loaded."""
    from omnibyte.checkpointer import Checkpointer, ResumeError
    from omnibyte.model import build_model
    from omnibyte.parallel import DistInfo

    _, run, newest, _ = two_ckpts
    model = build_model({"stages": [{"length": 8, "width": 16, "layers": 1}]})
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver = Checkpointer(run / "checkpoints", DistInfo(rank=0, world=2), model, opt, sched, keep_last=2)
    with pytest.raises(ResumeError, match=r"written by 1 process\(es\); this run has 2.*train.init_from="):
        saver.restore(newest)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
