"""Atomic file replacement: a temporary file in the same directory, fsynced, renamed over the target.

A reader never takes a lock: rename is atomic (also over NFS), so a reader sees the old file or the new
one, never a mix. A writer killed before its rename leaves its temporary file; only a shard's lock
holder writes the shard's temporary files, so whoever takes the lock after breaking a stale one deletes
them (:func:`remove_orphaned_temps`).
"""
from __future__ import annotations

import errno
import glob
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from gridrunner.errors import GridError

if TYPE_CHECKING:
    from gridrunner.lock import ShardLock


def write_atomic(path: Path, text: str, lock: ShardLock | None = None, fsync: bool = True,
                 still_as_read=None) -> bool:
    """Write ``text`` to ``path`` through a temporary file and a rename; the old file stays on any error.

    With ``lock``, the rename happens only if the lock is still ours (see the module docstring). With
    ``still_as_read`` (a callable), the rename happens only if it returns True: a shard that someone
    saved without the lock (an editor) since the transaction read it is not written over. Returns whether
    the file was replaced.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            data = text.encode("utf-8")
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if lock is not None and not lock.still_held():
            raise GridError(f"{path}: the lock was broken while this process held it (stalled for over "
                            f"{lock.stale_s:.0f} s); the write was abandoned and the shard is unchanged")
        if still_as_read is not None and not still_as_read():
            os.unlink(tmp)
            return False
        os.replace(tmp, path)
        return True
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class StoreWriteError(GridError):
    """A shard could not be written (disk full, read-only, quota). The shard keeps its previous content."""


def why_failed(err: OSError) -> str:
    """Why a write failed, in words for an error message."""
    return "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))


def remove_orphaned_temps(path: Path) -> list[Path]:
    """Delete the temporary files of ``path`` that a killed writer left. Call it holding the shard's lock:
    then no live process is writing one (a holder whose lock was broken for staleness only loses a write
    it would have abandoned anyway)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.tmp")
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if pattern.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
