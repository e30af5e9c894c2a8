"""Checkpoints: atomic, self-describing, loadable without unpickling code.

Layout of ``<run>/checkpoints/``::

    step_000200/
      model.safetensors   weights (full, unsharded), metadata: step, contract version        one process
      optimizer.pt        optimizer state; plain tensors/containers (torch.load weights_only=True)  one process
      dcp/                model + optimizer as torch.distributed.checkpoint shards, each rank    DDP / FSDP2
                          writing its own (no full-state gather); loadable in one CPU process
      rng.pt              RNG states of every rank (torch, CUDA, numpy, python), weights_only too
      state.json          step, token contract version, resolved config, data-stream position per rank,
                          scheduler state, counters, provenance, and a sha256 of every other file
    latest                name of the newest complete checkpoint
    best.json             {"step", "metric", "value"} of the best one (kept when older ones are pruned)

A checkpoint is written into ``.tmp-step_000200-<tag>/`` (:func:`begin_checkpoint`; every rank writes its
shards there under DDP / FSDP2), then (:func:`commit_checkpoint`) every file is fsynced, then the folder is
renamed into place and the parent fsynced; only then does ``latest`` move (temp file + rename). A
crash at any point leaves the previous checkpoint whole and ``latest`` pointing at it; leftover
``.tmp-*`` folders are ignored and removed by the next save.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from . import vocab
from .rng import rng_state, set_rng_state  # noqa: F401  (re-exported)
from .weights import save_weights, select_stages  # noqa: F401  (select_stages re-exported)

log = logging.getLogger("omnibyte.checkpoint")
STEP_RE = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------
# save


_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed")


def _space_error(e: BaseException, where: Path) -> BaseException | None:
    """A clear CheckpointError for a write that failed because the disk is full (torch reports ENOSPC as
    ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos``), else None."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch's writer loses the errno: its failed-write messages, on a disk that is (nearly) full, are taken as
    # ENOSPC; any other error stays itself, however little space is left
    if not full and isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILED):
        try:
            full = shutil.disk_usage(where if where.exists() else where.parent).free < (64 << 20)
        except OSError:
            full = False
    if full:
        return CheckpointError(f"no space left on device while writing {where} (free some space; the previous "
                               f"checkpoint is intact and training resumes from it)")
    return None


def begin_checkpoint(ckpt_dir: str | os.PathLike, step: int, tag: str | None = None) -> Path:
    """Create the temporary folder a checkpoint of ``step`` is written into (see :func:`commit_checkpoint`)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_dir / f".tmp-step_{step:06d}-{tag or os.getpid()}"
    tmp.mkdir()
    return tmp


def write_full_weights(tmp: Path, step: int, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """The unsharded payload of a one-process run: ``model.safetensors`` and ``optimizer.pt``."""
    save_weights(tmp / "model.safetensors", model_state, step)
    torch.save(optim_state, tmp / "optimizer.pt")


def commit_checkpoint(ckpt_dir: str | os.PathLike, tmp: Path, step: int, *, rng: list[dict], state: dict[str, Any],
                      keep_last: int = 2, best: dict | None = None) -> Path:
    """Finish a checkpoint whose payload is in ``tmp``: write ``rng.pt`` and ``state.json`` (with a sha256 of
    every payload file), fsync everything, rename into place, move ``latest``, record ``best``, prune."""
    ckpt_dir = Path(ckpt_dir)
    name = f"step_{step:06d}"
    try:
        torch.save(rng, tmp / "rng.pt")
        files = {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        state = {**state, "step": step, "contract_version": vocab.CONTRACT_VERSION, "files": files}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        for d in [*[d for d in tmp.rglob("*") if d.is_dir()], tmp]:
            _fsync_dir(d)
        final = ckpt_dir / name
        if final.exists():  # a re-run of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (clear := _space_error(e, tmp)) is not None:
            raise clear from None
        raise
    write_text_atomic(ckpt_dir / "latest", name + "\n")
    if best is not None:
        write_text_atomic(ckpt_dir / "best.json", json.dumps(best))
    prune(ckpt_dir, keep_last)
    return final


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], rng: list[dict], state: dict[str, Any], keep_last: int = 2,
                    best: dict | None = None) -> Path:
    """Write an unsharded ``step_<step>/`` atomically (one process), move ``latest``, record ``best``, prune."""
    tmp = begin_checkpoint(ckpt_dir, step)
    try:
        write_full_weights(tmp, step, model_state, optim_state)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (clear := _space_error(e, tmp)) is not None:
            raise clear from None
        raise
    return commit_checkpoint(ckpt_dir, tmp, step, rng=rng, state=state, keep_last=keep_last, best=best)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_best(ckpt_dir: str | os.PathLike, best: dict) -> None:
    write_text_atomic(Path(ckpt_dir) / "best.json", json.dumps(best))


def read_best(ckpt_dir: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(ckpt_dir) / "best.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := STEP_RE.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def best_step(ckpt_dir: Path) -> int | None:
    try:
        return int(json.loads((Path(ckpt_dir) / "best.json").read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def prune(ckpt_dir: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(ckpt_dir)
    best = best_step(ckpt_dir)
    for p in ckpts[: max(len(ckpts) - max(keep_last, 1), 0)]:
        if best is None or int(STEP_RE.match(p.name).group(1)) != best:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# find, verify and load


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, partial or corrupt files (the message names them)."""


