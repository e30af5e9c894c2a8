"""Fault injection: corrupt checkpoints, a second writer, a full disk, a foreign ``latest`` pointer. Each ends
with no trained step lost and one clear message (never a raw traceback, never torch's weights_only advice)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest
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
