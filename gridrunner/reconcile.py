"""Reconciliation: merging a shard that someone else saved (an editor, a spreadsheet, a script) with
the states gridrunner committed, so that a hand edit never loses a result or a live claim and never
makes a finished row run again, and every change the user meant is applied.

The rules, for a shard file ``F`` that is not what gridrunner last committed, against the journal
(:mod:`gridrunner.journal`), whose latest state of each row is ``L``:

* **Equal values.** Cells are compared by what they mean: numbers by value to 15 significant digits
  (``0.0001`` = ``1e-4``, ``3`` = ``3.0``, LibreOffice's ``0.588417154046807`` = ``0.5884171540468066``),
  ``TRUE`` = ``true``, JSON lists by their parsed value, surrounding blanks ignored (:func:`fingerprint`).
* **Stale or intended.** A row of ``F`` equal to a state gridrunner once committed for it is a stale
  copy: the newer state, ``L``, is kept with its own text (full-precision metrics). A row that differs
  from every committed state is a change the user meant:

  - a ``done``/``failed`` row set back to ``not_run`` is reset (it runs again);
  - a ``not_run`` row whose parameters changed becomes the new row (a new ``row_id``);
  - a row with no ``row_id``, or an unknown one, is an appended row;
  - any other change to a finished row (an edited metric), or any change to a running row, is not
    applied: the result or the live claim is kept, and the change is reported. A row that is a committed
    ``running`` state but for its status cell was running in the user's version: its change is a change
    to a running row even when the row has finished since (a reset would run it again).
* **Applied once.** The user's row of an applied reset or parameter change is kept in the journal as a
  state of that row, begun at the copy's age (the journal's ``seen``). Saving the same copy again (the
  editor's buffer, after the row was reset and ran again) finds that row equal to a state gridrunner
  knows: a stale copy, the newer state wins, and the change is not applied a second time. Only the
  user's own row is kept, so any other edit of that row is still a change.
* **Deleted or never seen.** A row of ``L`` missing from ``F`` was deleted by the user if it existed
  when ``F``'s copy was taken, else the copy predates it and it is kept. The copy's age is the newest
  committed state that any of its rows shows. A running row deleted is deleted; its worker's result
  is then kept aside (``rows/<id>/stale-result-*.json``) and reported, never written back.
* **Cut at a line end.** A whole file whose deletions include the last committed row may be an in-place
  rewrite paused between two lines: it is not merged until it has not changed for ``SETTLED_S``
  (:func:`_cut_at_a_line_end`). A deleted row that finished after the copy was taken (it was running
  there) keeps its result aside, as a deleted running row's worker does.
* **Not whole.** A file that looks half-written (no final newline, a last line with too few fields, an
  empty or header-only file while the journal holds rows, unreadable bytes) is never merged or
  written over: the caller waits for it to become whole, and ``gridrunner recover`` rebuilds it.

``gridrunner edit`` uses the same merge with the exact version it opened as the base (a three-way
merge): a row equal to the base is unchanged, any other is the user's change, and a row that a
worker changed meanwhile and the user changed too is a conflict, resolved by the same rules.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from pathlib import Path

from gridrunner.atomic import read_bytes
from gridrunner.errors import GridError, ShardError
from gridrunner.journal import JournalState
from gridrunner.shardfile import _NB, ATTEMPTS, STATUS, Shard, _BadRecord
from gridrunner.spec import BOOK_COLUMNS, STATUSES

_BOOLS = {"true": "true", "false": "false"}


def same_value(cell: str) -> str:
    """A cell's meaning as text: equal for cells that spreadsheets and pandas write for the same value."""
    text = cell.strip()
    if not text:
        return ""
    low = text.lower()
    if low in _BOOLS:
        return low
    if text[0] in "[{":
        try:
            return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
        except ValueError:
            return text
    first = text[0]
    if first.isdigit() or first in "+-.":
        try:
            value = float(text)
        except ValueError:
            return text
        if value != value or value in (float("inf"), float("-inf")):
            return text
        return format(value, ".15g")
    return text


