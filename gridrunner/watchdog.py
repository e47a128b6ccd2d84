"""A running row's two clocks: a hung row (nothing logged for ``hang_after_min``) and a runaway row (running
longer than ``row_time_limit_min``).

One daemon thread per worker, started the first time a row is watched, so a grid that sets neither key
never starts it and its rows pay nothing. While a row runs, the thread sleeps until the next moment
something can be due, and only then looks:

* **time limit**: due at the row's start + its limit; no file is read for it;
* **hang**: the learning curve ``history.jsonl`` is the row's sign of progress (every ``ctx.log`` appends
  to it). Its size and modification time are taken (one ``stat``) before the row starts; the clock starts
  when they first change, that is at the row's first ``ctx.log`` of this run, so a slow start-up (loading
  data, building a model) is never a hang. From then on the thread ``stat``\\ s the file once when the last
  log's mtime + ``hang_after`` comes, and again only if the row logged meanwhile. Before the first log it
  looks every min(``hang_after`` / 4, 5 s).

What is done when a clock runs out is the worker's (its callbacks ``on_hang`` and ``on_limit``): a hung
row is killed at once, a runaway row is asked to stop and checkpoint. Each fires at most once per row.
Rows run ``--inline`` are not watched (they cannot be killed without killing the worker).
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: Before a row first logs, its learning curve is looked at this often at most (seconds).
FIRST_LOG_POLL_S = 5.0


@dataclass
class _Watched:
    history: Path
    hang_s: float | None
    limit_at: float | None  # time.time() at which the time limit runs out
    signature: tuple | None  # (size, mtime_ns) of history.jsonl as last seen
    last_log: float | None = None  # mtime of the last log of this run (time.time() scale)


def history_signature(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def last_step(history: Path):
    """The step of the last complete record in ``history.jsonl`` (None if there is none); reads its tail only."""
    try:
        with open(history, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - 8192, 0))
            tail = fh.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            return record["step"]
    return None


class RowWatchdog:
    """Watches one row at a time for its worker (see the module docstring)."""

    def __init__(self, on_hang: Callable[[], None], on_limit: Callable[[], None]):
        self.on_hang = on_hang
        self.on_limit = on_limit
        self._cond = threading.Condition()
        self._row: _Watched | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, history: Path, hang_s: float | None, limit_s: float | None, before=False) -> None:
        """Start the clocks of a row that starts now; ``history`` is its ``history.jsonl``. ``before`` is
        :func:`history_signature` of it taken before the row's process started: a row that logs at once
        may have logged by now, and a signature taken after that log would never see it change."""
        signature = (before if before is not False else history_signature(history)) if hang_s is not None else None
        limit_at = time.time() + limit_s if limit_s is not None else None
        with self._cond:
            self._row = _Watched(Path(history), hang_s, limit_at, signature)
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gridrunner-watchdog", daemon=True)
            self._thread.start()

    def clear(self) -> None:
        """The row has ended: stop its clocks."""
        with self._cond:
            self._row = None
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._row = None
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                row = self._row
                if row is None:
                    self._cond.wait()
                    continue
                wake = self._look(row, time.time())
                if self._row is row and wake is not None:
                    self._cond.wait(timeout=max(wake - time.time(), 0.001))
                elif self._row is row:
                    self._cond.wait()

    def _look(self, row: _Watched, now: float) -> float | None:
        """Fire what is due for ``row``; the next time anything can be due (None: nothing more to watch)."""
        wake = math.inf
        if row.limit_at is not None:
            if now >= row.limit_at:
                row.limit_at = None
                self.on_limit()
            else:
                wake = row.limit_at
        if row.hang_s is not None:
            signature = history_signature(row.history)
            if signature != row.signature:
                row.signature = signature
                if signature is not None:
                    row.last_log = signature[1] / 1e9
            if row.last_log is None:
                wake = min(wake, now + min(row.hang_s / 4.0, FIRST_LOG_POLL_S))
            elif now - row.last_log >= row.hang_s:
                row.hang_s = None
                row.limit_at = None  # it is killed: nothing else is due
                self.on_hang()
                return None
            else:
                wake = min(wake, row.last_log + row.hang_s)
        return None if wake == math.inf else wake
