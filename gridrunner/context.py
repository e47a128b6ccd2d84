"""What a task sees of gridrunner: the ``ctx`` argument of ``run(params, ctx) -> dict[str, float]``.

A task gets:

* ``ctx.row_id``, ``ctx.grid_dir`` and ``ctx.row_dir`` (``<grid>/rows/<row_id>/``);
* ``ctx.checkpoint_dir`` (``<row_dir>/checkpoint/``), which survives re-runs of the row, so a requeued
  or reclaimed row can resume. Both directories exist once the task has asked for them (they are made
  then: a row that writes nothing leaves no directory);
* ``ctx.seed``: the row's ``seed`` parameter where there is one, else a seed derived from the row id;
* ``ctx.log(step, **metrics)``: appends one JSON line to ``<row_dir>/history.jsonl`` (the learning curve
  the report draws);
* ``ctx.should_stop()``: true once the worker has been asked to stop (time limit, preemption, SIGTERM,
  Ctrl-C), the row ran past its ``row_time_limit_min``, or a ``prune:`` rule matched the record just
  logged. Save a checkpoint, then ``raise ctx.Interrupted()`` (or :class:`gridrunner.Interrupted`);
* ``ctx.pruned``: ``Pruned: <rule> at step <n>`` once a prune rule matched (see :mod:`gridrunner.prune`).

Tests and notebooks can build one directly: ``Context(row_dir=tmp_path / "row")``.
"""
from __future__ import annotations

import json
import math
import operator
import time
from pathlib import Path
from typing import Callable

from gridrunner.errors import Interrupted

HISTORY_FILE = "history.jsonl"
CHECKPOINT_DIR = "checkpoint"


def seed_from_row_id(row_id: str) -> int:
    """A stable 31-bit seed from a hexadecimal row id (any other string hashes through its bytes)."""
    try:
        return int(row_id[:8], 16) % (2**31)
    except ValueError:
        return sum(row_id.encode()) % (2**31)


class Context:
    """The per-row handle passed to a task. See the module docstring."""

    Interrupted = Interrupted

    def __init__(
        self,
        row_dir: str | Path,
        row_id: str | None = None,
        seed: int | None = None,
        grid_dir: str | Path | None = None,
        should_stop: Callable[[], bool] | None = None,
        isolated: bool = False,
    ):
        self._row_dir = Path(row_dir)
        self._made: set[str] = set()  # the directories made so far
        self.row_id = row_id if row_id is not None else self._row_dir.name
        self.grid_dir = Path(grid_dir) if grid_dir is not None else self._row_dir.parent.parent
        self.seed = seed if seed is not None else seed_from_row_id(self.row_id)
        #: True when the task runs in its own child process (so it may, for example, cap its own memory).
        self.isolated = isolated
        # A plain flag: set from a signal handler or another thread, read by the task (an assignment is
        # atomic, and a forked row's process imports no threading for it).
        self._stopped = False
        self._should_stop_hook = should_stop
        self._prune = None  # a gridrunner.prune.PruneWatch when the grid has prune rules

    def watch_prune(self, rules, params: dict, grace_s: float | None = None, notice_fd: int | None = None,
                    on_match=None) -> None:
        """Evaluate the prune ``rules`` on every record this row logs from now on (see :mod:`gridrunner.prune`);
        ``on_match`` is called with the prune's message when one matches."""
        from gridrunner.prune import PruneWatch

        self._prune = PruneWatch(rules, params, grace_s, notice_fd, on_match)

    @property
    def pruned(self) -> str | None:
        """``Pruned: <rule> at step <n>`` once a prune rule has matched a logged record, else None."""
        return self._prune.pruned if self._prune is not None else None

    @property
    def row_dir(self) -> Path:
        """``<grid>/rows/<row_id>/``, made the first time it is asked for."""
        return self._made_dir("row", self._row_dir)

    @property
    def checkpoint_dir(self) -> Path:
        """``<row_dir>/checkpoint/``, made the first time it is asked for; it survives re-runs of the row."""
        return self._made_dir("checkpoint", self._row_dir / CHECKPOINT_DIR)

    def _made_dir(self, name: str, path: Path) -> Path:
        # Made on first use rather than for every row: a directory costs a row that writes nothing
        # more than the rest of its bookkeeping (an inode and a journal entry, under the rows/ lock).
        if name not in self._made:
            path.mkdir(parents=True, exist_ok=True)
            self._made.add(name)
        return path

    def log(self, step: int, **metrics: float) -> None:
        """Append ``{"step": step, "time": <unix s>, **metrics}`` to the row's learning curve.

        ``step`` is a whole number (a float such as ``200.0`` is taken as 200); ``time`` is the record's own
        clock (a prune's saving and the hang clock read it), so no metric may take that name."""
        if "time" in metrics:
            raise ValueError("ctx.log: 'time' is the record's own clock (unix seconds, set by gridrunner); "
                             "log the metric under another name, such as 'elapsed_s'")
        record = {"step": _whole(step), "time": round(time.time(), 3)}
        record.update({key: _plain(value) for key, value in metrics.items()})
        with open(self.row_dir / HISTORY_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._prune is not None and self._prune.check(record) is not None:
            self._stopped = True

    def should_stop(self) -> bool:
        """True once the worker has been asked to stop; poll it between training steps."""
        if not self._stopped and self._should_stop_hook is not None and self._should_stop_hook():
            self._stopped = True
        return self._stopped

    def request_stop(self) -> None:
        """Make :meth:`should_stop` true (the worker calls this from its signal handler)."""
        self._stopped = True

    def history(self) -> list[dict]:
        """The records logged so far for this row (read back from ``history.jsonl``)."""
        path = self._row_dir / HISTORY_FILE
        if not path.exists():
            return []
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]


def _whole(step) -> int:
    """``step`` as an int: an integer of any kind, or a float with a whole value; anything else is a
    :class:`TypeError` (a step of 2.7 truncated to 2 would put two records at one step)."""
    if not isinstance(step, bool):
        try:
            return operator.index(step)
        except TypeError:
            pass
        try:
            number = float(step)
        except (TypeError, ValueError):
            number = math.nan
        if math.isfinite(number) and number == int(number):
            return int(number)
    raise TypeError(f"ctx.log: step must be a whole number, got {step!r}")


def _plain(value):
    """Numbers from numpy or TensorFlow become plain floats so they serialise as JSON."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