def fingerprint(cells: list[str]) -> str:
    """16 hex digits, equal for two rows whose cells mean the same values."""
    return hashlib.sha1("\x1f".join(map(same_value, cells)).encode("utf-8")).hexdigest()[:16]


class ShardHalfWritten(GridError):
    """The file looks half-written (an in-place save caught in the middle): never merged or written over."""

    def __init__(self, path, message: str, short: str | None = None):
        self.path = path
        self.short = short  # what the file looks like, for the warning of a result kept in the journal
        super().__init__(f"{Path(path).name} {message}")


def looks_half_written(path, text: str, journal_rows: int) -> str | None:
    """Why ``text`` looks like a file caught in the middle of an in-place rewrite, or None if it looks whole."""
    if text == "":
        return "the file is empty" if journal_rows else None
    if not text.endswith(("\n", "\r")):
        return "its last line has no line end"
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as err:
        return f"it does not parse as CSV ({err})"
    records = [r for r in records if r]
    if len(records) <= 1 and journal_rows:
        return "it holds no rows (the journal holds %d)" % journal_rows
    if len(records) > 1 and len(records[-1]) < len(records[0]):
        # Unless the last line is whole on its own: then a stray quote further up ran on to the end (the
        # parse makes that quote's line a bad row, :meth:`Shard.parse`), and nothing is being written.
        last = next(csv.reader([text.splitlines()[-1]]), [])
        if len(last) < len(records[0]):
            return f"its last line has {len(records[-1])} of {len(records[0])} fields"
    return None


@dataclass
class Merge:
    """What a merge did, for the log and ``status``."""

    kept_newer: int = 0  # stale rows: the newer committed state was kept
    added: int = 0
    deleted: int = 0
    reset: int = 0
    changed: int = 0  # parameters of not_run rows
    kept_deleted: int = 0  # rows deleted earlier that a stale copy still held
    restored: int = 0  # rows the copy predates, kept
    restored_why: str = ""
    refused: list = field(default_factory=list)  # "row X: why the change was not applied"
    deleted_running: list = field(default_factory=list)
    deleted_ids: list = field(default_factory=list)  # every row the merge deletes
    #: row id -> cells of each deleted row that finished after the copy was taken (the copy showed it running
    #: or not run): its result is kept aside, as a deleted running row's worker keeps its own
    deleted_finished: dict = field(default_factory=dict)
    bad: int = 0
    #: row id -> fingerprint of the user's row, for each reset and parameter change applied, and ``age``, the
    #: copy's age: the journal keeps them as states of the row (:func:`commit_entry`), so a later save of
    #: the same copy is a stale copy and never applies the change again.
    applied: dict = field(default_factory=dict)
    age: int = -1

    def changes(self) -> int:
        return self.added + self.deleted + self.reset + self.changed

    def describe(self, name: str, how: str = "was saved by hand over an older version") -> str:
        parts = []
        if self.kept_newer:
            parts.append(f"kept the newer state of {self.kept_newer} row{'s' * (self.kept_newer != 1)}")
        if self.restored:
            parts.append(f"kept {self.restored} row{'s' * (self.restored != 1)} "
                         + (self.restored_why or "added after the copy was taken"))
        if self.kept_deleted:
            parts.append(f"kept {self.kept_deleted} earlier deletion{'s' * (self.kept_deleted != 1)}")
        for count, what in ((self.added, "added row"), (self.deleted, "deletion"), (self.reset, "reset"),
                            (self.changed, "parameter change")):
            if count:
                parts.append(f"applied {count} {what}{'s' * (count != 1)}")
        if self.deleted_running:
            parts.append(f"deleted running row{'s' * (len(self.deleted_running) != 1)} "
                         f"{', '.join(self.deleted_running[:5])} (its worker's result will be kept aside)")
        if self.deleted_finished:
            parts.append(f"deleted {len(self.deleted_finished)} row{'s' * (len(self.deleted_finished) != 1)} that "
                         f"finished after the copy was taken ({', '.join(list(self.deleted_finished)[:5])}: "
                         f"{'its result is' if len(self.deleted_finished) == 1 else 'their results are'} kept aside)")
        if self.refused:
            parts.append(f"did not apply {len(self.refused)} change{'s' * (len(self.refused) != 1)} ("
                         + "; ".join(self.refused[:3]) + ("; ..." if len(self.refused) > 3 else "") + ")")
        if self.bad:
            parts.append(f"kept {self.bad} bad row{'s' * (self.bad != 1)} as written")
        if not parts:
            how = "was saved by hand"
            parts.append("no change to any row")
        return f"{name} {how}: " + ", ".join(parts)


