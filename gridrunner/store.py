"""The store: the only code that reads or writes shard files and their locks.

Layout of a grid directory::

    runs/<name>/spec.yaml            the resolved spec (every default filled in)
    runs/<name>/spec.source.yaml     the user's file as it was at the last `make`
    runs/<name>/shards/shard-NNN.csv the rows (the CSV contract, see the README)
    runs/<name>/rows/<row_id>/       per-row files the worker and the task write

Every change to a shard is one transaction: take the shard's lock, read the file, change rows in
memory, write a temporary file in the same directory, fsync it, check the lock is still ours, rename
it over the shard, release the lock. A reader never takes the lock: rename is atomic (also over NFS),
so a reader sees the old file or the new one, never a mix.

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

Shards stay small (``max_len`` rows), so a transaction reads and writes one small file and nothing here
scans the whole grid per row.
"""
from __future__ import annotations

import csv
import errno
import glob
import io
import logging
import os
import re
import secrets
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from gridrunner.errors import GridError, LockTimeout, ShardError, SpecError
from gridrunner.spec import BOOK_COLUMNS, STATUSES, canonical_json, decode_cell, row_id_of

SHARD_DIR = "shards"
ROWS_DIR = "rows"
SPEC_FILE = "spec.yaml"
SOURCE_FILE = "spec.source.yaml"
SHARD_GLOB = "shard-*.csv"
#: ``<grid>/.changed``, touched after every write of a shard: a watcher learns of a change with one ``stat``.
CHANGED_FILE = ".changed"
_NB = len(BOOK_COLUMNS)
HOST = socket.gethostname()
log = logging.getLogger("gridrunner.store")

# Column offsets of the bookkeeping block, relative to the first one (row_id).
ROW_ID, STATUS, ATTEMPTS, WORKER, STARTED, FINISHED, RUNTIME, ERROR = range(_NB)


def now_iso(t: float | None = None) -> str:
    """UTC time as ``2026-11-25T14:03:09Z`` (the CSV's time format)."""
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (ValueError, TypeError):
        return None


def shard_name(index: int) -> str:
    return f"shard-{index:03d}.csv"


