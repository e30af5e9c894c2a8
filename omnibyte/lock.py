"""One writer per run directory: an exclusive ``fcntl`` lock on ``<run>/.lock``.

``omnibyte train`` takes it (the main rank, before it reads or writes anything of the run) and holds it until
the process ends. A second ``omnibyte train`` on the same directory refuses at once, naming the holder's pid, host
and start time (written into the lock file). The kernel releases the lock when its process dies, however it dies
(kill -9 included), so a lock left by a dead process is simply taken over. Readers (``omnibyte eval``, notebooks)
take no lock.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process is training in this run directory."""


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"
                   if holder else "another process")
            raise RunLockedError(f"{self.path.parent} is being trained by {who}; one writer per run directory: "
                                 f"wait for it, stop it, or train under another run_name") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().isoformat(timespec="seconds")}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
