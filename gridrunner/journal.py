"""The journal: a durable record of every committed state of every row, one append-only file per shard.

``runs/<grid>/journal/shard-NNN.csv.jsonl``, beside the shards' folder. Each transaction that changes a
shard appends one line, under the shard's lock, and fsyncs it *before* the shard's rename, so every
state a reader can ever have seen in the shard (and so every state a user can have copied) is in it:

    {"n": 7, "sha": "<sha1 of the shard text committed>", "t": 1764630000.1,
     "rows": [[cells...], ...], "gone": ["<row_id>", ...], "note": "what a reconciliation did"}

``seen`` (a merge's) maps the id of each row whose reset or parameter change it applied to the
fingerprint of the user's row and the copy's age: that row is remembered as a state of the row, so the
same copy saved again is a stale copy (:mod:`gridrunner.reconcile`). ``rows`` holds the full cells (the shard header's order) of each row the transaction changed or
added, ``gone`` the row ids it removed. The first line is a snapshot: ``header`` and every row. ``n``
numbers the lines; ``sha`` lets a transaction tell, by hashing the file it read, whether the shard is
exactly what gridrunner last committed (the usual case) or was saved by someone else
(:mod:`gridrunner.reconcile` then merges it). A line whose ``sha`` is null was written while the
shard could not be (it looked half-written): it holds a result that the next reconciliation applies.

A writer killed between the journal's fsync and the shard's rename leaves a line for a state that
never reached the shard. That costs nothing: a claim it holds is a dead worker's (reclaimed as
usual) and a result it holds is real (the task ran) and is kept.

Kept small: once a shard has no ``not_run`` or ``running`` row, its journal is compacted into a
single snapshot line, which keeps the latest cells of each row and, of its earlier states, only a
16-hex-digit fingerprint and the line numbers during which it was current (what reconciliation
needs to recognise a stale copy).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from gridrunner.atomic import why_failed, write_atomic

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
NOTES_FILE = "notes.log"
_TAIL = 1 << 13  # bytes read from a journal's end to find its last line


def text_sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def journal_path(shard_path: Path) -> Path:
    return shard_path.parent.parent / JOURNAL_DIR / (shard_path.name + ".jsonl")


def shard_of(journal: Path) -> Path:
    return journal.parent.parent / "shards" / journal.name[: -len(".jsonl")]


@dataclass
class RowHistory:
    """Every state a row had: (fingerprint, first line, line after its last) — None while current."""

    states: list = field(default_factory=list)
    created: int = 0
    deleted: int | None = None  # the line that removed it, while it is gone

    def current(self):
        return self.states[-1] if self.states and self.states[-1][2] is None else None


@dataclass
class JournalState:
    """A shard's journal read whole: the latest cells of each live row and every row's history."""

    header: list[str]
    latest: dict  # row_id -> cells, in the order rows first appeared
    history: dict  # row_id -> RowHistory (deleted rows too)
    head_n: int
    head_sha: str | None
    pending: list = field(default_factory=list)  # row ids set by lines written while the shard was half-written

    def row_id_column(self) -> int:
        return self.header.index("row_id")


class Journal:
    """One shard's journal. Every method but :meth:`read_state` is called holding the shard's lock."""

    def __init__(self, shard_path: Path, fingerprint):
        self.path = journal_path(shard_path)
        self.fingerprint = fingerprint  # cells -> str, equal for cells that mean the same values
        # ((ino, size, mtime_ns), n, sha, ends with a line end) of the journal as we last read or wrote it
        self._head: tuple | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def head(self) -> tuple[int, str | None] | None:
        """(n, sha) of the last line, or None if there is no journal."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._head is not None and self._head[0] == key:
                return self._head[1], self._head[2]
            window = _TAIL
            while True:
                start = max(0, st.st_size - window)
                data = os.pread(fd, st.st_size - start, start)
                lines = data.splitlines()
                if start > 0:
                    lines = lines[1:]  # the first may be the end of a longer line
                for line in reversed(lines):
                    entry = _entry(line)
                    if entry is None:
                        continue  # a line cut short by a crash mid-append: the one before is the head
                    self._head = (key, entry["n"], entry.get("sha"), data.endswith(b"\n"))
                    return entry["n"], entry.get("sha")
                if start == 0:
                    return None
                window *= 4  # a snapshot line longer than the window
        finally:
            os.close(fd)

    def append(self, entry: dict, fsync: bool = True) -> None:
        """Append one line and fsync it (before the shard's rename)."""
        head = self.head()
        entry["n"] = 0 if head is None else head[0] + 1
        entry.setdefault("t", round(time.time(), 3))
        data = (json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        if head is None:
            self.path.parent.mkdir(exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            st = os.fstat(fd)
            known = (self._head is not None and self._head[0] == (st.st_ino, st.st_size, st.st_mtime_ns)
                     and self._head[3])
            if st.st_size and not known and os.pread(fd, 1, st.st_size - 1) != b"\n":
                os.write(fd, b"\n")  # a crash mid-append left a partial line: never glue onto it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._head = ((st.st_ino, st.st_size, st.st_mtime_ns), entry["n"], entry.get("sha"), True)
        if head is None and fsync:  # a new journal: its name is durable once its directory is
            dirfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)

    def snapshot(self, header: list[str], records: list[list[str]], sha: str | None, note: str = "",
                 fsync: bool = True, text: str | None = None) -> None:
        """Start the journal of a new shard (make, split) or of one written before journals existed. With
        ``text`` (a clean shard's whole CSV, as ``make`` writes it), the line holds that text instead of
        ``header`` and ``rows``: one JSON string is far cheaper to write for a million rows."""
        entry = {"sha": sha, "csv": text} if text is not None else {"sha": sha, "header": header, "rows": records}
        if note:
            entry["note"] = note
        self.append(entry, fsync=fsync)

    def read_state(self) -> JournalState | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        state = None
        for line in data.splitlines():
            entry = _entry(line)
            if entry is None:
                continue
            if "csv" in entry:
                table = [r for r in csv.reader(io.StringIO(entry.pop("csv"), newline="")) if r]
                entry["header"], entry["rows"] = table[0], table[1:]
            if state is None:
                if not isinstance(entry.get("header"), list) or "row_id" not in entry["header"]:
                    continue
                state = JournalState(entry["header"], {}, {}, -1, None)
            self._apply(state, entry)
        return state

    def _apply(self, state: JournalState, entry: dict) -> None:
        n = entry["n"]
        if "header" in entry:
            state.header = entry["header"]
        p = state.row_id_column()
        created = entry.get("created", {})
        for rid, spans in entry.get("hist", {}).items():  # a compacted snapshot: every state, with its lines
            state.history[rid] = RowHistory(states=[list(s) for s in spans], created=created.get(rid, 0),
                                            deleted=entry.get("deleted", {}).get(rid))
        for cells in entry.get("rows", []):
            rid = cells[p]
            history = state.history.get(rid)
            if history is None or history.deleted is not None:
                history = state.history[rid] = RowHistory(
                    states=history.states if history is not None else [], created=n)
            fp = self.fingerprint(cells)
            current = history.current()
            state.latest[rid] = cells
            if entry.get("sha", "") is None:
                state.pending.append(rid)
            if current is not None:
                if current[0] == fp:
                    continue
                current[2] = n
            history.states.append([fp, n, None])
        for rid in entry.get("gone", []):
            history = state.history.get(rid)
            if history is not None and history.deleted is None:
                current = history.current()
                if current is not None:
                    current[2] = n
                history.deleted = n
            state.latest.pop(rid, None)
        for rid, (fp, start) in entry.get("seen", {}).items():
            # A user's row that a merge applied (a reset, a parameter change): a state of the row since the
            # copy it came from, so that the same copy saved again is recognised as stale.
            history = state.history.get(rid)
            if history is None:
                continue
            span = [fp, start, n]
            if history.current() is not None:
                history.states.insert(len(history.states) - 1, span)
            else:
                history.states.append(span)
        state.head_n = n
        state.head_sha = entry.get("sha")

    def compact(self, state: JournalState, sha: str) -> None:
        """Replace the journal by one snapshot line of ``state`` (atomically): the latest cells of each
        row, and the fingerprints and line spans of every state each row (deleted ones too) ever had."""
        entry = {"n": state.head_n + 1, "sha": sha, "t": round(time.time(), 3), "header": state.header,
                 "rows": list(state.latest.values()),
                 "hist": {rid: h.states for rid, h in state.history.items() if h.states},
                 "created": {rid: h.created for rid, h in state.history.items() if h.created},
                 "deleted": {rid: h.deleted for rid, h in state.history.items() if h.deleted is not None}}
        write_atomic(self.path, json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n")
        self._head = None


def _entry(line: bytes) -> dict | None:
    """A journal line as its entry, or None for one that is not a journal entry (cut short by a crash,
    or garbled: ``recover`` reports a journal that holds no snapshot)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("n"), int) else None


def append_note(shard_dir: Path, message: str) -> None:
    """Add a line to the notes that ``status`` shows (what reconciliations did, results kept aside).

    The notes only tell what already happened (the journal and the shard hold the change), so a note that
    cannot be written (a read-only ``journal/``, a full disk) is a warning on stderr, not a failure of the
    change it describes."""
    path = Path(shard_dir).parent / JOURNAL_DIR / NOTES_FILE
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        path.parent.mkdir(exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {' '.join(message.split())}\n")
    except OSError as err:
        log.warning("%s: cannot add this note (%s): %s", path, why_failed(err), message)


def read_notes(shard_dir: Path, last: int = 10) -> list[str]:
    path = Path(shard_dir).parent / JOURNAL_DIR / NOTES_FILE
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return []
    return lines[-last:]


def commit_entry(shard, sha: str) -> dict:
    from gridrunner.reconcile import same_value

    """The journal line of a transaction: the rows of ``shard`` that differ from ``shard.base`` (what the
    transaction read) and the ids of the rows it no longer holds."""
    p = shard.n_params
    records, errors, base = shard.records, shard.errors, shard.base
    changed = []
    if isinstance(base, list) and len(base) == len(records) and not errors and getattr(shard, "merge", None) is None:
        for old, new in zip(base, records):
            if old != new:
                if old[p] != new[p]:
                    break
                changed.append(list(new))
        else:
            return {"sha": sha, "rows": changed}
        changed = []
    if isinstance(base, list):
        base = {r[p]: r for r in base if len(r) > p}
    base = base or {}
    ids = set()
    for i in shard.valid():
        new = records[i]
        ids.add(new[p])
        if base.get(new[p]) != new:
            changed.append(list(new))
    # A row hidden behind a bad row (its id or its parameters on a line that breaks the contract) is not
    # gone: the user may fix the line, and ``recover`` can still bring the row back.
    hidden = {r[p] for i, r in enumerate(records) if i in errors and len(r) > p}
    hidden_params = {tuple(map(same_value, r[:p])) for i, r in enumerate(records) if i in errors and len(r) > p}
    gone = [rid for rid, old in base.items()
            if rid not in ids and rid not in hidden and tuple(map(same_value, old[:p])) not in hidden_params]
    entry = {"sha": sha, "rows": changed}
    if gone:
        entry["gone"] = gone
    note = getattr(shard, "note", "")
    if note:
        entry["note"] = note
    merge = getattr(shard, "merge", None)
    if merge is not None and merge.applied:
        entry["seen"] = {rid: [fp, merge.age] for rid, fp in merge.applied.items()}
    return entry


def compact_if_long(journal: Journal, sha: str) -> None:
    """Compact the journal of a finished shard into one snapshot line, if it holds more than that."""
    head = journal.head()
    if head is None:
        return
    state = journal.read_state()
    if state is None or state.head_n == 0 or _lines(journal.path) <= 1:
        return
    journal.compact(state, sha)


def _lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return fh.read().count(b"\n")