@dataclass
class Base:
    """What the user's copy is compared against. Journal merge: every committed state of each row (the
    copy's base is unknown). Edit: the exact version opened."""

    is_known_state: Callable[[str, str], int | None]  # (row_id, fingerprint) -> the line it began, or None
    knew: Callable[[str, int], bool]  # (row_id, copy age) -> did the copy's base hold this row


def journal_base(state: JournalState) -> Base:
    def known(rid: str, fp: str) -> int | None:
        history = state.history.get(rid)
        if history is None:
            return None
        for state_fp, start, _end in history.states:
            if state_fp == fp:
                return start
        return None

    def knew(rid: str, age: int) -> bool:
        history = state.history.get(rid)
        return history is not None and history.created <= age

    return Base(known, knew)


def opened_base(opened: dict[str, list[str]]) -> Base:
    """The base of ``gridrunner edit``: the rows of the version it opened, by id."""
    prints = {rid: fingerprint(cells) for rid, cells in opened.items()}
    return Base(lambda rid, fp: 0 if prints.get(rid) == fp else None, lambda rid, age: rid in prints)


def parse_user_file(path, text: str, header: list[str]) -> tuple[list[list[str] | _BadRecord], dict[int, str]]:
    """The user's file as records in ``header``'s column order (its own may be reordered), with the
    bad ones (kept verbatim) and their messages."""
    parsed = Shard.parse(path, text)  # raises ShardError for a header without the bookkeeping columns
    if parsed.header == header:
        return parsed.records, parsed.errors
    if sorted(parsed.header) != sorted(header):
        missing = [c for c in header if c not in parsed.header]
        extra = [c for c in parsed.header if c not in header]
        what = (f"missing column {missing[0]!r}" if missing else f"unknown column {extra[0]!r}")
        raise ShardError(path, f"{what}: the columns must stay {', '.join(header)} (in any order)", 1)
    where = [parsed.header.index(c) for c in header]
    records = []
    for i, record in enumerate(parsed.records):
        if i in parsed.errors:
            records.append(record)
        else:
            records.append([record[k] for k in where])
    return records, parsed.errors


