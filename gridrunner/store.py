"""The store: the only code that reads or writes shard files and their locks.

Layout of a grid directory::

    runs/<name>/spec.yaml            the resolved spec (every default filled in)
    runs/<name>/spec.source.yaml     the user's file as it was at the last `make`
    runs/<name>/shards/shard-NNN.csv the rows (the CSV contract, see the README)
    runs/<name>/rows/<row_id>/       per-row files the worker and the task write
    runs/<name>/journal/             every committed row state, per shard (:mod:`gridrunner.journal`)

Every change to a shard is one transaction: take the shard's lock; read the file (if it is not what
gridrunner last committed, someone saved it by hand: merge it with the journal first,
:mod:`gridrunner.reconcile`); change rows in memory; append the changed rows to the journal and fsync
it; write a temporary file in the same directory; check the lock is still ours and the file is still
the one read (a hand save meanwhile stays, and the next transaction merges it); rename it over the
shard; release the lock. A reader never takes the lock: rename is atomic (also over NFS), so a reader
sees the old file or the new one, never a mix. The journal line is the durable record, so the
temporary file is not fsynced: after a machine crash the shard may be an older version, which the next
transaction merges like any stale copy.

The lock's algorithm and its race windows are in :mod:`gridrunner.lock`, the file format in
:mod:`gridrunner.shardfile`, the atomic replacement in :mod:`gridrunner.atomic`. This module holds
the transactions: claim a row, record a result, give a row back, reset, split, and the grid's layout.

Shards stay small (``max_len`` rows), so a transaction reads and writes one small file and nothing here
scans the whole grid per row.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from gridrunner.atomic import (StoreWriteError, estale_again, fsync_directory, read_bytes, remove_orphaned_temps,
                               why_failed, write_atomic)
from gridrunner.errors import GridError, ShardError, SpecError
from gridrunner.journal import JOURNAL_DIR, Journal, append_note, commit_entry, compact_if_long, text_sha
from gridrunner.lock import BROKEN, HOST, ShardLock, pid_alive, remove_orphaned_breaks
from gridrunner.shardfile import (_NB, ATTEMPTS, ERROR, FINISHED, ROW_ID, RUNTIME, SHARD_GLOB, STARTED, STATUS,
                                  WORKER, Shard, header_for, now_iso, parse_iso, safe_cell, shard_index, shard_name)
from gridrunner.reconcile import ShardHalfWritten, fingerprint, merged_view, reconcile_file
from gridrunner.spec import canonical_json

__all__ = [  # re-exported from the modules above, for `from gridrunner.store import X`
    "BROKEN", "HOST", "ShardLock", "pid_alive", "remove_orphaned_breaks", "StoreWriteError", "remove_orphaned_temps",
    "why_failed", "write_atomic", "fsync_directory", "read_bytes", "ATTEMPTS", "ERROR", "FINISHED", "ROW_ID", "RUNTIME", "SHARD_GLOB", "STARTED",
    "STATUS", "WORKER", "Shard", "header_for", "now_iso", "parse_iso", "safe_cell", "shard_index", "shard_name",
    "SHARD_DIR", "ROWS_DIR", "SPEC_FILE", "SOURCE_FILE", "Claim", "Result", "ClaimScan", "GridStore",
    "write_shards", "check_compatible", "CHANGED_FILE", "mark_changed",
]

SHARD_DIR = "shards"
ROWS_DIR = "rows"
SPEC_FILE = "spec.yaml"
SOURCE_FILE = "spec.source.yaml"
#: ``<grid>/.changed``, touched after every write of a shard: a watcher learns of a change with one ``stat``.
CHANGED_FILE = ".changed"
#: A journal's name, ``shard-NNN.csv.jsonl``; the group is its shard's file name.
_JOURNAL_NAME = re.compile(r"(shard-\d+\.csv)\.jsonl")
log = logging.getLogger("gridrunner.store")


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
    #: Reclaimed from a dead holder: (its worker, its claim time, its attempt), to find a result it left
    #: unrecorded (:mod:`gridrunner.outbox`); None for a row that was not running.
    previous: tuple[str, str, int] | None = None


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
    half_written: bool = False  # the file looks half-written (a save in progress): look again soon


def take_lock(path: Path, stale_s: float) -> ShardLock:
    """The lock of shard ``path``, acquired. A lock file that cannot be created (a read-only grid, a full disk)
    is a StoreWriteError that names the shard and why: the shard was not touched."""
    lock = ShardLock(str(path) + ".lock", stale_s=stale_s)
    try:
        lock.acquire()
    except OSError as err:
        raise StoreWriteError(f"{path}: cannot create the shard's lock file ({why_failed(err)}); the shard keeps "
                              f"its previous content") from err
    return lock


class GridStore:
    """All shard I/O of one grid directory."""

    def __init__(self, grid_dir: str | Path, lock_stale_s: float = 60.0):
        self.grid_dir = Path(grid_dir)
        self.shard_dir = self.grid_dir / SHARD_DIR
        self.lock_stale_s = lock_stale_s
        # path -> (text, header, records, sha) of shards this process wrote last: see read()
        self._written: dict[Path, tuple[str, list[str], list[list[str]], str]] = {}
        self._journals: dict[Path, Journal] = {}
        self._read_stat: dict[Path, tuple] = {}  # path -> (ino, size, mtime_ns) of the file as last read
        self._reported: set[tuple[Path, int, str]] = set()  # bad rows already reported by claim()
        self._views: dict[Path, tuple] = {}  # path -> ((text sha, journal head), merged view or None): view()

    # ---- files

    def shard_paths(self) -> list[Path]:
        return sorted(self.shard_dir.glob(SHARD_GLOB), key=shard_index)

    def journaled_shards(self) -> list[Path]:
        """The shard of every journal under ``journal/``, in shard order, whether its file is there or not."""
        names = (_JOURNAL_NAME.fullmatch(p.name) for p in (self.grid_dir / JOURNAL_DIR).glob("shard-*.csv.jsonl"))
        return sorted((self.shard_dir / m.group(1) for m in names if m), key=shard_index)

    def missing_shards(self) -> list[Path]:
        """Shards whose journal is there but whose file is not (deleted by hand, or with the whole
        ``shards/`` folder): their rows are in the journal, and only ``gridrunner recover`` writes them
        back. A split's ``.pending`` file counts as the shard (:meth:`recover` puts it into place)."""
        return [p for p in self.journaled_shards()
                if not p.exists() and not p.with_name(p.name + ".pending").exists()]

    def next_index(self) -> int:
        """The number of the next new shard: past every shard file and every journal, so that a new
        shard never takes the name, and so the journal, of one that was deleted."""
        return max((shard_index(p) for p in self.shard_paths() + self.journaled_shards()), default=-1) + 1

    def row_dir(self, row_id: str) -> Path:
        if not row_id or not all(c.isalnum() or c in "-_" for c in row_id):
            raise ShardError(self.shard_dir, f"row_id {row_id!r} is not a safe directory name")
        return self.grid_dir / ROWS_DIR / row_id

    def read(self, path: Path) -> Shard:
        """The shard as it is on disk, parsed (no lock, no reconciliation: for readers)."""
        text = self._read_text(path)
        written = self._written.get(path)
        if written is not None and written[0] == text:
            # Unchanged since this process wrote it (the usual case: a worker on its own shard), so its
            # parse is the one we hold: skip the parse and the row-id checks, which cost more than the I/O.
            _, header, records, _sha = written
            return Shard(path, header, [r[:] for r in records], {}, list(range(2, len(records) + 2)))
        return Shard.parse(path, text)

    def view(self, path: Path) -> Shard:
        """For readers that report the grid's state (``status``, ``gridrunner.load``; no lock, nothing written):
        the shard as the next transaction will see it. A file saved by hand since gridrunner last wrote it
        (a stale copy saved over newer results, say) is merged with the journal in memory
        (:func:`gridrunner.reconcile.merged_view`), and the shard's ``unmerged`` is True; one that looks
        half-written is shown as it is. The merge is computed only for a file that differs from the
        journal's head, and once per version of the file and of the journal (``status --watch`` looks
        every few seconds): an unchanged shard costs one hash of its text."""
        text = self._read_text(path)
        written = self._written.get(path)
        head = self.journal(path).head()  # a cached tail read
        if written is not None and written[0] == text and head is not None and head[1] == written[3]:
            return self.read(path)
        sha = text_sha(text)
        if head is None or head[1] == sha:
            return Shard.parse(path, text)
        key = (sha, head)
        cached = self._views.get(path)
        if cached is None or cached[0] != key:
            merged = merged_view(path, text, self.journal(path))
            if merged is not None:
                merged.unmerged = True
            cached = self._views[path] = (key, merged)
            if len(self._views) > 64:
                del self._views[next(iter(self._views))]
        merged = cached[1]
        if merged is None:
            return Shard.parse(path, text)
        shard = Shard(path, merged.header, [r if i in merged.errors else list(r) for i, r in enumerate(merged.records)],
                      dict(merged.errors), list(merged.lines))
        shard.note, shard.unmerged = merged.note, True
        return shard

    def _read_text(self, path: Path) -> str:
        start = time.monotonic()
        while True:
            try:
                with open(path, "rb") as fh:  # bytes: a quoted \r stays intact
                    st = os.fstat(fh.fileno())
                    data = fh.read()
                self._read_stat[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
                return data.decode("utf-8")
            except FileNotFoundError:
                raise ShardError(path, "no such shard") from None
            except UnicodeDecodeError as err:
                raise ShardError(path, f"not UTF-8 text: {err}") from None
            except OSError as err:
                if not estale_again(err, start):  # NFS: replaced by another client as we read it
                    raise

    def journal(self, path: Path) -> Journal:
        journal = self._journals.get(path)
        if journal is None:
            journal = self._journals[path] = Journal(path, fingerprint)
        return journal

    def _read_committed(self, path: Path) -> Shard:
        """Holding the lock: the shard with every committed state in it. If someone else saved the file
        since gridrunner last committed it, it is merged with the journal first (:mod:`gridrunner.reconcile`)."""
        text = self._read_text(path)
        journal = self.journal(path)
        head = journal.head()
        written = self._written.get(path)
        if written is not None and written[0] == text and head is not None and head[1] == written[3]:
            _, header, records, _sha = written
            shard = Shard(path, header, [r[:] for r in records], {}, list(range(2, len(records) + 2)))
            shard.base = records
            return shard
        sha = text_sha(text)
        if head is None or head[1] == sha:
            shard = Shard.parse(path, text)
            shard.base = [r[:] for r in shard.records]
            if head is None:  # a shard written before journals, or a new one: what it holds is committed
                journal.snapshot(shard.header, [shard.records[i] for i in shard.valid()], sha)
            return shard
        shard, note = reconcile_file(path, text, journal, self._read_text)
        merge = getattr(shard, "merge", None)
        if merge is not None:
            self._keep_aside(shard, merge.deleted_finished)
        if note:
            log.warning("%s", note)
            append_note(self.shard_dir, note)
        return shard

    def _keep_aside(self, shard: Shard, deleted: dict[str, list[str]]) -> None:
        """Before the merge that deletes them is committed: keep the result of each row the user deleted that
        finished after their copy was taken (it was running there; its worker recorded it while the save
        waited to be merged) as ``rows/<id>/stale-result-<worker>.json``, as a deleted running row's worker
        keeps its own (:meth:`gridrunner.worker.Worker._note`)."""
        import json

        p = shard.n_params
        for rid, cells in deleted.items():
            worker = cells[p + WORKER]
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker)
            metrics = {}
            for name, cell in zip(shard.outcomes, cells[p + _NB:]):
                try:
                    metrics[name] = float(cell) if cell else None
                except ValueError:
                    metrics[name] = None
            runtime = cells[p + RUNTIME]
            row_dir = self.row_dir(rid)
            row_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(row_dir / f"stale-result-{safe}.json", json.dumps(
                {"worker": worker, "attempt": int(cells[p + ATTEMPTS] or 0), "status": cells[p + STATUS],
                 "metrics": metrics, "error": cells[p + ERROR], "runtime_s": float(runtime) if runtime else None},
                indent=1))

    def _unchanged_since_read(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        return self._read_stat.get(path) == (st.st_ino, st.st_size, st.st_mtime_ns)

    def _remember(self, path: Path, text: str, shard: Shard, sha: str) -> None:
        """Keep what this process just wrote to ``path``, if it is clean, for :meth:`read`."""
        self._written.pop(path, None)
        if shard.errors or "\r" in text or text.count("\n") != len(shard.records) + 1:
            return  # bad rows or multi-line cells: their line numbers come from a real parse
        self._written[path] = (text, shard.header, [r[:] for r in shard.records], sha)
        if len(self._written) > 8:
            del self._written[next(iter(self._written))]

    def holds(self, path: Path, row_id: str) -> bool:
        """Without the lock: does the shard (or, if it cannot be read, its journal) still hold ``row_id``."""
        try:
            return self.read(path).find(row_id) is not None
        except ShardError:
            state = self.journal(path).read_state()
            return state is not None and row_id in state.latest

    def note(self, message: str) -> None:
        """Add a line to the notes that ``status`` shows."""
        append_note(self.shard_dir, message)

    def glance(self, path: Path) -> tuple[bool, bool]:
        """Without the lock: (may ``path`` hold ``not_run`` rows, may it hold ``running`` rows).

        A shard is replaced atomically, so this reads one whole version. A status cell is one of the
        words in STATUSES, quoted or not, so (False, False) means that version has nothing to claim;
        True may be a false alarm (a parameter value containing the word), which the claim settles.
        Lets a worker pass over finished shards without taking their locks. A finished shard that was
        saved by hand since gridrunner last wrote it gives (True, True): the claim merges the save.
        """
        data = read_bytes(path)  # ESTALE retried
        may_open, may_run = b"not_run" in data, b"running" in data
        if not may_open and not may_run:
            head = self.journal(path).head()
            if head is not None and hashlib.sha1(data).hexdigest()[:16] != head[1]:
                return True, True
        return may_open, may_run

    def read_all(self) -> list[Shard]:
        return [self.read(p) for p in self.shard_paths()]

    @contextmanager
    def transaction(self, path: Path) -> Iterator[Shard]:
        """Lock ``path``, yield it parsed; if the body changed it (``shard.dirty``), write it back atomically."""
        lock = take_lock(path, self.lock_stale_s)
        if lock.broke_stale:
            remove_orphaned_temps(path)
            remove_orphaned_breaks(path.parent, path.name, self.lock_stale_s)
        try:
            shard = self._read_committed(path)
            yield shard
            if shard.dirty:
                text = shard.render()
                sha = text_sha(text)
                try:
                    journal = self.journal(path)
                    journal.append(commit_entry(shard, sha))  # fsynced before the rename
                    # The journal line is the durable record, so the shard's own file is not fsynced: after a
                    # crash it is this version or an older one, which the next transaction merges as a stale copy.
                    replaced = write_atomic(path, text, lock, fsync=False,
                                            still_as_read=lambda: self._unchanged_since_read(path))
                except OSError as err:
                    self._written.pop(path, None)
                    raise StoreWriteError(f"{path}: cannot write the shard ({why_failed(err)}); it keeps its previous "
                                          f"content") from err
                except BaseException:
                    self._written.pop(path, None)
                    raise
                mark_changed(self.grid_dir)  # committed (the journal line): a watcher looks again
                if not replaced:
                    # Saved by someone else while this transaction ran: their file stays, and the next
                    # transaction merges it with the journal, where this one's changes are the newest state.
                    self._written.pop(path, None)
                    return
                self._remember(path, text, shard, sha)
                if "not_run" not in text and "running" not in text:
                    compact_if_long(journal, sha)  # a finished shard: its journal becomes one snapshot line
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
        try:
            recorded, scan, behind = self._claim(path, worker, is_stale, max_attempts, finish, scan)
        except ShardHalfWritten as err:
            if finish is None:
                raise
            scan.half_written = True  # a save in progress: the worker looks again soon
            return self._record_in_journal(*finish, **_why(err)), scan
        if behind is not None:
            recorded = self._record_in_journal(*finish, why=behind, then=_ONCE_FIXED)
        return recorded, scan

    def _claim(self, path, worker, is_stale, max_attempts, finish, scan):
        recorded = None
        behind = None
        with _telling_what_was_lost(finish), self.transaction(path) as shard:
            self._report_bad_rows(shard)
            if finish is not None:
                recorded = self._record(shard, *finish)
                if not recorded:
                    behind = _behind_bad_row(shard, finish[0].row_id)
            p = shard.n_params
            for i in shard.valid():
                fields = shard.records[i]
                status = fields[p + STATUS]
                previous = None
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
                    previous = (holder, fields[p + STARTED], attempts)
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
                scan.claim = Claim(path, fields[p], shard.row_params(i), attempt, worker, started_at,
                                   previous=previous)
                break
        return recorded, scan, behind

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
        """Write a result for ``claim``. False (and nothing written) if the row is no longer ours.

        A shard that cannot be merged now, because it looks half-written or because a hand edit made it
        unusable (its header deleted, a column added or removed, the file removed), still gets the
        result: in its journal, as for a half-written file. The worker goes on with other shards, and
        the row never runs again: the next transaction on the file once it is fixed, or ``recover``,
        finds the result there. So does a row whose line a hand edit made a bad row (a typo in one of its
        cells): the line cannot hold the result, and a bad line is no deletion."""
        try:
            with _telling_what_was_lost((claim, result)), self.transaction(claim.path) as shard:
                if self._record(shard, claim, result):
                    return True
                behind = _behind_bad_row(shard, claim.row_id)
        except ShardHalfWritten as err:
            return self._record_in_journal(claim, result, **_why(err))
        except ShardError as err:
            return self._record_in_journal(claim, result, why=f"is unusable ({err.message})")
        return behind is not None and self._record_in_journal(claim, result, why=behind, then=_ONCE_FIXED)

    def _record_in_journal(self, claim: Claim, result: Result, why: str = "looks half-written (an in-place save "
                                                                          "in progress?)",
                           then: str = "merged into the file once it is whole") -> bool:
        """The shard cannot be written now (an in-place save in progress, or a hand edit that broke it), or
        cannot hold the result (the row's line is a bad row): record the result in the journal only, if
        the journal's latest state of the row is still this claim (a row the user deleted is gone from
        it). The next transaction that finds the file whole, or the row's line fixed, merges it in (the
        fixed line is a stale copy of the claim, and the result is newer); ``recover`` rebuilds the file."""
        path = claim.path
        with ShardLock(str(path) + ".lock", stale_s=self.lock_stale_s):
            journal = self.journal(path)
            state = journal.read_state()
            cells = state.latest.get(claim.row_id) if state is not None else None
            if cells is None:
                return False
            shard = Shard(path, state.header, [list(cells)], {}, [2])
            if not self._record(shard, claim, result):
                return False
            journal.append({"sha": None, "rows": [shard.records[0]]})
        self._written.pop(path, None)
        log.warning("%s %s: the result of row %s is kept in its journal and %s (`gridrunner recover` rebuilds "
                    "it)", path.name, why, claim.row_id, then)
        return True

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
            next_index = self.next_index()
            pending = []
            # 1. the new shards, under names no worker reads; 2. the old shard without the moved rows;
            # 3. rename the new shards into place. A crash between 2 and 3 leaves *.pending files that
            #    `recover()` (run by make, work and status) puts into place.
            for k, group in enumerate(groups[1:]):
                target = self.shard_dir / shard_name(next_index + k)
                part = Shard(target, shard.header, [shard.records[i] for i in group], {}, [])
                tmp = target.with_name(target.name + ".pending")
                text = part.render()
                start_journal(target, part.header, part.records, text)
                write_atomic(tmp, text)
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


def _why(err: ShardHalfWritten) -> dict:
    return {"why": err.short} if err.short else {}


#: How :meth:`GridStore._record_in_journal` ends its warning for a row behind a bad row.
_ONCE_FIXED = "written to the file once its line is fixed"


def _behind_bad_row(shard: Shard, row_id: str) -> str | None:
    """Why a row that ``shard`` holds no valid line for may still be there: a bad row (a hand edit that
    broke the row's line, such as a typo in its ``attempts`` cell) that the merge does not take for a
    deletion (:func:`gridrunner.reconcile.merge` keeps every row hidden behind a bad row). None when the
    shard has no bad row: the row was deleted. The journal decides which rows are hidden, so the caller
    records the result there only if the journal still holds the row as this claim."""
    if not shard.errors or shard.find(row_id) is not None:
        return None
    p = shard.n_params
    for i, message in sorted(shard.errors.items()):
        record = shard.records[i]
        if len(record) > p and record[p] == row_id:
            return f"holds row {row_id} only as a bad row (line {shard.lines[i]}: {message})"
    return f"holds no valid line for row {row_id}, and has bad rows (one may be its line)"


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
        start_journal(path, header, buffer, out.getvalue(), fsync=fsync)
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


def start_journal(path: Path, header: list[str], records: list[list[str]], text: str, fsync: bool = True) -> None:
    """The first line of a new shard's journal. A journal left by an earlier shard of that name (deleted
    by hand) is kept beside it, renamed, for ``recover``'s report."""
    journal = Journal(path, fingerprint)
    if journal.exists():
        os.replace(journal.path, journal.path.with_name(f"{journal.path.name}.replaced-{int(time.time())}"))
    journal.snapshot(header, records, text_sha(text), fsync=fsync, text=text)


def check_compatible(old: dict, new: dict, path: Path) -> None:
    """A grid can be extended, not changed under its finished rows."""
    for key, why in (("task", "the task"), ("fixed", "the fixed constants"), ("outcomes", "the outcome columns")):
        if canonical_json(old.get(key)) != canonical_json(new.get(key)):
            raise SpecError(path, key, f"{why} changed since this grid was made ({old.get(key)!r} → "
                                       f"{new.get(key)!r}); finished rows would no longer match. Make a new "
                                       f"grid (another `name:` or --runs DIR), or change it back")