def shard_index(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def safe_cell(text: str) -> str:
    """A free-text cell (an error message) as one line that no spreadsheet reads as a formula."""
    text = " ".join(str(text).split())
    if len(text) > 1000:
        text = text[:997] + "..."
    if text.startswith(("=", "+", "-", "@")):
        text = "'" + text
    return text


# --------------------------------------------------------------------------- the lock

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
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read().strip()
        except (FileNotFoundError, IsADirectoryError):
            return ""

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
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


# --------------------------------------------------------------------------- one shard in memory

_VERIFIED: dict = {}  # (row_id, param cells) -> None: rows whose id was checked against their parameters


class _BadRecord(list):
    """The fields of a row that breaks the CSV contract, and ``raw``, its text in the file, written back as is."""

    def __init__(self, fields: list[str], raw: str):
        super().__init__(fields)
        self.raw = raw


class Shard:
    """A parsed shard: its header and every record, bad ones kept verbatim so a rewrite loses nothing."""

    def __init__(self, path: Path, header: list[str], records: list[list[str]], errors: dict[int, str],
                 lines: list[int]):
        self.path = path
        self.header = header
        self.records = records
        self.errors = errors  # record index -> message
        self.lines = lines  # record index -> line number in the file
        self.n_params = header.index("row_id")
        self.params = header[: self.n_params]
        self.outcomes = header[self.n_params + _NB:]
        self.dirty = False

    # ---- parsing

    @classmethod
    def parse(cls, path: Path, text: str) -> "Shard":
        if not text.strip():
            raise ShardError(path, "empty file: a shard needs at least its header line")
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except csv.Error as err:
            raise ShardError(path, f"unreadable header: {err}", 1) from None
        cls.check_header(path, header)
        records, lines, errors = [], [], {}
        spans: dict[int, tuple[int, int]] = {}  # bad record index -> its physical lines [start, end)
        seen: dict[str, int] = {}
        n = len(header)
        p = header.index("row_id")
        outcome_slice = slice(p + _NB, n)
        while True:
            start = reader.line_num
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                records.append([])
                lines.append(reader.line_num)
                errors[len(records) - 1] = f"unreadable line: {err}"
                spans[len(records) - 1] = (start, reader.line_num)
                continue
            if not fields:
                continue
            index = len(records)
            records.append(fields)
            line = reader.line_num
            lines.append(line)
            message = cls._check(fields, n, p, outcome_slice, header)
            if message is None:
                rid = fields[p]
                if rid in seen:
                    message = f"duplicate row_id {rid} (also on line {seen[rid]})"
                else:
                    seen[rid] = line
            if message is not None:
                errors[index] = message
                spans[index] = (start, line)
        if spans:
            # A bad row is written back exactly as the user left it: its fields re-quoted by the csv module
            # would change its text, and an unreadable line has no fields at all.
            physical = io.StringIO(text, newline="").readlines()  # the lines the reader counted
            for index, (start, end) in spans.items():
                records[index] = _BadRecord(records[index], "".join(physical[start:end]))
        return cls(path, header, records, errors, lines)

    @staticmethod
    def check_header(path, header: list[str]) -> None:
        if "row_id" not in header:
            raise ShardError(path, f"missing column 'row_id': the header must be the parameters, then "
                                   f"{', '.join(BOOK_COLUMNS)}, then the outcomes", 1)
        p = header.index("row_id")
        got = header[p: p + _NB]
        if tuple(got) != BOOK_COLUMNS:
            missing = [c for c in BOOK_COLUMNS if c not in header]
            what = f"missing column {missing[0]!r}" if missing else "bookkeeping columns out of order"
            raise ShardError(path, f"{what}: after the parameters the header must be {', '.join(BOOK_COLUMNS)}", 1)
        if len(set(header)) != len(header):
            raise ShardError(path, "a column name repeats in the header", 1)

    @staticmethod
    def _check(fields, n, p, outcome_slice, header) -> str | None:
        if len(fields) != n:
            return f"expected {n} fields, got {len(fields)} (truncated line, or a comma inside an unquoted cell)"
        status = fields[p + STATUS]
        if status not in STATUSES:
            return f"unknown status {status!r} (valid: {', '.join(STATUSES)})"
        attempts = fields[p + ATTEMPTS]
        if attempts and not attempts.isdigit():
            return f"attempts must be a whole number, got {attempts!r}"
        runtime = fields[p + RUNTIME]
        if runtime and not _is_number(runtime):
            return f"runtime_s must be a number, got {runtime!r}"
        for name, cell in zip(header[outcome_slice], fields[outcome_slice]):
            if cell and not _is_number(cell):
                return f"outcome {name} must be a number or empty, got {cell!r}"
        cells = tuple(fields[:p])
        rid = fields[p]
        key = (rid, cells)
        if key in _VERIFIED:
            return None
        try:
            params = {name: decode_cell(cell) for name, cell in zip(header[:p], cells) if cell != ""}
        except ValueError as err:
            return f"unreadable parameter: {err}"
        expected = row_id_of(params)
        if rid == "":
            fields[p] = expected  # a hand-appended row: it gets its id on the next write
            rid = expected
        elif rid != expected:
            return (f"row_id {rid!r} does not match its parameters (their id is {expected}): a parameter was "
                    f"edited under an existing row_id; clear the row_id cell to make it a new row")
        if len(_VERIFIED) > 2_000_000:
            _VERIFIED.clear()
        _VERIFIED[(rid, cells)] = None
        return None

    # ---- access

    def __len__(self) -> int:
        return len(self.records)

    def valid(self) -> Iterator[int]:
        """Indexes of the records that follow the contract."""
        errors = self.errors
        return (i for i in range(len(self.records)) if i not in errors)

    def cell(self, i: int, column: int) -> str:
        return self.records[i][self.n_params + column]

    def set(self, i: int, column: int, value: str) -> None:
        self.records[i][self.n_params + column] = value
        self.dirty = True

    def row_params(self, i: int) -> dict:
        fields = self.records[i]
        return {name: decode_cell(cell) for name, cell in zip(self.params, fields) if cell != ""}

    def row_outcomes(self, i: int) -> dict:
        fields = self.records[i][self.n_params + _NB:]
        return {name: float(cell) for name, cell in zip(self.outcomes, fields) if cell != ""}

    def find(self, row_id: str) -> int | None:
        p = self.n_params
        for i, fields in enumerate(self.records):
            if len(fields) > p and fields[p] == row_id and i not in self.errors:
                return i
        return None

    def bad_rows(self) -> list[tuple[int, str]]:
        return [(self.lines[i], msg) for i, msg in sorted(self.errors.items())]

    def clear_run(self, i: int, status: str = "not_run") -> None:
        """Back to a runnable row: no worker, times, error or outcomes."""
        fields = self.records[i]
        p = self.n_params
        fields[p + STATUS] = status
        for column in (WORKER, STARTED, FINISHED, RUNTIME, ERROR):
            fields[p + column] = ""
        for j in range(p + _NB, len(fields)):
            fields[j] = ""
        self.dirty = True

    def render(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.header)
        for record in self.records:
            raw = getattr(record, "raw", None)
            if raw is None:
                writer.writerow(record)
            else:
                out.write(raw if raw.endswith(("\n", "\r")) else raw + "\n")
        return out.getvalue()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- atomic files

def write_atomic(path: Path, text: str, lock: ShardLock | None = None, fsync: bool = True) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename; the old file stays on any error.

    With ``lock``, the rename happens only if the lock is still ours (see the module docstring).
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
        os.replace(tmp, path)
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


def mark_changed(grid_dir: Path) -> None:
    """Touch the grid's change file (one ``utime``): what a watcher stats instead of every shard."""
    path = os.path.join(grid_dir, CHANGED_FILE)
    try:
        os.utime(path)
    except FileNotFoundError:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        except OSError:
            pass
    except OSError:
        pass  # advisory: a watcher also looks at every shard in turn


# --------------------------------------------------------------------------- claims and results

@dataclass
class Claim:
    """A row this worker now owns: it is ``running`` with ``worker`` and ``attempt`` in the shard."""

    path: Path
    row_id: str
    params: dict
    attempt: int
    worker: str
    started_at: str
    started: float = field(default_factory=time.time)


@dataclass
class Result:
    """How a run ended. ``status`` is ``done``, ``failed`` or ``not_run`` (given back)."""

    status: str
    metrics: dict = field(default_factory=dict)
    error: str = ""
    runtime_s: float | None = None


@dataclass
class ClaimScan:
    """What one look at a shard found, besides the claimed row."""

    claim: Claim | None = None
    running_elsewhere: int = 0  # rows running with a live worker
    gave_up: int = 0  # rows failed because their workers died too often


class GridStore:
    """All shard I/O of one grid directory."""

    def __init__(self, grid_dir: str | Path, lock_stale_s: float = 60.0):
        self.grid_dir = Path(grid_dir)
        self.shard_dir = self.grid_dir / SHARD_DIR
        self.lock_stale_s = lock_stale_s
        # path -> (text, header, records) of shards this process wrote last: see read()
        self._written: dict[Path, tuple[str, list[str], list[list[str]]]] = {}
        self._reported: set[tuple[Path, int, str]] = set()  # bad rows already reported by claim()

    # ---- files

    def shard_paths(self) -> list[Path]:
        return sorted(self.shard_dir.glob(SHARD_GLOB), key=shard_index)

    def row_dir(self, row_id: str) -> Path:
        if not row_id or not all(c.isalnum() or c in "-_" for c in row_id):
            raise ShardError(self.shard_dir, f"row_id {row_id!r} is not a safe directory name")
        return self.grid_dir / ROWS_DIR / row_id

    def read(self, path: Path) -> Shard:
        try:
            with open(path, encoding="utf-8", newline="") as fh:  # newline="": keep quoted \r intact
                text = fh.read()
        except FileNotFoundError:
            raise ShardError(path, "no such shard") from None
        except UnicodeDecodeError as err:
            raise ShardError(path, f"not UTF-8 text: {err}") from None
        written = self._written.get(path)
        if written is not None and written[0] == text:
            # Unchanged since this process wrote it (the usual case: a worker on its own shard), so its
            # parse is the one we hold: skip the parse and the row-id checks, which cost more than the I/O.
            _, header, records = written
            return Shard(path, header, [r[:] for r in records], {}, list(range(2, len(records) + 2)))
        return Shard.parse(path, text)

    def _remember(self, path: Path, text: str, shard: Shard) -> None:
        """Keep what this process just wrote to ``path``, if it is clean, for :meth:`read`."""
        self._written.pop(path, None)
        if shard.errors or "\r" in text or text.count("\n") != len(shard.records) + 1:
            return  # bad rows or multi-line cells: their line numbers come from a real parse
        self._written[path] = (text, shard.header, [r[:] for r in shard.records])
        if len(self._written) > 8:
            del self._written[next(iter(self._written))]

    def glance(self, path: Path) -> tuple[bool, bool]:
        """Without the lock: (may ``path`` hold ``not_run`` rows, may it hold ``running`` rows).

        A shard is replaced atomically, so this reads one whole version. A status cell is one of the
        words in STATUSES, quoted or not, so (False, False) means that version has nothing to claim;
        True may be a false alarm (a parameter value containing the word), which the claim settles.
        Lets a worker pass over finished shards without taking their locks.
        """
        with open(path, "rb") as fh:
            data = fh.read()
        return b"not_run" in data, b"running" in data

    def read_all(self) -> list[Shard]:
        return [self.read(p) for p in self.shard_paths()]

    @contextmanager
    def transaction(self, path: Path) -> Iterator[Shard]:
        """Lock ``path``, yield it parsed; if the body changed it (``shard.dirty``), write it back atomically."""
        lock = ShardLock(str(path) + ".lock", stale_s=self.lock_stale_s)
        try:
            lock.acquire()
        except OSError as err:
            raise StoreWriteError(f"{path}: cannot create the shard's lock file ({why_failed(err)}); the shard keeps "
                                  f"its previous content") from err
        if lock.broke_stale:
            remove_orphaned_temps(path)
            remove_orphaned_breaks(path.parent, path.name, self.lock_stale_s)
        try:
            shard = self.read(path)
            yield shard
            if shard.dirty:
                text = shard.render()
                try:
                    write_atomic(path, text, lock)
                except OSError as err:
                    self._written.pop(path, None)
                    raise StoreWriteError(f"{path}: cannot write the shard ({why_failed(err)}); it keeps its previous "
                                          f"content") from err
                except BaseException:
                    self._written.pop(path, None)
                    raise
                self._remember(path, text, shard)
                mark_changed(self.grid_dir)
        finally:
            lock.release()

    # ---- claiming

    def claim(self, path: Path, worker: str, is_stale: Callable[[str, str], bool], max_attempts: int,
              finish: tuple[Claim, Result] | None = None) -> tuple[bool | None, ClaimScan]:
        """Optionally record ``finish`` (a claim of this shard and its result), then claim one row.

        One transaction does both, so a worker that stays on a shard pays one write per row. Returns
        (whether ``finish`` was recorded — None if there was none —, what the scan found).
        """
        scan = ClaimScan()
        recorded = None
        with _telling_what_was_lost(finish), self.transaction(path) as shard:
            self._report_bad_rows(shard)
            if finish is not None:
                recorded = self._record(shard, *finish)
            p = shard.n_params
            for i in shard.valid():
                fields = shard.records[i]
                status = fields[p + STATUS]
                if status == "not_run":
                    pass
                elif status == "running":
                    holder = fields[p + WORKER]
                    if holder != worker and not is_stale(holder, fields[p + STARTED]):
                        scan.running_elsewhere += 1
                        continue
                    attempts = int(fields[p + ATTEMPTS] or 0)
                    if attempts >= max_attempts:
                        shard.set(i, STATUS, "failed")
                        shard.set(i, FINISHED, now_iso())
                        shard.set(i, ERROR, safe_cell(f"WorkerDied: the worker died {attempts} times running this "
                                                      f"row (last: {holder}); max_attempts is {max_attempts}"))
                        scan.gave_up += 1
                        continue
                else:
                    continue
                attempt = int(fields[p + ATTEMPTS] or 0) + 1
                started_at = now_iso()
                fields[p + STATUS] = "running"
                fields[p + ATTEMPTS] = str(attempt)
                fields[p + WORKER] = worker
                fields[p + STARTED] = started_at
                fields[p + FINISHED] = ""
                fields[p + RUNTIME] = ""
                fields[p + ERROR] = ""
                shard.dirty = True
                scan.claim = Claim(path, fields[p], shard.row_params(i), attempt, worker, started_at)
                break
        return recorded, scan

    def _report_bad_rows(self, shard: Shard) -> None:
        """Warn once per process about each row of ``shard`` that breaks the CSV contract (a hand edit):
        workers pass over it and write it back as it is, so only the user can fix it."""
        for line, message in shard.bad_rows():
            key = (shard.path, line, message)
            if key not in self._reported:
                self._reported.add(key)
                log.warning("%s:%d: %s (bad row: never claimed, kept as it is; fix or delete it)", shard.path, line,
                            message)

    def record(self, claim: Claim, result: Result) -> bool:
        """Write a result for ``claim``. False (and nothing written) if the row is no longer ours."""
        with _telling_what_was_lost((claim, result)), self.transaction(claim.path) as shard:
            return self._record(shard, claim, result)

    @staticmethod
    def _record(shard: Shard, claim: Claim, result: Result) -> bool:
        i = shard.find(claim.row_id)
        if i is None:
            return False
        p = shard.n_params
        fields = shard.records[i]
        if (fields[p + STATUS] != "running" or fields[p + WORKER] != claim.worker
                or fields[p + ATTEMPTS] != str(claim.attempt)):
            return False  # reclaimed, reset or finished by someone else: never overwrite it
        if result.status == "not_run":
            shard.clear_run(i)
            fields[p + ATTEMPTS] = str(max(claim.attempt - 1, 0))  # a row given back does not count
            return True
        fields[p + STATUS] = result.status
        fields[p + FINISHED] = now_iso()
        fields[p + RUNTIME] = "" if result.runtime_s is None else f"{result.runtime_s:.3f}"
        fields[p + ERROR] = safe_cell(result.error) if result.error else ""
        for j, name in enumerate(shard.outcomes):
            value = result.metrics.get(name)
            fields[p + _NB + j] = "" if value is None else repr(float(value))
        shard.dirty = True
        return True

    # ---- editing

    def reset(self, select: Callable[[Shard, int], bool], dry_run: bool = False) -> int:
        """Make every selected valid row ``not_run`` (attempts 0). Returns how many rows changed."""
        total = 0
        for path in self.shard_paths():
            with self.transaction(path) as shard:
                hits = [i for i in shard.valid() if select(shard, i)]
                total += len(hits)
                if dry_run:
                    continue
                for i in hits:
                    shard.clear_run(i)
                    shard.set(i, ATTEMPTS, "0")
        return total

    def split(self, index: int, into: int) -> list[Path]:
        """Split shard ``index`` into ``into`` files; running rows stay where their worker will look."""
        if into < 2:
            raise GridError(f"--into must be at least 2, got {into}")
        path = self.shard_dir / shard_name(index)
        if not path.exists():
            names = ", ".join(str(shard_index(p)) for p in self.shard_paths()) or "none"
            raise GridError(f"no shard {index} in {self.shard_dir} (shards: {names})")
        with self.transaction(path) as shard:
            p = shard.n_params
            movable = [i for i in shard.valid() if shard.records[i][p + STATUS] != "running"]
            if len(movable) < into:
                raise GridError(f"{path} has {len(movable)} rows that are not running; cannot split it into {into}")
            chunk = -(-len(movable) // into)
            groups = [movable[k: k + chunk] for k in range(0, len(movable), chunk)]
            moved = {i for group in groups[1:] for i in group}
            next_index = max(shard_index(q) for q in self.shard_paths()) + 1
            pending = []
            # 1. the new shards, under names no worker reads; 2. the old shard without the moved rows;
            # 3. rename the new shards into place. A crash between 2 and 3 leaves *.pending files that
            #    `recover()` (run by make, work and status) puts into place.
            for k, group in enumerate(groups[1:]):
                target = self.shard_dir / shard_name(next_index + k)
                part = Shard(target, shard.header, [shard.records[i] for i in group], {}, [])
                tmp = target.with_name(target.name + ".pending")
                write_atomic(tmp, part.render())
                pending.append((tmp, target))
            shard.records = [r for i, r in enumerate(shard.records) if i not in moved]
            shard.errors = {}
            shard.dirty = True
        for tmp, target in pending:
            os.replace(tmp, target)
        mark_changed(self.grid_dir)
        return [path] + [target for _, target in pending]

    def recover(self) -> list[Path]:
        """Finish a split that was interrupted after its source shard was rewritten, and delete the locks
        that breakers killed in the middle of a break left (see :class:`ShardLock`). Returns the paths."""
        done = []
        for tmp in sorted(self.shard_dir.glob("shard-*.csv.pending")):
            os.replace(tmp, tmp.with_name(tmp.name[: -len(".pending")]))
            done.append(tmp)
        if self.shard_dir.is_dir():
            done += remove_orphaned_breaks(self.shard_dir, stale_s=self.lock_stale_s)
        return done

    # ---- making

    def existing_ids(self) -> dict[str, Path]:
        ids: dict[str, Path] = {}
        for shard in self.read_all():
            if shard.errors:
                line, message = shard.bad_rows()[0]
                raise ShardError(shard.path, f"{message} (fix or delete this row before `make`)", line)
            p = shard.n_params
            for fields in shard.records:
                ids[fields[p]] = shard.path
        return ids


@contextmanager
def _telling_what_was_lost(finish: tuple[Claim, Result] | None) -> Iterator[None]:
    """A failed write that carried a result loses that result: say so in the error (the row stays
    ``running`` in the shard, so it is reclaimed and run again once its worker is gone)."""
    try:
        yield
    except StoreWriteError as err:
        if finish is None or finish[1].status == "not_run":
            raise
        raise StoreWriteError(f"{err}; the result of row {finish[0].row_id} was not recorded, and the row runs "
                              f"again once this worker has stopped") from err


def write_shards(shard_dir: Path, header: list[str], rows: Iterable[tuple], max_len: int, first_index: int,
                 fsync: bool) -> list[Path]:
    """Write ``rows`` (tuples of cells for the parameter columns, then the row id) as new shard files."""
    n_outcomes = len(header) - header.index("row_id") - _NB
    blank_tail = ["not_run", "0", "", "", "", "", ""] + [""] * n_outcomes
    written = []
    buffer: list[list[str]] = []
    index = first_index

    def flush():
        nonlocal index
        path = shard_dir / shard_name(index)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(buffer)
        write_atomic(path, out.getvalue(), fsync=fsync)
        written.append(path)
        buffer.clear()
        index += 1

    for cells, row_id in rows:
        buffer.append([*cells, row_id, *blank_tail])
        if len(buffer) == max_len:
            flush()
    if buffer:
        flush()
    if written:
        mark_changed(Path(shard_dir).parent)
    return written


def header_for(params: list[str], outcomes: list[str]) -> list[str]:
    return [*params, *BOOK_COLUMNS, *outcomes]


def check_compatible(old: dict, new: dict, path: Path) -> None:
    """A grid can be extended, not changed under its finished rows."""
    for key, why in (("task", "the task"), ("fixed", "the fixed constants"), ("outcomes", "the outcome columns")):
        if canonical_json(old.get(key)) != canonical_json(new.get(key)):
            raise SpecError(path, key, f"{why} changed since this grid was made ({old.get(key)!r} → "
                                       f"{new.get(key)!r}); finished rows would no longer match. Make a new "
                                       f"grid (another `name:` or --runs DIR), or change it back")