def merge(path, user: list, errors: dict[int, str], current: dict[str, list[str]], header: list[str],
          base: Base) -> tuple[list, dict[int, str], Merge]:
    """Merge the user's records with ``current`` (the committed rows, by id, in their order).

    Returns the merged records (bad ones verbatim), their errors, and what was done."""
    p = header.index("row_id")
    n = len(header)
    outcome_slice = slice(p + _NB, n)
    report = Merge()
    out: list = []
    out_errors: dict[int, str] = {}
    placed: dict[str, int] = {}
    age = -1
    matched: set[str] = set()
    changes: list[tuple[int, str, list[str]]] = []  # (user index, row id, cells) the user changed

    for i, record in enumerate(user):
        if i in errors:
            continue
        rid = record[p]
        fp = fingerprint(record)
        start = base.is_known_state(rid, fp) if rid else None
        if start is not None:
            age = max(age, start)
            matched.add(rid)
        else:
            changes.append((i, rid, record))
    def place(cells, rid) -> None:
        placed[rid] = len(out)
        out.append(list(cells))  # a copy: the caller's body changes records in place

    changed_at = {i for i, _rid, _cells in changes}
    for i, record in enumerate(user):
        if i in errors:
            out_errors[len(out)] = errors[i]
            out.append(record)
            report.bad += 1
            continue
        rid = record[p]
        if rid in matched and i not in changed_at:
            if rid in placed:
                continue  # the same row twice in a stale copy: once is enough
            if rid in current:
                if fingerprint(current[rid]) != fingerprint(record):
                    report.kept_newer += 1
                place(current[rid], rid)
            else:
                report.kept_deleted += 1
            continue
        cells = list(record)
        old = current.get(rid) if rid else None
        if old is None:
            # an appended row (or one deleted earlier that the user brings back): the contract's checks
            cells_check = list(cells)
            message = Shard._check(cells_check, n, p, outcome_slice, header)
            new_id = cells_check[p]
            if message is None and (new_id in placed or (new_id in current and new_id not in placed
                                                           and _present(user, errors, p, new_id, i))):
                message = f"duplicate row_id {new_id}"
            if message is not None:
                out_errors[len(out)] = message
                out.append(_BadRecord(cells, _render(cells)))
                report.bad += 1
                continue
            if new_id in current:
                if new_id not in placed:  # the row exists: an appended copy of it changes nothing
                    place(current[new_id], new_id)
                    report.kept_newer += 1
                continue
            if cells_check[p + STATUS] not in STATUSES:
                continue
            place(cells_check, new_id)
            report.added += 1
            continue
        if rid in placed:
            out_errors[len(out)] = f"duplicate row_id {rid}"
            out.append(_BadRecord(cells, _render(cells)))
            report.bad += 1
            continue
        status_old = old[p + STATUS]
        status_new = cells[p + STATUS].strip().lower()
        params_changed = [same_value(c) for c in cells[:p]] != [same_value(c) for c in old[:p]]
        # A row that is a committed ``running`` state but for its status cell was running in the version the
        # user edited: a change to a running row, never applied, even if the row has finished since (a
        # reset would run a finished row again).
        running_since = None
        if status_new != "running":
            as_running = list(cells)
            as_running[p + STATUS] = "running"
            running_since = base.is_known_state(rid, fingerprint(as_running))
        if running_since is not None and status_old != "running":
            age = max(age, running_since)
            place(old, rid)
            report.refused.append(f"row {rid} was running in the version you edited: a change to a running row "
                                  f"is not applied, and it is {status_old} now (edit it again to change it)")
            continue
        if status_old in ("done", "failed") and status_new == "not_run":
            kept = list(old)
            _clear(kept, p)
            if params_changed:
                place(old, rid)
                report.refused.append(f"row {rid} is {status_old}: set it to not_run without changing its "
                                      f"parameters to re-run it, or append the new configuration as a new row")
                continue
            place(kept, rid)
            report.reset += 1
            report.applied[rid] = fingerprint(record)
        elif status_old == "not_run" and status_new == "not_run" and params_changed:
            fresh = list(cells)
            fresh[:p] = [_typed_like(new_cell, old_cell) for new_cell, old_cell in zip(cells[:p], old[:p])]
            _clear(fresh, p)
            fresh[p] = ""
            fresh[p + ATTEMPTS] = "0"
            message = Shard._check(fresh, n, p, outcome_slice, header)
            if message is not None or fresh[p] in current or fresh[p] in placed:
                place(old, rid)
                report.refused.append(f"row {rid}: " + (message or f"its new parameters are row {fresh[p]}, "
                                                                   f"which exists"))
                continue
            place(fresh, fresh[p])
            report.changed += 1
            report.applied[rid] = fingerprint(record)
        else:
            place(old, rid)
            if status_old == "running":
                report.refused.append(f"row {rid} is running: its claim is kept; change it once it has finished")
            elif status_old in ("done", "failed"):
                report.refused.append(f"row {rid} is {status_old}: its recorded result is kept (set status to "
                                      f"not_run to re-run it)")
            elif status_new != "not_run":
                report.refused.append(f"row {rid} is not_run: only gridrunner sets a row {status_new or 'blank'}")

    # Rows the user's file lacks: deleted by the user, or added after the copy was taken.
    kept_back = []
    hidden = {r[p] for i, r in enumerate(user) if i in errors and len(r) > p}  # behind a bad row: not deleted
    hidden_params = {tuple(map(same_value, r[:p])) for i, r in enumerate(user) if i in errors and len(r) > p}
    changed_ids = set(_ids_of_changed(changes, p))
    for rid, cells in current.items():
        if rid in placed or rid in changed_ids:
            continue
        if rid in hidden or tuple(map(same_value, cells[:p])) in hidden_params:
            continue
        if base.knew(rid, age):
            report.deleted += 1
            report.deleted_ids.append(rid)
            if cells[p + STATUS] == "running":
                report.deleted_running.append(rid)
            elif cells[p + STATUS] in ("done", "failed") and (base.is_known_state(rid, fingerprint(cells)) or 0) > age:
                report.deleted_finished[rid] = list(cells)
        else:
            kept_back.append(rid)
            report.restored += 1
    if kept_back:
        out, out_errors = _insert_in_order(out, out_errors, kept_back, current, p)
    report.age = age
    return out, out_errors, report


