"""Prune rules: stop a row whose learning curve says it is doomed, and check a rule on a finished grid first.

A spec's ``prune:`` holds a rule, or a list of rules, in the rule language (:mod:`gridrunner.expr`),
over the latest record a task logged with ``ctx.log(step, **metrics)``: ``step``, ``time`` and the
metrics, plus the row's parameters (a logged name wins over a parameter of the same name), for example
``step >= 200 and val_ssim < 0.3``.

Where a rule is evaluated: in the row's own process, inside ``ctx.log``, right after the record is
appended (:meth:`PruneWatch.check`). That costs a rule evaluation per logged record and nothing else:
no file is read back, and the worker polls nothing. When a rule matches, the row's context

1. becomes stopped (``ctx.should_stop()`` is true, as for a worker stop: the task checkpoints and
   raises ``Interrupted``);
2. writes a notice, one JSON line ``{"pruned": "Pruned: <rule> at step <n>"}``, to the pipe its result
   goes up, so the worker knows the ending is a prune and not a stop to give the row back, however the
   row's process then ends;
3. arms a timer of the worker's grace time (``SIGALRM``, left at its default action, which ends the
   process however busy it is), so a task that ignores the stop is killed.

The worker then records the row ``failed`` with ``error`` = ``Pruned: <rule> at step <n>``, whatever
the task did after the notice (raised ``Interrupted``, was killed, or even returned metrics). A failed
row is not run again. Rows run ``--inline`` are stopped the same way, but never killed.

What ``make`` checks: each rule parses, is a condition (a comparison, ``and``/``or``/``not``, ``in``),
names no bookkeeping column (those are never in a record), and names at least one thing besides the
parameters and ``fixed`` constants (a rule over parameters alone is what ``exclude`` is for). Other
names cannot be checked: they are metrics, known only once the task logs them. A name missing from a
record never matches, as everywhere in the rule language, and a rule that cannot be evaluated on a
record (``log(0)``, ``len`` of a number) does not match it; the row goes on.
:func:`replay` shows both before a rule is trusted: how many records lacked a name, and how many could
not be evaluated.

:func:`replay` runs rules over every row's ``history.jsonl`` of a grid (``gridrunner replay-prune``).
"""
from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from gridrunner.errors import ExprError, GridError
from gridrunner.expr import Expr

PRUNED = "Pruned"
#: Names every record has, besides the task's own metrics.
RECORD_NAMES = ("step", "time")


def message(rule: str, step) -> str:
    """The ``error`` cell of a pruned row."""
    return f"{PRUNED}: {rule} at step {step}"


def check_rule(text, parameters, bookkeeping) -> Expr:
    """Parse one prune rule as ``make`` accepts it; raises :class:`ExprError` saying what is wrong."""
    expr = Expr(text)
    if not expr.is_condition:
        raise ExprError(text, "a prune rule must be a condition such as 'step >= 200 and val_ssim < 0.3'")
    names = expr.names
    booked = sorted(names & set(bookkeeping))
    if booked:
        raise ExprError(text, f"{booked[0]!r} is a bookkeeping column, never in a logged record (a record has "
                              f"step, time and the metrics the task logs)")
    if names and not names - set(parameters):
        raise ExprError(text, "the rule reads only parameters, so it would prune rows before they learn anything; "
                              "use `exclude` to leave such rows out, or add a logged metric or `step`")
    return expr


@lru_cache(maxsize=16)
def parse_rules(texts: tuple) -> tuple:
    """The parsed rules (cached: a spawner forks many rows with the same rules)."""
    return tuple(Expr(text) for text in texts)


def first_match(rules, values: dict) -> Expr | None:
    """The first rule that matches ``values``; a rule that cannot be evaluated does not match."""
    for rule in rules:
        try:
            if rule.evaluate(values) is True:
                return rule
        except ExprError:
            continue
    return None


class PruneWatch:
    """The prune rules of one running row (held by its :class:`~gridrunner.context.Context`)."""

    def __init__(self, rules: tuple, params: dict, grace_s: float | None = None, notice_fd: int | None = None,
                 on_match=None):
        self.rules = parse_rules(tuple(rules))
        self.params = params
        self.grace_s = grace_s
        self.notice_fd = notice_fd
        self.on_match = on_match  # called with the prune's message (the row's process keeps it in its outbox)
        self.pruned: str | None = None

    def check(self, record: dict) -> str | None:
        """Evaluate the rules on a new record; on the first match, the prune's message (else None)."""
        if self.pruned is not None:
            return None
        rule = first_match(self.rules, {**self.params, **record})
        if rule is None:
            return None
        self.pruned = message(rule.text, record.get("step"))
        if self.notice_fd is not None:
            try:
                os.write(self.notice_fd, (json.dumps({"pruned": self.pruned}) + "\n").encode())
            except OSError:
                pass  # the worker is gone; the row's process dies with it
        if self.on_match is not None:
            self.on_match(self.pruned)
        if self.grace_s is not None:
            _arm_kill(self.grace_s)
        return self.pruned


