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
import time
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
        if fsync:
            # The rename is durable only once its directory is: without this a power loss can bring back
            # the previous shard and lose a recorded result (tests/sharedfs/test_power_loss.py).
            fsync_directory(path.parent)
        return True
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ESTALE_RETRY_S = 5.0


def estale_again(err: OSError, start: float) -> bool:
    """True (after a short wait) if ``err`` is NFS's ``ESTALE`` and a retry begun at ``start`` may go on:
    another client replaced the file between this client's lookup and its read, and opening the name
    again looks it up afresh (tests/sharedfs shows it)."""
    if err.errno != errno.ESTALE or time.monotonic() - start > ESTALE_RETRY_S:
        return False
    time.sleep(0.002)
    return True


def read_bytes(path: str | Path) -> bytes:
    """The whole file at ``path``, retrying ``ESTALE`` for up to ``ESTALE_RETRY_S`` seconds
    (:func:`estale_again`). FileNotFoundError passes through."""
    start = time.monotonic()
    while True:
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except OSError as err:
            if not estale_again(err, start):
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
