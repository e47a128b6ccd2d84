"""The exceptions gridrunner raises, and the one a task raises to give its row back.

Two families:

* :class:`GridError` and its subclasses are a *user's* mistake or a state the user can fix
  (a bad spec, a hand-edited shard that does not parse, an unknown profile). The CLI prints
  them as one ``Error: ...`` line and exits 1. Anything else escaping the CLI is a bug in
  gridrunner: its traceback goes to a log file.
* :class:`Interrupted` is raised by a task when ``ctx.should_stop()`` turned true and the task
  has saved what it needs to resume. The row goes back to ``not_run`` with its checkpoint kept.

Every exception with fields defines ``__reduce__`` so it survives pickling; submitit pickles
whatever crosses a job boundary.
"""
from __future__ import annotations

from pathlib import Path


class GridError(Exception):
    """A mistake the user can fix. ``str(err)`` is the whole message, one line where possible."""


class SpecError(GridError):
    """A grid spec that does not validate.

    ``path`` is the spec file, ``key`` the dotted key path into it (``grid.depth``, ``random.params.lr``),
    ``line`` the 1-based YAML line where there is one, and ``message`` what is wrong and what would be valid.
    """

    def __init__(self, path: str | Path | None, key: str | None, message: str, line: int | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        self.message = message
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path:
            where.append(self.path + (f":{self.line}" if self.line else ""))
        if self.key:
            where.append(f"at key {self.key}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

    def __reduce__(self):
        return (type(self), (self.path, self.key, self.message, self.line))


class ExprError(GridError):
    """A rule or expression (``failure``, ``cost``, ``exclude``, ``--where``) that does not parse."""

    def __init__(self, text: str, message: str, position: int | None = None):
        self.text = text
        self.message = message
        self.position = position
        at = f" at column {position + 1}" if position is not None else ""
        super().__init__(f"{message}{at} in {text!r}")

    def __reduce__(self):
        return (type(self), (self.text, self.message, self.position))


class ShardError(GridError):
    """A shard file (or one row of it) that does not follow the CSV contract."""

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        self.path = str(path)
        self.message = message
        self.line = line
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        return (type(self), (self.path, self.message, self.line))


class LockTimeout(GridError):
    """A shard lock could not be taken in time, and its holder still looks alive."""

    def __init__(self, path: str | Path, holder: str, waited_s: float):
        self.path = str(path)
        self.holder = holder
        self.waited_s = waited_s
        super().__init__(f"{self.path}: lock still held by {holder} after {waited_s:.0f} s")

    def __reduce__(self):
        return (type(self), (self.path, self.holder, self.waited_s))


class ProfileError(GridError):
    """A bad executor profile (``jobs/*.yaml``) or submission option."""


class Interrupted(Exception):
    """Raised by a task that was asked to stop (``ctx.should_stop()``) and has saved its checkpoint.

    The worker puts the row back to ``not_run``; whichever worker claims it next resumes from
    ``ctx.checkpoint_dir``.
    """
