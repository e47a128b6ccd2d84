"""``gridrunner recover``: rebuild shards that were deleted, truncated or garbled, from their journals.

The ``shards/`` folder is made again if it was deleted, and a split cut short is finished. Then, for
every journal under ``runs/<grid>/journal/``, holding the shard's lock:

* the shard file is missing: it is written again with every row the journal holds, in their latest
  committed state;
* the journal is empty or holds no readable snapshot (garbled): a shard file that is there and whole is
  left as it is, and its journal is started again from it (the old one kept as
  ``journal/<shard>.jsonl.damaged-<time>``); one that is missing or unreadable cannot be rebuilt, and is
  reported as lost;
* the file is unreadable (not UTF-8, no usable header) or looks half-written: the damaged file is kept
  as ``journal/<shard>.damaged-<time>``, and the shard is written again from the journal, with the
  changes of the whole rows that the file still holds merged in (as any hand save is merged);
* the file was saved by hand: it is merged (:mod:`gridrunner.reconcile`) like a worker would;
* otherwise nothing is done.

Rows the journal holds but whose file was lost are back as they were last committed: a ``running``
row of a dead worker is reclaimed as usual, a finished row keeps its result.

A shard deleted together with its journal leaves no record of its own. What can still be known: make
and split number shards without gaps, so a number missing below the highest shard or journal was a
shard; and the saved spec says which rows the grid was made with, so its rows that no shard file and no
journal ever held (a journal keeps the rows deleted by hand too) are the rows that were lost. Both are
reported as lost when the spec has such rows, or when the spec cannot be read to check; a gap whose rows
are all elsewhere (a deleted shard whose rows ``make`` added again) is not. ``recover`` says why for each
shard it cannot rebuild, and the CLI then exits 1.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gridrunner.atomic import StoreWriteError, why_failed, write_atomic
from gridrunner.errors import GridError, ShardError
from gridrunner.grid import read_resolved, saved_spec
from gridrunner.journal import Journal, append_note, commit_entry, text_sha
from gridrunner.reconcile import ShardHalfWritten, fingerprint, journal_base, looks_half_written, merge
from gridrunner.shardfile import STATUS, Shard, shard_index, shard_name
from gridrunner.spec import expand
from gridrunner.store import GridStore, take_lock


@dataclass
class Rebuilt:
    shard: str  # the shard's file name; "" for rows of the spec that no shard holds
    what: str  # "missing", "damaged", "merged", "whole", "unjournaled" (no readable journal), "lost"
    counts: Counter = field(default_factory=Counter)
    kept: str = ""  # where the damaged file was kept
    detail: str = ""
    #: Every row id the shard's journal holds (deleted rows too): what the spec's rows are checked against.
    known: set = field(default_factory=set, repr=False)
    #: Of a lost shard: the files that hold nothing readable, which keep ``make`` from adding its rows again.
    in_the_way: list = field(default_factory=list)

    def line(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        total = sum(self.counts.values())
        if self.what == "whole":
            return f"{self.shard}: whole, nothing to do"
        if self.what == "unjournaled":
            kept = f" (the old one is kept as {self.kept})" if self.kept else ""
            return (f"{self.shard}: {self.detail}; started it again from the file, which is whole and left as it "
                    f"is: {total} rows ({counts}){kept}")
        if self.what == "lost":
            return f"{self.shard}: {self.detail}: cannot be rebuilt" if self.shard else self.detail
        if self.what == "missing":
            return f"{self.shard}: the file was missing; rebuilt from the journal: {total} rows ({counts})"
        if self.what == "damaged":
            return (f"{self.shard}: {self.detail}; rebuilt from the journal: {total} rows ({counts}); the damaged "
                    f"file is kept as {self.kept}")
        return f"{self.detail} ({total} rows: {counts})"


def recover_grid(grid_dir: Path, lock_stale_s: float = 60.0) -> list[Rebuilt]:
    """Rebuild what can be rebuilt (see the module docstring); one entry per shard that has a journal
    or is lost, in shard order, then one for the spec's rows that no shard holds, if any."""
    store = GridStore(Path(grid_dir), lock_stale_s=lock_stale_s)
    # Deleted with every shard in it: the journals beside it hold the rows. Then a split cut short.
    store.shard_dir.mkdir(exist_ok=True)
    store.recover()
    report = []
    for path in store.journaled_shards():
        journal = Journal(path, fingerprint)
        lock = take_lock(path, lock_stale_s)
        try:
            report.append(_recover_one(path, journal))
        finally:
            lock.release()
    report += _untraced(store, report)
    return sorted(report, key=lambda r: (not r.shard, shard_index(Path(r.shard)) if r.shard else 0))