def _arm_kill(grace_s: float) -> None:
    """End this process ``grace_s`` from now unless it exits first: SIGALRM at its default action terminates
    a process in the kernel, even one stuck in native code that never returns to Python."""
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    except ValueError:  # ctx.log called from another thread: the handler stays, the timer is still armed
        pass
    signal.setitimer(signal.ITIMER_REAL, max(grace_s, 0.001))


def parse_payload(raw: bytes) -> dict | None:
    """A row's payload: its JSON lines (a prune notice, then the result) merged; None if unreadable."""
    try:
        payload = json.loads(raw)  # one line: the result alone, as nearly every row sends it
        if isinstance(payload, dict):
            return payload
    except ValueError:
        pass
    payload = {}
    for line in raw.split(b"\n"):
        if line.strip():
            try:
                part = json.loads(line)
            except ValueError:
                continue
            if isinstance(part, dict):
                payload.update(part)
    return payload or None


# --------------------------------------------------------------------------- replay

@dataclass
class ReplayRow:
    row_id: str
    status: str
    error: str
    runtime_s: float
    step: float | None = None  # the step it would be pruned at
    last_step: float | None = None  # the last step it logged
    rule: str | None = None
    prune_time: float | None = None  # the wall-clock time of the record it would be pruned at
    last_time: float | None = None  # that of its last record
    started: float | None = None  # its last claim's start (``started_at``, whole seconds)

    @property
    def by_time(self) -> bool:
        """Whether the saving can be read off the logged times: both records carry a time, and the record
        it would be pruned at belongs to the row's last run (a resumed row's earlier runs logged before
        ``started_at``)."""
        return (self.prune_time is not None and self.last_time is not None and self.last_time >= self.prune_time
                and (self.started is None or self.prune_time >= self.started))

    @property
    def saved_s(self) -> float:
        """What the prune would have saved of ``runtime_s``.

        From the logged times where they fit (:attr:`by_time`): the time from the record it would be pruned
        at to the last record, plus the row's tail after that record (its final test, its result) as far
        as ``started_at + runtime_s`` shows it. ``started_at`` holds whole seconds, rounded down, so the
        tail is never overstated, and a row's start-up (imports, data, model build), which a pruned row
        pays as well, is never counted. Otherwise ``runtime_s × (1 − step / last step)``: the share of the
        row's steps after the prune, which counts the start-up as if it were training."""
        if self.step is None:
            return 0.0
        if self.by_time:
            tail = self.started + self.runtime_s - self.last_time if self.started is not None else 0.0
            return min(self.runtime_s, (self.last_time - self.prune_time) + max(tail, 0.0))
        if not self.last_step or self.last_step <= 0:
            return 0.0
        return self.runtime_s * min(1.0, max(0.0, 1.0 - self.step / self.last_step))  # steps may be negative


@dataclass
class ReplayResult:
    rules: list
    rows: int = 0  # finished rows looked at
    with_history: int = 0
    records: int = 0
    evaluated: int = 0  # records the rules were evaluated on (a pruned row's end at its prune)
    missing_name: int = 0  # records that lacked a name a rule reads
    missing_names: set = field(default_factory=set)  # those names
    unevaluable: int = 0  # records on which a rule raised
    total_s: float = 0.0  # Σ runtime_s of the finished rows
    hits: list = field(default_factory=list)  # ReplayRow of the rows it prunes
    failed_rows: int = 0  # finished rows that failed (any reason but a prune)

    @property
    def pruned(self) -> int:
        return len(self.hits)

    @property
    def saved_s(self) -> float:
        return sum(hit.saved_s for hit in self.hits)

    @property
    def false_prunes(self) -> list:
        """Rows it prunes that finished successfully (``done``)."""
        return [hit for hit in self.hits if hit.status == "done"]

    def steps(self) -> list:
        """(step, rows pruned there), by step."""
        counts: dict = {}
        for hit in self.hits:
            counts[hit.step] = counts.get(hit.step, 0) + 1
        return sorted(counts.items())

    def lines(self) -> list[str]:
        rules = " | ".join(self.rules)
        out = [f"Replaying {rules} on {self.rows} finished rows ({self.with_history} with a history.jsonl, "
               f"{self.records} records)."]
        if not self.hits:
            out.append("It would prune no row.")
        else:
            # Rows a prune already stopped are not among the failed_rows: they are counted apart.
            stopped = sum(1 for hit in self.hits if hit.status == "failed" and hit.error.startswith(PRUNED + ":"))
            caught = sum(1 for hit in self.hits if hit.status == "failed") - stopped
            again = f", {stopped} that a prune already stopped" if stopped else ""
            out.append(f"It would prune {self.pruned} row(s): {caught} of the {self.failed_rows} that failed{again}, "
                       f"and {len(self.false_prunes)} that finished done.")
            out.append("At steps: " + ", ".join(f"{_num(step)} ({n} row{'s' if n > 1 else ''})"
                                                 for step, n in self.steps()))
            share = 100.0 * self.saved_s / self.total_s if self.total_s > 0 else 0.0
            by_steps = sum(1 for hit in self.hits if not hit.by_time)
            how = ("per pruned row, the time from the record it would be pruned at to the row's end "
                   "(its logged times, started_at and runtime_s)")
            if by_steps == self.pruned:
                how = "counted as runtime_s × (1 − prune step / last logged step) per pruned row (no logged times)"
            elif by_steps:
                how += (f"; {by_steps} row(s) by runtime_s × (1 − prune step / last logged step), where the times "
                        f"do not show it")
            out.append(f"Compute saved: {self.saved_s:.1f} row-seconds of {self.total_s:.1f} ({share:.1f}%): {how}.")
        if self.false_prunes:
            out.append(f"False prunes ({len(self.false_prunes)}): rows it prunes that finished done:")
            out += [f"  {hit.row_id} at step {_num(hit.step)} of {_num(hit.last_step)} by {hit.rule}"
                    for hit in self.false_prunes]
        else:
            out.append("False prunes: none.")
        if self.missing_name:
            out.append(f"{self.missing_name} of the {self.evaluated} records replayed lacked "
                       f"{', '.join(sorted(self.missing_names))} (a record without a name a rule reads never "
                       f"prunes; the task logs some metrics less often than others, or never).")
        if self.unevaluable:
            out.append(f"{self.unevaluable} record(s) could not be evaluated (such a record never prunes).")
        return out


