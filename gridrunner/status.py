"""Progress of a grid: counts per shard, running rows and their age, stale claims, bad rows, an ETA.

Reads every shard once without locks (a shard is replaced atomically, so each read is consistent)
and never imports pandas, so ``gridrunner status`` stays fast on a grid of 100,000 rows.

Three views of one :class:`GridStatus`: :func:`render` (rich text), :func:`to_json` (the document
``status --json`` prints; its schema is in the README) and :func:`watch` (either, again every few
seconds until the grid is finished).
"""
from __future__ import annotations

import io
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gridrunner.errors import ShardError
from gridrunner.grid import saved_spec
from gridrunner.spec import STATUSES
from gridrunner.store import (
    ERROR,
    RUNTIME,
    STARTED,
    STATUS,
    WORKER,
    GridStore,
    parse_iso,
)
from gridrunner.worker import Liveness, make_worker_id
from gridrunner.reconcile import hand_edit_report


@dataclass
class ShardStatus:
    path: Path
    counts: Counter = field(default_factory=Counter)
    bad: list = field(default_factory=list)  # (line, message)
    error: str | None = None  # the whole shard is unreadable
    unmerged: bool = False  # saved by hand and not merged yet: the counts are the merge's (GridStore.view)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class RunningRow:
    row_id: str
    shard: str
    worker: str
    age_s: float | None
    stale: bool


@dataclass
class GridStatus:
    grid_dir: Path
    name: str
    shards: list = field(default_factory=list)
    running: list = field(default_factory=list)
    runtimes: list = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)  # error kind -> count
    duplicates: list = field(default_factory=list)  # (row_id, [shard names])
    jobs: list = field(default_factory=list)  # filled in by submission: dicts with job_id, state, ...
    hand_edits: list = field(default_factory=list)  # lines: what reconciliations did, and what awaits one

    @property
    def counts(self) -> Counter:
        total = Counter()
        for shard in self.shards:
            total.update(shard.counts)
        return total

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def stale(self) -> list:
        return [r for r in self.running if r.stale]

    @property
    def finished(self) -> bool:
        counts = self.counts
        return counts["not_run"] == 0 and counts["running"] == 0

    def eta_s(self) -> float | None:
        """Remaining rows × median runtime / live workers (None until a row has finished, and while no live
        worker runs a row: nothing is making progress, so there is no time to tell)."""
        if not self.runtimes:
            return None
        counts = self.counts
        remaining = counts["not_run"] + counts["running"]
        live = len({r.worker for r in self.running if not r.stale})
        if live == 0:
            return None
        return remaining * statistics.median(self.runtimes) / live


#: Failed rows that the grid's own rules stopped, by the prefix of their ``error`` cell.
STOPPED_KINDS = {"Pruned": "pruned", "Hung": "hung", "TimeLimit": "time_limit"}


def stopped_counts(status: GridStatus) -> dict[str, int]:
    """How many failed rows a prune rule, ``hang_after_min`` and ``row_time_limit_min`` stopped:
    ``{"pruned": n, "hung": n, "time_limit": n}``."""
    return {name: status.errors.get(kind, 0) for kind, name in STOPPED_KINDS.items()}


def grid_status(grid_dir: str | Path, store: GridStore | None = None) -> GridStatus:
    """The grid's state as the journal vouches for it: a shard saved by hand that no transaction has merged
    yet is counted as the merge will make it (:meth:`GridStore.view`, computed without writing), so a stale
    copy saved over newer results never shows them as not run. ``store``: one kept across looks (``--watch``)
    merges each such version once."""
    grid_dir = Path(grid_dir)
    spec = saved_spec(grid_dir)
    store = store or GridStore(grid_dir)
    judge = Liveness(grid_dir, spec.lease_s, me=make_worker_id(pid=0))
    status = GridStatus(grid_dir, spec.name)
    seen: dict[str, str] = {}
    now = time.time()
    status.hand_edits = hand_edit_report(store)
    for path in store.shard_paths():
        entry = ShardStatus(path)
        status.shards.append(entry)
        try:
            shard = store.view(path)
        except (ShardError, FileNotFoundError) as err:
            entry.error = str(err)
            continue
        entry.bad = shard.bad_rows()
        entry.unmerged = shard.unmerged
        p = shard.n_params
        for i in shard.valid():
            fields = shard.records[i]
            state = fields[p + STATUS]
            entry.counts[state] += 1
            rid = fields[p]
            if rid in seen:
                status.duplicates.append((rid, [seen[rid], path.name]))
            seen[rid] = path.name
            if state == "running":
                started = parse_iso(fields[p + STARTED])
                worker = fields[p + WORKER]
                status.running.append(RunningRow(rid, path.name, worker,
                                                 None if started is None else now - started,
                                                 judge(worker, fields[p + STARTED])))
            elif state in ("done", "failed"):
                runtime = fields[p + RUNTIME]
                if runtime:
                    status.runtimes.append(float(runtime))
                if state == "failed":
                    status.errors[fields[p + ERROR].split(":", 1)[0] or "?"] += 1
    return status