_PANDAS_WHOLE_FLOAT = re.compile(r"([+-]?\d+)\.0*")


def _typed_like(new: str, old: str) -> str:
    """The text of a parameter cell of a ``not_run`` row whose parameters the user changed, given the row's
    committed cell ``old``: typed like it where the tool that saved the file changed only the spelling.

    pandas rewrites every cell of a column, not only the one the user changed: booleans as ``True``, ints
    of a column with empty cells as ``8.0``. Taken as written they would give the row other parameters
    (the string ``"True"``, the float 8.0) and another ``row_id``, so the same configuration could run
    twice. So a cell that means the same value as before keeps gridrunner's own text, a boolean cell stays
    a boolean (``True``/``TRUE`` → ``true``) and an int cell stays an int (``9.0`` → ``9``). Bare ``True``
    cannot mean the boolean everywhere (:func:`gridrunner.spec.decode_cell` keeps it a string): gridrunner
    writes the string parameter ``"True"`` bare, so only the row's own committed cell tells which it is.
    """
    if same_value(new) == same_value(old):
        return old
    if old in ("true", "false") and new.strip().lower() in ("true", "false"):
        return new.strip().lower()
    if old.lstrip("+-").isdigit():
        whole = _PANDAS_WHOLE_FLOAT.fullmatch(new.strip())
        if whole is not None:
            return str(int(whole.group(1)))
    return new


def _ids_of_changed(changes, p) -> list[str]:
    return [rid for _i, rid, _cells in changes if rid]


def _present(user, errors, p, rid, before) -> bool:
    return any(k not in errors and k != before and r[p] == rid for k, r in enumerate(user))


def _clear(cells: list[str], p: int) -> None:
    cells[p + STATUS] = "not_run"
    for k in range(p + 3, len(cells)):
        cells[k] = ""
    cells[p + ATTEMPTS] = "0"


def _render(cells) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()


def _insert_in_order(out, errors, missing, current, p):
    """Put the rows in ``missing`` back next to the row that precedes them in ``current``."""
    order = list(current)
    position = {rid: k for k, rid in enumerate(order)}
    result, result_errors = [], {}
    after: dict[str | None, list[str]] = {}
    for rid in missing:
        k = position[rid] - 1
        while k >= 0 and order[k] in missing:
            k -= 1
        after.setdefault(order[k] if k >= 0 else None, []).append(rid)
    for rid in after.get(None, []):
        result.append(list(current[rid]))
    for k, record in enumerate(out):
        if k in errors:
            result_errors[len(result)] = errors[k]
        result.append(record)
        rid = record[p] if k not in errors and len(record) > p else None
        for extra in after.get(rid, []) if rid else []:
            result.append(list(current[extra]))
    placed = {r[p] for k, r in enumerate(result) if len(r) > p}
    for rid in missing:  # rows whose predecessor is no longer in the file
        if rid not in placed:
            result.append(list(current[rid]))
    return result, result_errors


def summary_counts(records, errors, p) -> Counter:
    return Counter(r[p + STATUS] for k, r in enumerate(records) if k not in errors)


__all__ = ["BOOK_COLUMNS", "Base", "Merge", "ShardHalfWritten", "fingerprint", "journal_base", "looks_half_written",
           "merge", "merge_text", "merged_view", "opened_base", "parse_user_file", "same_value", "summary_counts"]


#: How long a transaction waits for a file that looks half-written to become whole.
HALF_WRITTEN_WAIT_S = 1.0
#: A file being merged must read the same twice this far apart (an in-place save still in progress changes).
STEADY_S = 0.05
#: A file that looks half-written but has not changed for this long is no save in progress: it was cut
#: short for good (a crashed editor, a full disk). Its whole rows are merged and the rows it lost are kept.
#: A whole file that lacks the last committed row is merged only once it is this old, too (:func:`_cut_at_a_line_end`).
SETTLED_S = 5.0


