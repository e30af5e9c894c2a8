"""The default CLEVR-format set of ``clevr_vqa`` (``task.root`` empty), the cache folder, and a file lock.

With ``root`` empty, a CLEVR-format set is generated on first use with the offline generator
(:mod:`tasks.clevr_synth`) into ``$OMNIBYTE_CACHE/clevr-synth-<params>`` (default cache ``~/.cache/omnibyte``),
atomically (temporary folder + rename, under a file lock), then reused by every later run and process.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnibyte.errors import DataError

log = logging.getLogger("omnibyte.tasks.clevr")


@dataclass(frozen=True)
class SynthDefaults:
    """The generated set made when ``root`` is empty (see :mod:`tasks.clevr_synth`)."""

    images: int = 2000  # divided among splits by the generator (val 15%, train the rest; see clevr_synth)
    questions_per_image: int = 10
    seed: int = 0
    size: tuple[int, int] = (480, 320)  # width, height: CLEVR's
    splits: tuple[str, ...] = ("train", "val")
    workers: int = 0  # rendering processes (0: one per CPU core, at most 16); the output does not depend on it


def cache_root(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("OMNIBYTE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "omnibyte"


def default_set_dir(config: Any) -> Path:
    """Where the default set of a ``ClevrConfig`` goes (its ``synth`` parameters name the folder)."""
    s = config.synth
    w, h = s.size
    from .clevr_synth.generate import GENERATOR_VERSION

    # the generator's version in the name: a set cached by an older generator is never reused for a newer one's
    name = (f"clevr-synth-v{GENERATOR_VERSION}-n{s.images}-q{s.questions_per_image}-s{s.seed}-{w}x{h}-"
            f"{'+'.join(s.splits)}")
    return cache_root(config.cache_dir) / name


def ensure_default_set(config: Any) -> Path:
    """The default generated CLEVR-format set: made once (locked, atomic), then reused."""
    final = default_set_dir(config)
    done = final / ".complete"
    if done.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if done.is_file():  # another process made it while we waited
            return final
        try:
            from omnibyte.tasks import clevr_synth
        except ImportError as e:
            raise DataError(f"task.root is empty and the CLEVR-format generator is unavailable ({e}); "
                            f"set task.root to a CLEVR v1.0 folder") from None
        s = config.synth
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        _rmtree(tmp)
        log.warning("task.root is empty: generating a CLEVR-format set (%d images) into %s", s.images, final)
        import multiprocessing

        workers = s.workers or min(os.cpu_count() or 1, 16)
        if multiprocessing.current_process().daemon:  # e.g. inside a DataLoader worker: no child processes
            workers = 0
        clevr_synth.generate(str(tmp), images=s.images, questions_per_image=s.questions_per_image, seed=s.seed,
                             size=tuple(s.size), splits=tuple(s.splits), progress=True, workers=workers)
        (tmp / ".complete").write_text(json.dumps({"synth": {"images": s.images, "seed": s.seed,
                                                             "questions_per_image": s.questions_per_image,
                                                             "size": list(s.size), "splits": list(s.splits)}}))
        if final.exists():  # a partial folder from an older, unlocked attempt
            _rmtree(final)
        os.rename(tmp, final)
    return final


def _rmtree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


class file_lock:
    """An exclusive advisory lock on ``path`` (no-op where fcntl is unavailable)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows)
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        return False
