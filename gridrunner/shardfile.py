"""The shard file format: one CSV file of rows, parsed, validated, rendered; the cells' text forms.

The columns are the parameters, then the bookkeeping block (``BOOK_COLUMNS``: row_id, status, attempts,
worker, started_at, finished_at, runtime_s, error), then the outcomes (the CSV contract, see the README).
A parse keeps every record, the bad ones (a hand edit that breaks the contract) verbatim, so a rewrite
of the file by a transaction loses nothing the user wrote. Nothing here touches the lock or renames.
"""
from __future__ import annotations

import csv
import io
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from gridrunner.errors import ShardError
from gridrunner.spec import BOOK_COLUMNS, STATUSES, decode_cell, row_id_of

SHARD_GLOB = "shard-*.csv"
_NB = len(BOOK_COLUMNS)

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


def decode_params(names, cells) -> dict:
    """A row's parameters from its cells, as a worker's task receives them; a parameter whose cell is empty
    (its sub-grid lacks it) is absent."""
    return {name: decode_cell(cell) for name, cell in zip(names, cells) if cell != ""}


_VERIFIED: dict = {}  # (row_id, param cells) -> None: rows whose id was checked against their parameters


class _BadRecord(list):
    """The fields of a row that breaks the CSV contract, ``raw``, its text in the file, written back as is,
    and ``line``, where it starts in the file it was read from (None for one a merge found bad)."""

    def __init__(self, fields: list[str], raw: str, line: int | None = None):
        super().__init__(fields)
        self.raw = raw
        self.line = line


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
        self.note = ""  # what a reconciliation did, for the journal
        self.base = None  # the committed rows this parse started from (a list by index, or a dict by id)
        self.unmerged = False  # a reader's merged view of a file saved by hand: GridStore.view

    # ---- parsing

    @classmethod
    def parse(cls, path: Path, text: str) -> "Shard":
        # A byte order mark (Excel's "CSV UTF-8", vim's `:set bomb`) is no part of the first column's name.
        text = text.removeprefix("\ufeff")
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
        offset = 0  # physical lines before the current reader's first (it restarts after a stray quote)
        physical = None
        while True:
            start = offset + reader.line_num
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                records.append([])
                lines.append(offset + reader.line_num)
                errors[len(records) - 1] = f"unreadable line: {err}"
                spans[len(records) - 1] = (start, offset + reader.line_num)
                continue
            if not fields:
                continue
            index = len(records)
            line = offset + reader.line_num
            if line - start > 1 and len(fields) != n:
                # A stray quote opened a cell that ran on over the lines after it (a record of many lines and
                # the wrong number of fields): only its first line is the bad row. The rows after it are
                # read on their own, so they are neither lost nor merged as deleted.
                physical = physical or io.StringIO(text, newline="").readlines()
                offset = start + 1
                reader = csv.reader(io.StringIO("".join(physical[offset:]), newline=""))
                records.append(next(csv.reader([physical[start]]), []))
                lines.append(start + 1)
                errors[index] = ("unclosed quote: a '\"' opens a cell that runs past the end of the line (quote "
                                 "the cell whole, or remove the quote)")
                spans[index] = (start, start + 1)
                continue
            records.append(fields)
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
            physical = physical or io.StringIO(text, newline="").readlines()  # the lines the reader counted
            for index, (start, end) in spans.items():
                records[index] = _BadRecord(records[index], "".join(physical[start:end]), lines[index])
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
            whole = _whole_number(attempts)
            if whole is None:
                return f"attempts must be a whole number, got {attempts!r}"
            fields[p + ATTEMPTS] = whole  # pandas writes a column with empty cells as floats: 1.0 means 1
        runtime = fields[p + RUNTIME]
        if runtime and not is_number(runtime):
            return f"runtime_s must be a number, got {runtime!r}"
        for name, cell in zip(header[outcome_slice], fields[outcome_slice]):
            if cell and not is_number(cell):
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
        return decode_params(self.params, self.records[i])

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


def _whole_number(text: str) -> str | None:
    """``text`` as the digits of the whole number >= 0 that it means (``1.0``, ``2e0``), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not (value >= 0 and value.is_integer()):  # NaN and infinities fail too
        return None
    return str(int(value))


def is_number(text: str) -> bool:
    """Whether ``text`` reads as a float (``1e-3``, ``-2``, ``nan``)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def header_for(params: list[str], outcomes: list[str]) -> list[str]:
    return [*params, *BOOK_COLUMNS, *outcomes]