def reconcile_file(path, text: str, journal, read_text) -> tuple[Shard, str]:
    """Holding the shard's lock: merge ``text`` (not what gridrunner last committed) with the journal.

    Returns the merged shard (dirty: the caller writes it back) and the sentence that says what was done.
    Raises :class:`ShardHalfWritten` (nothing written) for a file that stays half-written, and
    :class:`ShardError` for one whose header is unusable."""
    state = journal.read_state()
    if state is None:
        raise ShardError(path, "the shard's journal is unreadable; run `gridrunner recover`")
    deadline = time.monotonic() + HALF_WRITTEN_WAIT_S
    while True:
        why = looks_half_written(path, text, len(state.latest))
        if why is None:
            time.sleep(STEADY_S)
            again = read_text(path)
            if again == text:
                break
            text = again
            continue
        if time.monotonic() > deadline:
            try:
                settled = time.time() - os.stat(path).st_mtime > SETTLED_S
            except FileNotFoundError:
                settled = False
            if not settled:
                raise ShardHalfWritten(path, f"looks half-written ({why}): not merged and not written over; "
                                             f"its rows stay as the journal holds them until the file is whole "
                                             f"(`gridrunner recover` rebuilds it)")
            return _merge_cut_file(path, text, state, why)
        time.sleep(STEADY_S)
        text = read_text(path)
    from gridrunner.journal import text_sha

    if text_sha(text) == state.head_sha:  # it became whole again as gridrunner committed it
        shard = Shard.parse(path, text)
        shard.base = [r[:] for r in shard.records]
        return shard, ""
    shard = merge_text(path, text, state)
    young = _cut_at_a_line_end(path, shard.merge, state)
    if young is not None:
        raise ShardHalfWritten(path, young, "ends before its last rows and changed less than "
                                            f"{SETTLED_S:g} s ago (an in-place rewrite paused at a line end?)")
    return shard, shard.note


def _cut_at_a_line_end(path, report: "Merge", state: JournalState) -> str | None:
    """Why a whole file whose merge deletes rows may still be an in-place rewrite paused at a line end (an
    editor or a script that truncates the file and writes it in pieces), or None.

    By its content alone such a file is a deletion of every row after the pause, and a merge would
    rename its result over the file that the writer still has open, losing the writer's remaining
    lines. So a save whose deletions include the last committed row (the rows a pause cuts off are the
    file's last ones) changed less than :data:`SETTLED_S` ago is not merged yet: the transaction is
    refused as for a half-written file (results go into the journal, workers look again in a second).
    A deletion of the last rows is applied once the file has not changed for that long; any other
    deletion at once. A writer that pauses longer than that at a line end is merged as a deletion."""
    if not report.deleted_ids or not state.latest or next(reversed(state.latest)) not in report.deleted_ids:
        return None
    try:
        age_s = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    if age_s >= SETTLED_S:
        return None
    return (f"ends before its last rows ({report.deleted} of the journal's rows are missing) and changed "
            f"{max(age_s, 0):.1f} s ago: an in-place rewrite may still be writing the rest, so it is not merged or "
            f"written over until it has not changed for {SETTLED_S:g} s; then the missing rows are deleted")


def merge_text(path, text: str, state: JournalState) -> Shard:
    """The merge of a whole file ``text`` (not what gridrunner last committed) with the journal ``state``:
    the merged shard, dirty, with ``note`` and ``merge`` saying what was done. Reads and writes nothing, so
    readers use it too (:func:`merged_view`). Raises :class:`ShardError` for a header that is unusable."""
    user, errors = parse_user_file(path, text, state.header)
    p = state.row_id_column()
    # A parameter changed under a row_id that the journal knows is the user's parameter change, or (a row
    # gone since: that change applied already) a stale copy of it: the merge decides, not the row check.
    errors = {i: m for i, m in errors.items()
              if not (m.startswith("row_id ") and "does not match its parameters" in m and user[i][p] in state.history)}
    records, merged_errors, report = merge(path, user, errors, state.latest, state.header, journal_base(state))
    shard = Shard(path, state.header, records, merged_errors, list(range(2, len(records) + 2)))
    shard.base = {rid: list(cells) for rid, cells in state.latest.items()}  # never the records' own lists
    shard.dirty = True
    shard.note = report.describe(path.name)
    shard.merge = report
    return shard