def lost_summary(grid_dir: Path, report: list[Rebuilt]) -> str | None:
    """The error line for the shards and rows ``recover`` could not rebuild, or None if there are none."""
    lost = [r for r in report if r.what == "lost"]
    if not lost:
        return None
    shards = [r.shard for r in lost if r.shard]
    in_the_way = [name for r in lost for name in r.in_the_way]
    make = f"`gridrunner make {_source_spec(grid_dir)}`"
    if not shards:
        return f"{grid_dir}: some rows of the spec are in no shard (see above); {make} adds them again as not_run"
    move = f"move {', '.join(in_the_way)} out of the grid (nothing in them can be read), then " if in_the_way else ""
    return (f"{grid_dir}: cannot rebuild {', '.join(shards)} (see above); their rows are lost unless you have copies "
            f"of the files to put back in {Path(grid_dir) / 'shards'}/; otherwise {move}{make} adds the rows that no "
            f"shard holds again as not_run")


def _recover_one(path: Path, journal: Journal) -> Rebuilt:
    try:
        state = journal.read_state()
        why = None if state is not None else _why_no_snapshot(journal)
    except OSError as err:
        state, why = None, f"its journal {journal.path} cannot be read ({why_failed(err)})"
    if state is None:
        if path.exists():
            return _journal_again(path, journal, why)
        return Rebuilt(path.name, "lost", detail=f"the file is missing, and {why}", in_the_way=[str(journal.path)])
    known = set(state.history) | set(state.latest)
    rebuilt = _rebuild(path, journal, state)
    rebuilt.known = known
    return rebuilt


def _journal_again(path: Path, journal: Journal, why: str) -> Rebuilt:
    """The file is there, but its journal holds nothing readable: start the journal again from the file
    (as the shard's next transaction would, but a finished shard has none), keeping the old one beside
    it, so that the shard can be rebuilt again if it is lost later. A file that cannot be read either is
    lost: nothing is written."""
    try:
        text = path.read_bytes().decode("utf-8")
        shard = Shard.parse(path, text)
        unwhole = looks_half_written(path, text, 0)
    except UnicodeDecodeError as err:
        unwhole = f"not UTF-8 text ({err.reason} at byte {err.start})"
    except ShardError as err:
        unwhole = err.message
    except OSError as err:
        unwhole = why_failed(err)
    if unwhole is not None:
        return Rebuilt(path.name, "lost", detail=f"{why}, and the file cannot be read ({unwhole})",
                       in_the_way=[str(path), str(journal.path)])
    kept = ""
    if journal.path.stat().st_size:
        kept = str(journal.path.with_name(f"{journal.path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"))
        os.replace(journal.path, kept)
    valid = [shard.records[i] for i in shard.valid()]
    journal.snapshot(shard.header, valid, text_sha(text), note=f"{path.name}: journal started again by recover")
    p = shard.n_params
    return Rebuilt(path.name, "unjournaled", Counter(r[p + STATUS] for r in valid), kept=kept, detail=why,
                   known={r[p] for r in shard.records if len(r) > p})


def _why_no_snapshot(journal: Journal) -> str:
    if journal.path.stat().st_size == 0:
        return f"its journal {journal.path} is empty"
    return f"its journal {journal.path} holds no readable snapshot of the shard (it is garbled)"


def _untraced(store: GridStore, report: list[Rebuilt]) -> list[Rebuilt]:
    """What can be known of shards deleted together with their journals: the gaps in the shards'
    numbering, and the spec's rows that no shard file and no journal holds (see the module docstring)."""
    indices = {shard_index(p) for p in store.shard_paths() + store.journaled_shards()}
    gaps = [shard_name(i) for i in range(max(indices, default=-1)) if i not in indices]
    known = set().union(*(r.known for r in report))
    for path in store.shard_paths():
        try:
            shard = store.read(path)
        except GridError:
            continue  # unreadable and with no journal: a worker and `status` report it
        p = shard.n_params
        known.update(fields[p] for fields in shard.records if len(fields) > p)
    try:
        untraced = [row.row_id for row in expand(saved_spec(store.grid_dir)) if row.row_id not in known]
    except GridError as err:
        if not gaps:
            return []
        why = f"whether its rows are in another shard cannot be checked ({err})"
        return [Rebuilt(name, "lost", detail=f"no file and no journal, though later shards are there; {why}")
                for name in gaps]
    if not untraced:
        return []  # every row is somewhere: a gap is a shard whose rows `make` added again elsewhere
    lost = [Rebuilt(name, "lost", detail="no file and no journal, though later shards are there") for name in gaps]
    sample = ", ".join(untraced[:5]) + (" ..." if len(untraced) > 5 else "")
    lost.append(Rebuilt("", "lost", detail=f"{len(untraced)} row(s) of the spec are in no readable shard and no "
                                           f"journal, so their results, if they had any, are lost: {sample}"))
    return lost


def _source_spec(grid_dir: Path) -> str:
    """The spec file that made the grid, as ``spec.yaml`` records it, if it is still there; else ``SPEC``."""
    try:
        source = read_resolved(grid_dir).get("source")
    except GridError:
        return "SPEC"
    return source if isinstance(source, str) and Path(source).is_file() else "SPEC"


def _rebuild(path: Path, journal: Journal, state) -> Rebuilt:
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
        shard.merge = merged  # its applied changes are journaled as seen (a later save of the copy is stale)
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


__all__ = ["Rebuilt", "recover_grid", "lost_summary", "ShardHalfWritten"]
