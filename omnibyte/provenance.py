"""Provenance: what produced a run, recorded in its directory and in every checkpoint.

:func:`collect` gives one JSON-ready dict: omnibyte version and git commit (``"unknown"`` when omnibyte does
not run from a git checkout; ``dirty: true`` when the checkout has uncommitted changes to tracked files), the
full command line, Python / torch / CUDA / cuDNN / Triton / mamba-ssm / causal-conv1d versions (``null`` where not
installed), host name, device names and world size, and the wall-clock start time.

A run directory keeps ``provenance.jsonl``: one line per process that trained it (a resumed run adds a line), so
the record of a run that was continued on another machine or commit says so. Each checkpoint's ``state.json``
holds the provenance of the process that wrote it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .logging import read_jsonl

PROVENANCE = "provenance.jsonl"
_PACKAGES = ("omnibyte", "torch", "triton", "mamba-ssm", "causal-conv1d", "numpy", "safetensors", "webdataset")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout omnibyte runs from; ``"unknown"`` outside one.
    ``OMNIBYTE_COMMIT`` overrides (a copy of a checkout without its .git, e.g. on a cluster node)."""
    if os.environ.get("OMNIBYTE_COMMIT"):
        return {"commit": os.environ["OMNIBYTE_COMMIT"], "dirty": None, "source": "OMNIBYTE_COMMIT"}
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return {"commit": "unknown", "dirty": None}
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def collect(world_size: int = 1, device: Any = None) -> dict[str, Any]:
    """The provenance of this process (see the module docstring)."""
    import torch

    out: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "omnibyte": _version("omnibyte"),
        "git": git_state(),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "world_size": int(world_size),
        "device": str(device) if device is not None else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    return out


def append(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Add ``record`` as a line of ``<run_dir>/provenance.jsonl`` (fsynced)."""
    path = Path(run_dir) / PROVENANCE
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / PROVENANCE)
