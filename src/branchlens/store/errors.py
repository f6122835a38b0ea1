"""Store errors: every failure a user can meet names the store and what to do."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class StoreError(RuntimeError):
    """The store cannot be written or read as asked; the message says what to do."""


class StoreLockedError(StoreError):
    pass


class StoreConfigMismatch(StoreError):
    pass


class SourceChanged(StoreConfigMismatch):
    """The image source holds other files than the store was harvested from; ``change`` says
    how in a few words."""

    def __init__(self, message: str, change: str):
        super().__init__(message)
        self.change = change


class StoreIncompleteError(StoreError):
    pass


class CorruptShardError(StoreError):
    pass


# -- shard files --------------------------------------------------------------------------------

def write_error(e: OSError, where: Path) -> StoreError:
    """A failed write as a one-line StoreError naming the cause (full disk, permissions)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the destination is not writable"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        why = "a path component is not a directory"
    else:
        why = os.strerror(e.errno or 0) or str(e)
    return StoreError(
        f"cannot write activation store at {where}: {why} ({e}). Completed shards are intact; "
        "fix the cause and re-run the same command to resume.")


# -- writer side --------------------------------------------------------------------------------