def current_status(grid_dir: str | Path, store: GridStore | None = None) -> GridStatus:
    """The grid's status with its jobs (from the scheduler, if it ran on Slurm): what ``status`` shows."""
    from gridrunner.submit import job_states

    status = grid_status(grid_dir, store)
    status.jobs = job_states(Path(grid_dir))
    return status


#: The version of :func:`to_json`'s document. New keys may appear without a new version; a key that is
#: removed or changes its meaning gets a new one.
JSON_SCHEMA_VERSION = 1


def to_json(status: GridStatus, now: float | None = None) -> dict:
    """The status as plain JSON types: every count, each shard's progress, running and stale rows,
    failures by kind, the ETA and the jobs (the README's "status --json" lists the keys)."""

    def counts_of(counter: Counter) -> dict:
        out = {state: counter[state] for state in STATUSES}
        out.update({state: n for state, n in counter.items() if state not in out})
        return out

    def running_row(row: RunningRow) -> dict:
        return {"row_id": row.row_id, "shard": row.shard, "worker": row.worker,
                "age_s": None if row.age_s is None else round(row.age_s, 3), "stale": row.stale}

    counts = status.counts
    eta = None if status.finished else status.eta_s()
    shards = []
    for shard in status.shards:
        c = shard.counts
        finished = c["done"] + c["failed"]
        shards.append({"name": shard.path.name, "path": str(shard.path), "total": shard.total,
                       "finished": finished, "progress": finished / shard.total if shard.total else 1.0,
                       "counts": counts_of(c), "bad_rows": [{"line": line, "message": message}
                                                            for line, message in shard.bad],
                       "error": shard.error, "unmerged": shard.unmerged})
    finished = counts["done"] + counts["failed"]
    return {
        "schema": JSON_SCHEMA_VERSION,
        "grid": status.name,
        "grid_dir": str(status.grid_dir),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now)),
        "finished": status.finished,
        "total": status.total,
        "finished_rows": finished,
        "progress": finished / status.total if status.total else 1.0,
        "counts": counts_of(counts),
        "bad_rows": sum(len(shard.bad) for shard in status.shards),
        "unreadable_shards": sum(1 for shard in status.shards if shard.error),
        "unmerged_shards": sum(1 for shard in status.shards if shard.unmerged),
        "shards": shards,
        "running": [running_row(row) for row in sorted(status.running, key=lambda r: -(r.age_s or 0))],
        "stale": [running_row(row) for row in status.stale],
        "live_workers": len({r.worker for r in status.running if not r.stale}),
        "failures": {"by_kind": dict(status.errors.most_common()), "stopped": stopped_counts(status)},
        "median_runtime_s": statistics.median(status.runtimes) if status.runtimes else None,
        "eta_s": None if eta is None else round(eta, 3),
        "duplicates": [{"row_id": row_id, "shards": names} for row_id, names in status.duplicates],
        "jobs": [dict(job) for job in status.jobs],
    }


def make_console(file=None):
    """A rich console for status output. Off a terminal (a pipe, a file, a log) it never breaks a
    line in the middle, so every line stays whole for ``grep`` and scripts."""
    from rich.console import Console

    console = Console(file=file)
    if not console.is_terminal:
        console.soft_wrap = True
        console.width = 100_000  # tables too are laid out at their own width, never squeezed or cut
    return console


