"""``gridrunner recover``: rebuild shards that were deleted, truncated or garbled, from their journals.

For every journal under ``runs/<grid>/journal/``, holding the shard's lock:

* the shard file is missing: it is written again with every row the journal holds, in their latest
  committed state;
* the file is unreadable (not UTF-8, no usable header) or looks half-written: the damaged file is kept
  as ``journal/<shard>.damaged-<time>``, and the shard is written again from the journal, with the
  changes of the whole rows that the file still holds merged in (as any hand save is merged);
* the file was saved by hand: it is merged (:mod:`gridrunner.reconcile`) like a worker would;
* otherwise nothing is done.

Rows the journal holds but whose file was lost are back as they were last committed: a ``running``
row of a dead worker is reclaimed as usual, a finished row keeps its result.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gridrunner.atomic import StoreWriteError, why_failed, write_atomic
from gridrunner.errors import ShardError
from gridrunner.journal import JOURNAL_DIR, Journal, append_note, commit_entry, text_sha
from gridrunner.reconcile import ShardHalfWritten, fingerprint, journal_base, looks_half_written, merge
from gridrunner.shardfile import STATUS, Shard
from gridrunner.store import take_lock


@dataclass
class Rebuilt:
    shard: str
    what: str  # "missing", "damaged", "merged", "whole"
    counts: Counter = field(default_factory=Counter)
    kept: str = ""  # where the damaged file was kept
    detail: str = ""

    def line(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        total = sum(self.counts.values())
        if self.what == "whole":
            return f"{self.shard}: whole, nothing to do"
        if self.what == "missing":
            return f"{self.shard}: the file was missing; rebuilt from the journal: {total} rows ({counts})"
        if self.what == "damaged":
            return (f"{self.shard}: {self.detail}; rebuilt from the journal: {total} rows ({counts}); the damaged "
                    f"file is kept as {self.kept}")
        return f"{self.detail} ({total} rows: {counts})"


def recover_grid(grid_dir: Path, lock_stale_s: float = 60.0) -> list[Rebuilt]:
    grid_dir = Path(grid_dir)
    shard_dir = grid_dir / "shards"
    report = []
    journals = sorted((grid_dir / JOURNAL_DIR).glob("shard-*.csv.jsonl"))
    for journal_file in journals:
        path = shard_dir / journal_file.name[: -len(".jsonl")]
        journal = Journal(path, fingerprint)
        lock = take_lock(path, lock_stale_s)
        try:
            report.append(_recover_one(path, journal))
        finally:
            lock.release()
    return report


def _recover_one(path: Path, journal: Journal) -> Rebuilt:
    state = journal.read_state()
    if state is None:
        return Rebuilt(path.name, "whole", detail="its journal holds no snapshot")
    p = state.row_id_column()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        records = list(state.latest.values())
        _write(path, journal, state.header, records, f"{path.name} was missing: rebuilt from the journal")
        return Rebuilt(path.name, "missing", Counter(r[p + STATUS] for r in records))
    why = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        text, why = "", f"not UTF-8 text ({err.reason} at byte {err.start})"
    if why is None:
        if text_sha(text) == state.head_sha:
            return Rebuilt(path.name, "whole")
        why = looks_half_written(path, text, len(state.latest))
    whole_part = None
    if why is None:
        try:
            user = Shard.parse(path, text)
        except ShardError as err:
            why = str(err).split(": ", 1)[-1]
        else:
            whole_part = user
    if why is None:
        records, errors, merged = merge(path, whole_part.records, whole_part.errors, state.latest, state.header,
                                        journal_base(state))
        shard = Shard(path, state.header, records, errors, list(range(2, len(records) + 2)))
        note = merged.describe(path.name)
        _write(path, journal, state.header, shard, note)
        return Rebuilt(path.name, "merged", Counter(r[p + STATUS] for k, r in enumerate(records) if k not in errors),
                       detail=note)
    kept = journal.path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, kept)
    records = list(state.latest.values())
    # The whole lines of a cut or garbled file may hold changes the user made: merge them, deleting nothing.
    lines = text.splitlines(keepends=True)
    if len(lines) > 1:
        if not lines[-1].endswith(("\n", "\r")):
            lines = lines[:-1]
        try:
            part = Shard.parse(path, "".join(lines))
        except ShardError:
            part = None
        if part is not None and part.header == state.header:
            merged_records, errors, _ = merge(path, part.records, part.errors, state.latest, state.header,
                                              _no_deletions(state))
            records = [r for k, r in enumerate(merged_records) if k not in errors]
    _write(path, journal, state.header, records, f"{path.name} {why}: rebuilt from the journal")
    return Rebuilt(path.name, "damaged", Counter(r[p + STATUS] for r in records), kept=str(kept), detail=why)


def _no_deletions(state):
    base = journal_base(state)
    base.knew = lambda rid, age: False
    return base


def _write(path: Path, journal: Journal, header, records, note: str) -> None:
    """Write ``records`` (a Shard, or rows) as the shard, journaled like any transaction (the lock is held)."""
    shard = records if isinstance(records, Shard) else Shard(path, header, [list(r) for r in records], {}, [])
    text = shard.render()
    state = journal.read_state()
    shard.base = {rid: list(cells) for rid, cells in state.latest.items()} if state is not None else {}
    shard.note = note
    try:
        journal.append(commit_entry(shard, text_sha(text)))
        write_atomic(path, text)
    except OSError as err:  # the journal keeps every committed row: recover again once the grid is writable
        raise StoreWriteError(f"{path}: cannot write the rebuilt shard ({why_failed(err)}); its journal keeps "
                              f"every committed row, so run `gridrunner recover` again once it can be written") from err
    append_note(path.parent, note)


__all__ = ["Rebuilt", "recover_grid", "ShardHalfWritten"]