def merged_view(path, text: str, journal) -> Shard | None:
    """For readers (``status``, ``gridrunner.load``; no lock, nothing written): the rows as the next
    transaction will merge ``text``, a file saved by hand since gridrunner last wrote it, so that a stale
    copy saved over newer results is not shown as the grid's state. None when the file looks half-written
    or the journal is unreadable: the caller shows the file as it is (``status`` names it).

    Without the lock, a transaction may commit between the read of the file and that of the journal:
    the file read is then a version gridrunner committed, a stale copy of the newer journal, whose merge is
    the newer state. So the view is always one the journal vouches for."""
    state = journal.read_state()
    if state is None or looks_half_written(path, text, len(state.latest)):
        return None
    shard = merge_text(path, text, state)
    shard.dirty = False
    # A bad row is reported at its line in the file as it is, not where the merge would write it.
    shard.lines = [getattr(record, "line", None) or line for line, record in zip(shard.lines, shard.records)]
    return shard


def _merge_cut_file(path, text: str, state: JournalState, why: str) -> tuple[Shard, str]:
    """A file cut short long ago: merge what it holds, deleting nothing (its missing rows were cut, not
    deleted); a partial last line is kept as a bad row, as the user left it. An empty file (an in-place save
    that died right after truncating it) is cut before its header: every row comes back from the journal.
    Raises the parse's own ShardError if the header is there but not whole."""
    if not text.strip():
        user, errors = [], {}
    else:
        user, errors = parse_user_file(path, text, state.header)
    base = journal_base(state)
    base.knew = lambda rid, age: False
    records, merged_errors, report = merge(path, user, errors, state.latest, state.header, base)
    report.restored_why = "that the cut had lost"
    shard = Shard(path, state.header, records, merged_errors, list(range(2, len(records) + 2)))
    shard.base = {rid: list(cells) for rid, cells in state.latest.items()}
    shard.dirty = True
    shard.merge = report
    shard.note = (f"{path.name} was cut short ({why}) and has not changed for {SETTLED_S:g} s: "
                  + report.describe(path.name).split(": ", 1)[1])
    return shard, shard.note


def hand_edit_report(store, last: int = 5) -> list[str]:
    """For ``status`` (reads only): the last reconciliations, and the shards saved by hand that no
    transaction has merged yet, or that are missing or look half-written."""
    from gridrunner.journal import JOURNAL_DIR, Journal, read_notes, text_sha

    lines = [note.split(" ", 1)[1] if " " in note else note for note in read_notes(store.shard_dir, last)]
    for journal_file in sorted((store.grid_dir / JOURNAL_DIR).glob("shard-*.csv.jsonl")):
        path = store.shard_dir / journal_file.name[: -len(".jsonl")]
        head = Journal(path, fingerprint).head()
        try:
            data = read_bytes(path)  # NFS: ESTALE retried
        except FileNotFoundError:
            if head is None:
                lines.append(f"{path.name} is missing, and its journal holds nothing readable: `gridrunner recover` "
                             f"says what can be done")
            else:
                lines.append(f"{path.name} is missing but its journal holds its rows: run `gridrunner recover`")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            lines.append(f"{path.name} is not UTF-8 text: run `gridrunner recover` to rebuild it from its journal")
            continue
        if head is None or text_sha(text) == head[1]:
            continue
        why = looks_half_written(path, text, 1)
        if why:
            lines.append(f"{path.name} looks half-written ({why}): workers wait; `gridrunner recover` rebuilds it")
        else:
            lines.append(f"{path.name} was saved by hand since gridrunner last wrote it and is not merged yet: its "
                         f"counts above are what the merge will make of it (the newer state of each row the journal "
                         f"knows); the next worker, `edit` or `recover` merges it")
    return lines
