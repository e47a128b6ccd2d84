"""The shard lock: an exclusive lock file beside each shard that works across the hosts of a cluster.

The lock (:class:`ShardLock`) must exclude across the hosts of a cluster, where ``flock`` does not
(NFS). It is a lock *file* created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on
NFSv3 and later) holding ``host pid time token``. Assumptions and race windows:

* A holder keeps the lock for milliseconds (one read and one write of a small file).
* A lock is stale when its holder is on this host and its pid is gone, or when it is older than
  ``stale_s`` (60 s by default, far beyond any transaction; hosts' clocks must agree to well under that).
* Breaking a stale lock renames it to a unique name first (atomic), then reads what it took. If that is
  not the lock it judged stale (someone broke it and a new holder took it in between), it puts it back
  with ``link`` (which fails rather than overwrite) and retries. Two breakers therefore never both delete
  a live lock.
* Before the final rename a holder checks that the lock file still holds its token. A holder stalled for
  longer than ``stale_s`` whose lock was broken finds out here and aborts its write instead of clobbering
  the newer state. The window left is a stall of more than ``stale_s`` between that check and the rename.
* A holder killed in the middle of a write leaves its temporary file. Only a lock holder writes a shard's
  temporary files, so whoever takes the lock after breaking a stale one deletes them.
* A breaker killed between its rename and its unlink leaves the renamed lock. Its name carries the
  breaker's host and pid (``<shard>.lock.broken-<host>-<pid>-<hex>``), so it is deleted, without a
  lock, once that breaker is gone (another host's after ``stale_s``): by whoever next breaks a stale
  lock of that shard, and by every worker as it starts (:meth:`GridStore.recover`) and ends.
* A holder that cannot write its name into the lock file (a full disk) deletes the file and fails, rather
  than leave an empty lock that others must wait out.
"""
from __future__ import annotations

import errno
import glob
import os
import secrets
import socket
import time
from pathlib import Path

from gridrunner.atomic import read_bytes
from gridrunner.errors import LockTimeout

HOST = socket.gethostname()


class ShardLock:
    """An exclusive lock file beside a shard that works across NFS clients. See the module docstring."""

    def __init__(self, path: str | Path, stale_s: float = 60.0, timeout_s: float = 300.0):
        self.path = str(path)
        self.stale_s = stale_s
        self.timeout_s = timeout_s
        self.token = ""
        self.broke_stale = False  # set when this holder broke a dead holder's lock on its way in

    def acquire(self) -> None:
        start = time.monotonic()
        delay = 0.0005
        holder = "?"
        while True:
            token = secrets.token_hex(8)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._break_if_stale()
                if holder is None:
                    continue  # broke a stale lock: try again at once
            except OSError as err:
                if err.errno != errno.ESTALE:
                    raise
                holder = "a lock that other NFS clients replace as this one looks"
            else:
                try:
                    try:
                        os.write(fd, f"{HOST} {os.getpid()} {time.time():.3f} {token}\n".encode())
                    finally:
                        os.close(fd)
                except OSError:
                    os.unlink(self.path)  # ours, and empty: nobody else may take it for a live holder's
                    raise
                self.token = token
                return
            if time.monotonic() - start > self.timeout_s:
                raise LockTimeout(self.path, holder, time.monotonic() - start)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def still_held(self) -> bool:
        """True if the lock file still carries this holder's token (checked before a commit)."""
        return self._read(self.path).endswith(" " + self.token) if self.token else False

    def release(self) -> None:
        if self.token and self.still_held():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.token = ""

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    @staticmethod
    def _read(path: str) -> str:
        try:
            return read_bytes(path).decode("utf-8", errors="replace").strip()
        except (FileNotFoundError, IsADirectoryError):
            return ""
        except OSError as err:
            if err.errno == errno.ESTALE:  # replaced again and again by other clients: it is not ours
                return ""
            raise

    def _is_stale(self, content: str, mtime: float) -> bool:
        parts = content.split()
        if len(parts) == 4 and parts[0] == HOST:
            try:
                pid = int(parts[1])
            except ValueError:
                pid = -1
            if not pid_alive(pid):
                return True
        elif len(parts) != 4 and time.time() - mtime > 5.0:
            return True  # a holder killed between create and write leaves an empty file
        return time.time() - mtime > self.stale_s

    def _break_if_stale(self) -> str | None:
        """Break the lock if stale. Returns None if broken, else a description of the holder."""
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ESTALE:  # NFS: another client replaced it as we looked; look again
                return None
            raise
        content = self._read(self.path)
        if not self._is_stale(content, mtime):
            return content or "a holder that has not written its name yet"
        taken = f"{self.path}.{BROKEN}{HOST}-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            os.rename(self.path, taken)
        except FileNotFoundError:
            return None  # someone else released or broke it
        if self._read(taken) != content:
            # We took a fresh lock that replaced the stale one; give it back unless a newer one exists.
            try:
                os.link(taken, self.path)
            except FileExistsError:
                pass
        else:
            self.broke_stale = True
        try:
            os.unlink(taken)
        except FileNotFoundError:
            pass
        return None


BROKEN = "broken-"  # a lock being broken: ``<shard>.lock.broken-<host>-<pid>-<hex>`` (see ShardLock)


def remove_orphaned_breaks(shard_dir: Path, name: str | None = None, stale_s: float = 60.0) -> list[Path]:
    """Delete the renamed locks that breakers killed in the middle of a break left (of the shard ``name``,
    or of every shard). Only a gone breaker's: a live one unlinks its own microseconds after the rename,
    and deleting it under its feet would make it think it took a fresh lock. Needs no lock."""
    removed = []
    for path in Path(shard_dir).glob(f"{glob.escape(name) if name else '*'}.lock.{BROKEN}*"):
        breaker = path.name.rsplit(f".lock.{BROKEN}", 1)[1].rsplit("-", 2)
        try:
            if len(breaker) == 3 and breaker[0] == HOST:
                gone = not pid_alive(int(breaker[1]))
            else:  # another host's (or an older name without its breaker): by age
                gone = time.time() - path.lstat().st_ctime > stale_s
        except (ValueError, FileNotFoundError):
            continue
        if gone:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = proc_stat(pid)
    return fields is None or fields[0] not in (b"Z", b"X")


def proc_stat(pid) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ..., starttime at index
    19); None if the process is gone or the file cannot be read. The name is cut at its last ``)``: it may
    hold spaces and parentheses."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None
    return fields or None