def replay(grid_dir: str | Path, rules: list[str]) -> ReplayResult:
    """Replay ``rules`` (in order, each record in step order) on every finished row's learning curve."""
    from gridrunner.grid import saved_spec
    from gridrunner.spec import BOOK_COLUMNS, decode_cell, task_params
    from gridrunner.store import ERROR, RUNTIME, STARTED, STATUS, GridStore, parse_iso

    if isinstance(rules, str):
        rules = [rules]
    if not rules:
        raise GridError("give at least one rule to replay, e.g. 'step >= 200 and val_ssim < 0.3'")
    grid_dir = Path(grid_dir)
    spec = saved_spec(grid_dir)
    parsed = []
    for text in rules:
        try:
            parsed.append(check_rule(text, spec.params + list(spec.fixed), BOOK_COLUMNS))
        except ExprError as err:
            raise GridError(str(err)) from None
    names = set().union(*(rule.names for rule in parsed))
    store = GridStore(grid_dir)
    result = ReplayResult(rules=list(rules))
    for shard in store.read_all():
        p = shard.n_params
        for i in shard.valid():
            fields = shard.records[i]
            status, error = fields[p + STATUS], fields[p + ERROR]
            if status not in ("done", "failed"):
                continue
            row_id = fields[p]
            params = task_params(spec.fixed, {name: decode_cell(cell) for name, cell in zip(shard.params, fields[:p])
                                              if cell != ""})
            try:
                runtime = float(fields[p + RUNTIME] or 0.0)
            except ValueError:
                runtime = 0.0
            runtime = runtime if math.isfinite(runtime) else 0.0  # a hand-edited "inf" counts as nothing
            result.rows += 1
            result.total_s += runtime
            if status == "failed" and not error.startswith(PRUNED + ":"):
                result.failed_rows += 1
            row = ReplayRow(row_id, status, error, runtime, started=parse_iso(fields[p + STARTED]))
            history = _history(store.row_dir(row_id))
            if history:
                result.with_history += 1
            for record in history:
                result.records += 1
                row.last_step, row.last_time = record["step"], _time(record)
                if row.step is not None:
                    continue
                values = {**params, **record}
                result.evaluated += 1
                lacking = names - set(values)
                if lacking:
                    result.missing_name += 1
                    result.missing_names |= lacking
                for rule in parsed:
                    try:
                        fired = rule.evaluate(values) is True
                    except ExprError:
                        result.unevaluable += 1
                        continue
                    if fired:
                        row.step, row.rule, row.prune_time = record["step"], rule.text, _time(record)
                        break
            if row.step is not None:
                result.hits.append(row)
    return result


def _history(row_dir: Path) -> list[dict]:
    """The row's logged records with a numeric step, sorted by step (a resumed row appends; a line cut off by
    a kill is skipped)."""
    path = row_dir / "history.jsonl"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) \
                and not isinstance(record.get("step"), bool):
            records.append(record)
    records.sort(key=lambda r: r["step"])  # stable: a resumed row's repeated steps keep their order
    return records


def _time(record: dict) -> float | None:
    value = record.get("time")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _num(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
