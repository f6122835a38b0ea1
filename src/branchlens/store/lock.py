"""One writer per store or SAE folder: a flock-held ``.lock`` with the writer's pid and host
(a killed writer leaves no live lock)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from branchlens.store.errors import StoreLockedError, write_error


class StoreLock:
    """Exclusive writer lock: ``flock`` on ``.lock``, which also holds pid and host for messages.

    ``flock`` is released by the kernel when the holder dies, so a lock file left by a killed
    (``kill -9``) writer is stale by construction and is simply taken over.
    """

    what = "store"  # named in the "locked" message

    def __init__(self, path: str | Path, what: str | None = None, name: str = ".lock"):
        self.file = Path(path) / name
        self.what = what or self.what
        self.fd: int | None = None
        self.replaced_stale: dict | None = None

    def acquire(self) -> StoreLock:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(e, self.file) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd)
            os.close(fd)
            raise StoreLockedError(
                f"{self.what} {self.file.parent} is being written by another process "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to "
                f"finish or stop it. Two writers on one {self.what} are refused.") from None
        old = _read_lock(fd)
        if old.get("pid"):
            self.replaced_stale = old
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunLock(StoreLock):
    """The same kernel-released lock for a run folder or an SAE folder (one writer each)."""

    what = "run folder"


def _read_lock(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
