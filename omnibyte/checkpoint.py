"""Checkpoints: atomic, self-describing, loadable without unpickling code.

Layout of ``<run>/checkpoints/``::

    step_000200/
      model.safetensors   weights (full, unsharded), metadata: step, contract version
      optimizer.pt        optimizer + scheduler state; plain tensors/containers (torch.load weights_only=True)
      rng.pt              RNG states of every rank (torch, CUDA, numpy, python), weights_only too
      state.json          step, token contract version, resolved config, data-stream position per rank,
                          counters, eval metrics
    latest                name of the newest complete checkpoint
    best.json             {"step", "metric", "value"} of the best one (kept when older ones are pruned)

A checkpoint is written into ``.tmp-step_000200-<pid>/``, every file fsynced, then the folder is
renamed into place and the parent fsynced; only then does ``latest`` move (temp file + rename). A
crash at any point leaves the previous checkpoint whole and ``latest`` pointing at it; leftover
``.tmp-*`` folders are ignored and removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import vocab

STEP_RE = re.compile(r"^step_(\d+)$")
# weights of model stage i: ``blocks.i.*``, ``start.i``, ``patch_embed.i.*`` (its unit embedding), ``to_next.i.*``
# (its context projection); the byte embedding and the head belong to the innermost stage
STAGE_KEY_RE = re.compile(r"^(?:blocks|start|patch_embed|to_next|stages)\.(\d+)(?:\.|$)")
INNER_KEY_RE = re.compile(r"^(?:embed|head)(?:\.|$)")


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


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses tied weights; load copies back)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in state.items():
        t = t.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (0, id(t))
        if key in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(key)
        out[k] = t
    return out


# ----------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": _plain(random.getstate()),
    }


def _plain(x: Any) -> Any:
    if isinstance(x, tuple):
        return [_plain(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x


def _tuple(x: Any) -> Any:
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_tuple(state["python"]))


# ----------------------------------------------------------------------------------------------
# save


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], rng: list[dict], state: dict[str, Any], keep_last: int = 2,
                    best: dict | None = None) -> Path:
    """Write ``step_<step>/`` atomically, move ``latest``, record ``best`` and prune old ones."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        meta = {"step": str(step), "contract_version": str(vocab.CONTRACT_VERSION), "format": "omnibyte-1"}
        save_file(_unshare(model_state), str(tmp / "model.safetensors"), metadata=meta)
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        state = {**state, "step": step, "contract_version": vocab.CONTRACT_VERSION}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        final = ckpt_dir / name
        if final.exists():  # a re-run of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(ckpt_dir / "latest", name + "\n")
    if best is not None:
        write_text_atomic(ckpt_dir / "best.json", json.dumps(best))
    prune(ckpt_dir, keep_last)
    return final


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
# find and load


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    d = Path(ckpt_dir)
    try:
        p = d / (d / "latest").read_text().strip()
        if (p / "state.json").is_file():
            return p
    except FileNotFoundError:
        pass
    ckpts = list_checkpoints(d)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike, which: str = "latest") -> Path:
    """A checkpoint folder from a run dir, a ``checkpoints/`` dir, or a checkpoint folder itself."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if which == "best" and (b := best_step(d)) is not None and (d / f"step_{b:06d}").is_dir():
        return d / f"step_{b:06d}"
    found = latest_checkpoint(d)
    if found is None:
        raise FileNotFoundError(f"no checkpoint under {p} (expected checkpoints/step_*/model.safetensors)")
    return found


def read_state(ckpt: Path) -> dict[str, Any]:
    state = json.loads((Path(ckpt) / "state.json").read_text())
    vocab.check_contract(state.get("contract_version", -1), where=str(ckpt))
    return state


def load_weights(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint as plain tensors (safetensors: no code is unpickled)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(ckpt) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    vocab.check_contract(int(meta.get("contract_version", -1)), where=str(path))
    return load_file(str(path))


def load_training_state(ckpt: Path) -> tuple[dict, list[dict]]:
    """Optimizer/scheduler state and the RNG states of every rank (weights_only: no code unpickled)."""
    optim = torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(Path(ckpt) / "rng.pt", map_location="cpu", weights_only=True)
    return optim, rng


def select_stages(weights: dict[str, torch.Tensor], stages: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The weights of the given model stages only (see STAGE_KEY_RE); all weights when ``stages`` is empty.
    Negative indices count from the innermost stage (-1 = the byte-level stage with embedding and head)."""
    if not stages:
        return dict(weights)
    num = 1 + max((int(m.group(1)) for k in weights if (m := STAGE_KEY_RE.match(k))), default=0)
    if any(not -num <= s < num for s in stages):
        raise ValueError(f"init_stages={list(stages)}: the checkpoint has stages 0..{num - 1}")
    wanted = {s % num for s in stages}
    out = {}
    for k, v in weights.items():
        m = STAGE_KEY_RE.match(k)
        stage = int(m.group(1)) if m else (num - 1 if INNER_KEY_RE.match(k) else None)
        if stage in wanted:
            out[k] = v
    if not out:
        raise ValueError(f"init_stages={list(stages)}: no weights of those stages in the checkpoint")
    return out