def _pointer(d: Path) -> Path | None:
    """The checkpoint ``latest`` names, if it is a bare ``step_NNNNNN`` inside ``d`` (never a path elsewhere)."""
    try:
        name = (d / "latest").read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if not STEP_RE.match(name):
        log.warning("%s/latest holds %r, not a checkpoint name of this run; ignored", d, name[:200])
        return None
    return d / name


def latest_checkpoint(ckpt_dir: str | os.PathLike, verify: bool = False) -> Path | None:
    """The newest complete checkpoint (``latest``'s, else the highest step). With ``verify``, the newest one
    whose files match their checksums: a corrupt or partial newest checkpoint falls back to the previous
    complete one, with a warning naming what was wrong."""
    d = Path(ckpt_dir)
    order = list(reversed(list_checkpoints(d)))
    head = _pointer(d)
    if head is not None and (head / "state.json").is_file():
        order = [head] + [p for p in order if p != head]
    if not verify:
        return order[0] if order else None
    for p in order:
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s; falling back to the previous one", p.name, e)
    if order:
        raise CheckpointError(f"no intact checkpoint under {d}: every one failed its checks (see the warnings)")
    return None


def resolve_checkpoint(path: str | os.PathLike, which: str = "latest", verify: bool = True) -> Path:
    """A checkpoint folder from a run dir, a ``checkpoints/`` dir, or a checkpoint folder itself (checked).

    ``which="best"`` is the checkpoint ``best.json`` names, or a CheckpointError saying why there is none (no,
    an unreadable or a damaged ``best.json``, or one naming a pruned step): never the latest one instead."""
    p = Path(path)
    if (p / "state.json").is_file() and STEP_RE.match(p.name):
        if verify:
            verify_checkpoint(p)
        return p
    d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if which == "best":
        best_file = d / "best.json"
        if not best_file.is_file():
            raise CheckpointError(f"{p}: no best checkpoint ({best_file} is missing: no evaluation selected one yet)")
        try:
            b = best_step(d)
        except (OSError, TypeError):  # unreadable, or JSON that is not a mapping
            b = None
        if b is None:
            raise CheckpointError(f"{best_file} is unreadable or damaged (it names no step), so the best checkpoint "
                                  f"is unknown; use the latest checkpoint or a step instead")
        ckpt = d / f"step_{b:06d}"
        if not ckpt.is_dir():
            raise CheckpointError(f"{best_file} names step {b}, but {ckpt} is gone (pruned or deleted); use the "
                                  f"latest checkpoint or a step instead")
        if verify:
            verify_checkpoint(ckpt)
        return ckpt
    found = latest_checkpoint(d, verify=verify)
    if found is None:
        raise FileNotFoundError(f"no checkpoint under {p} (expected checkpoints/step_*/)")
    return found


def read_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged (not valid JSON: {e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not an omnibyte checkpoint state")
    vocab.check_contract(state.get("contract_version", -1), where=str(ckpt))
    return state


def verify_checkpoint(ckpt: Path) -> None:
    """Raise CheckpointError unless every file ``state.json`` lists is there with its sha256 (checkpoints written
    before checksums existed are checked for their files only)."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    files = state.get("files")
    if files is None:  # an older checkpoint: structure only
        need = ["rng.pt"] + (["model.safetensors", "optimizer.pt"] if not (ckpt / "dcp").is_dir() else [])
        missing = [n for n in need if not (ckpt / n).is_file()]
        if missing:
            raise CheckpointError(f"{ckpt}: missing {', '.join(missing)}")
        return
    for name, digest in files.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f} is damaged (its sha256 differs from the one recorded when it was written)")


def _load(path: Path, what: str, fn):
    try:
        return fn()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except CheckpointError:
        raise
    except Exception as e:  # torch / safetensors / pickle errors of a damaged file: one clear message
        raise CheckpointError(f"{path} cannot be read as {what} ({type(e).__name__}); the file is damaged or "
                              f"not an omnibyte checkpoint file") from None


def load_weights(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint as plain CPU tensors, in one process: ``model.safetensors`` (safetensors: no
    code is unpickled), or the model part of a sharded ``dcp/`` checkpoint (:mod:`omnibyte.sharded`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    path = ckpt / "model.safetensors"
    if not path.is_file() and (ckpt / "dcp").is_dir():
        from .sharded import load_model_weights

        return _load(ckpt / "dcp", "sharded weights", lambda: load_model_weights(ckpt / "dcp"))

    def read():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        vocab.check_contract(int(meta.get("contract_version", -1)), where=str(path))
        return load_file(str(path))

    return _load(path, "safetensors weights", read)


def load_training_state(ckpt: Path) -> tuple[dict, list[dict]]:
    """Optimizer/scheduler state and the RNG states of every rank (weights_only: no code unpickled)."""
    path = Path(ckpt) / "optimizer.pt"
    optim = _load(path, "optimizer state", lambda: torch.load(path, map_location="cpu", weights_only=True))
    return optim, load_rng(ckpt)


def load_rng(ckpt: Path) -> list[dict]:
    """The RNG states of every rank (weights_only: no code unpickled)."""
    path = Path(ckpt) / "rng.pt"
    return _load(path, "RNG states", lambda: torch.load(path, map_location="cpu", weights_only=True))
