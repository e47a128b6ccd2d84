"""Helpers of the reliability tests: reading a grid's rows and leftovers, execution logs, snapshots."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from gridrunner.store import GridStore

# What a transaction may leave beside a shard only while it runs: its temporary file, its lock, a lock
# being broken, a split's pending shard.
LEFTOVER = re.compile(r"^\.shard-.*\.tmp$|\.lock$|\.broken-|\.pending$")


def rows(grid: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every valid row of a grid (but of the shards named in ``skip``), by row id, as {column: cell}."""
    store = GridStore(grid)
    out = {}
    for path in store.shard_paths():
        if path.name in skip:
            continue
        shard = store.read(path)
        for i in shard.valid():
            record = dict(zip(shard.header, shard.records[i]))
            assert record["row_id"] not in out, f"row {record['row_id']} is in two shards"
            out[record["row_id"]] = record
    return out


def leftovers(grid: Path) -> list[str]:
    """Names in the shard folder that only a transaction in progress may have there."""
    return sorted(p.name for p in (Path(grid) / "shards").iterdir() if LEFTOVER.search(p.name))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too), by relative path, with its bytes."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Execution:
    """One run of ``reliability_tasks:run``: which row, which process, under which worker."""

    row_id: str
    token: int
    pid: int
    worker_pid: int
    spawner_pid: int = 0  # the process that forked the row's (the worker's own pid for inline rows)
    finished: bool = False


def executions(side_file: Path) -> dict[int, Execution]:
    """The executions that ``reliability_tasks:run`` logged, by token."""
    out: dict[int, Execution] = {}
    if not Path(side_file).exists():
        return out
    for line in Path(side_file).read_text().splitlines():
        event, row_id, token, pid, worker, spawner = line.split()
        if event == "start":
            out[int(token)] = Execution(row_id, int(token), int(pid), int(worker), int(spawner))
        else:
            out[int(token)].finished = True
    return out


def by_row(runs: dict[int, Execution]) -> dict[str, list[Execution]]:
    grouped: dict[str, list[Execution]] = defaultdict(list)
    for run in runs.values():
        grouped[run.row_id].append(run)
    return grouped


def cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run ``gridrunner ARGS`` in a fresh interpreter from the current directory."""
    return subprocess.run([sys.executable, "-m", "gridrunner.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def fork(target, *args) -> int:
    """Run ``target(*args)`` in a forked child that never returns into the caller; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target(*args)
        except BaseException:  # noqa: BLE001 - report and leave; the test reads the exit code
            code = 1
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def watch_shards(grid: str, stop_file: str, out_file: str) -> None:
    """A reader process: parse every shard in a loop, without locks, until ``stop_file`` exists.

    Each read must be a whole shard that follows the CSV contract, with the header and the row ids it
    had at the start. Across reads, a row's ``attempts`` never goes down, no row goes back to
    ``not_run``, and a ``done`` row never changes again. Writes a JSON summary to ``out_file``.
    """
    import json
    import time

    from gridrunner.store import Shard, read_bytes

    store = GridStore(grid)
    paths = store.shard_paths()
    first = {p: store.read(p) for p in paths}
    expected = {p: (s.header, sorted(s.records[i][s.n_params] for i in s.valid())) for p, s in first.items()}
    seen: dict[str, tuple] = {}
    reads = 0
    failures: list[str] = []
    states: set = set()
    Path(out_file + ".ready").write_text("ready")

    def fail(message: str) -> None:
        if len(failures) < 20:
            failures.append(message)

    while not os.path.exists(stop_file):
        for path in paths:
            try:
                text = read_bytes(path).decode("utf-8")  # as the store reads: ESTALE retried
                shard = Shard.parse(path, text)
            except Exception as err:  # noqa: BLE001 - every way a read can go wrong is a finding
                fail(f"read {reads}: {path.name}: {type(err).__name__}: {err}")
                continue
            reads += 1
            if shard.errors:
                fail(f"read {reads}: {path.name}: bad rows {shard.bad_rows()[:3]}")
            header, ids = expected[path]
            if shard.header != header:
                fail(f"read {reads}: {path.name}: header changed to {shard.header}")
            p = shard.n_params
            if sorted(r[p] for r in shard.records) != ids:
                fail(f"read {reads}: {path.name}: the set of rows changed")
            for fields in shard.records:
                rid, status, attempts = fields[p], fields[p + 1], int(fields[p + 2] or 0)
                states.add(status)
                state = tuple(fields[p + 1:])
                before = seen.get(rid)
                if before is not None:
                    if before[0] == "done" and state != before:
                        fail(f"read {reads}: finished row {rid} changed from {before} to {state}")
                    if attempts < int(before[1] or 0):
                        fail(f"read {reads}: attempts of {rid} went down from {before[1]} to {attempts}")
                    if status == "not_run" and before[0] != "not_run":
                        fail(f"read {reads}: row {rid} went back to not_run from {before[0]}")
                seen[rid] = state
        time.sleep(0.002)
    Path(out_file).write_text(json.dumps({"reads": reads, "failures": failures, "rows": len(seen),
                                          "statuses_seen": sorted(states)}))


def start_reader(grid: Path, directory: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start :func:`watch_shards` in its own process; returns (process, stop file, summary file)."""
    import time

    stop, out = Path(directory) / "reader.stop", Path(directory) / "reader.json"
    code = f"import reliability_tools as t; t.watch_shards({str(grid)!r}, {str(stop)!r}, {str(out)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not Path(str(out) + ".ready").exists():
        assert proc.poll() is None, "the reader process died at start"
        assert time.monotonic() < deadline, "the reader process did not start"
        time.sleep(0.02)
    return proc, stop, out


def stop_reader(proc: subprocess.Popen, stop: Path, out: Path) -> dict:
    import json

    stop.write_text("stop")
    assert proc.wait(timeout=60) == 0, "the reader process failed"
    return json.loads(out.read_text())