def watch(load, console, interval_s: float, as_json: bool = False, sleep=time.sleep) -> GridStatus:
    """Show ``load()`` (a :class:`GridStatus`) every ``interval_s`` seconds until the grid is finished.

    On a terminal the text is redrawn in place. Elsewhere each change of the counts prints the status
    again, whole, after a blank line (the ages of running rows alone are no change). ``as_json`` prints
    one :func:`to_json` document per line at every look. Returns the last status; Ctrl-C ends the watch
    (the caller decides what that means)."""
    if as_json:
        while True:
            status = load()
            console.file.write(json.dumps(to_json(status)) + "\n")
            console.file.flush()
            if status.finished:
                return status
            sleep(interval_s)
    if not console.is_terminal:
        shown = None
        while True:
            status = load()
            key = _change_key(status)
            if key != shown:
                if shown is not None:
                    console.print()
                render(status, console)
                console.file.flush()
                shown = key
            if status.finished:
                return status
            sleep(interval_s)
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    def draw(status: GridStatus):
        buffer = Console(file=io.StringIO(), force_terminal=True, color_system=console.color_system,
                         width=console.width)
        render(status, buffer)
        return Text.from_ansi(buffer.file.getvalue().rstrip("\n"))

    status = load()
    with Live(draw(status), console=console, auto_refresh=False, transient=False) as live:
        while not status.finished:
            sleep(interval_s)
            status = load()
            live.update(draw(status), refresh=True)
    return status


def _change_key(status: GridStatus) -> tuple:
    return (tuple(tuple(sorted(s.counts.items())) + (len(s.bad), s.error) for s in status.shards),
            tuple(sorted((r.row_id, r.worker, r.stale) for r in status.running)),
            tuple(tuple(sorted(job.items())) for job in status.jobs))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def render(status: GridStatus, console, max_shards: int = 40, max_running: int = 20) -> None:
    """Print the status with rich: a bar per shard, counts, running rows, stale claims, bad rows, ETA."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    counts = status.counts
    total = status.total
    finished = counts["done"] + counts["failed"]
    console.print(f"[bold]{status.name}[/] ({status.grid_dir}): {finished}/{total} finished, "
                  + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
                  + f"; ETA {format_duration(status.eta_s()) if not status.finished else 'done'}")
    table = Table(box=None, pad_edge=False)
    for column in ("shard", "progress", "done", "failed", "running", "not_run", "bad"):
        table.add_column(column, justify="left" if column in ("shard", "progress") else "right")
    shown = status.shards if len(status.shards) <= max_shards else status.shards[:max_shards]
    for shard in shown:
        if shard.error:  # the reason goes below the table, on a line of its own that is never wrapped
            table.add_row(shard.path.name, "[red]unreadable[/]", "", "", "", "", "")
            continue
        c = shard.counts
        bar = ProgressBar(total=max(shard.total, 1), completed=c["done"] + c["failed"], width=24)
        table.add_row(shard.path.name, bar, str(c["done"]), str(c["failed"]), str(c["running"]), str(c["not_run"]),
                      str(len(shard.bad)) if shard.bad else "")
    console.print(table)
    if len(status.shards) > max_shards:
        console.print(f"... and {len(status.shards) - max_shards} more shards")
    if status.running:
        console.print(f"[bold]running[/] ({len(status.running)}):")
        for row in sorted(status.running, key=lambda r: -(r.age_s or 0))[:max_running]:
            flag = " [red]STALE: its worker is gone; the next worker reclaims it[/]" if row.stale else ""
            console.print(f"  {row.row_id} {row.shard} {format_duration(row.age_s)} by {row.worker}{flag}")
    stopped = stopped_counts(status)
    if any(stopped.values()):
        console.print(f"[bold]stopped by the grid's rules:[/] {stopped['pruned']} pruned, {stopped['hung']} hung, "
                      f"{stopped['time_limit']} past their time limit")
    if status.errors:
        console.print("[bold]failures by kind:[/] " + ", ".join(f"{k} {n}" for k, n in status.errors.most_common(8)))
    for shard in status.shards:
        if shard.error:
            console.print(f"[red]unreadable shard[/] {shard.error}", soft_wrap=True)
        for line, message in shard.bad[:5]:
            console.print(f"[red]bad row[/] {shard.path}:{line}: {message}")
    for row_id, names in status.duplicates[:5]:
        console.print(f"[red]duplicate row[/] {row_id} in {' and '.join(names)}: delete one copy")
    for line in status.hand_edits:
        console.print(f"[bold]hand edit[/] {line}", soft_wrap=True)
    for job in status.jobs:
        console.print(f"job {job.get('job_id')}: {job.get('state')} {job.get('detail', '')}".rstrip())
