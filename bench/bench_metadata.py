"""Metadata load on the grid's filesystem: operations per idle second and per row, counted with strace.

A shared filesystem's metadata server serves every ``stat``, ``open``, directory listing, ``rename`` and
``unlink`` of every process on a cluster. gridrunner's budget:

* an idle process (a lingering worker, the watcher) makes at most 1 such operation a second, whatever
  the number of shards;
* a row's own claim and record make at most 50, not counting the task's own I/O.

Counted with ``strace -f`` on the real processes: the system calls ``open openat stat lstat newfstatat
statx access faccessat2 getdents64 rename renameat renameat2 unlink unlinkat utimensat mkdir link
readlink``. A call counts as the grid's when its path lies in the grid's directory (relative paths
resolve there too: every process here starts in it); ``all`` also counts Python's own (``/proc``,
imports, ``/dev``), which a cluster's shared filesystem does not serve unless the code lives there.

Scenarios, each on a grid of S shards whose only open row is a 600 s row held by a live worker:

* **lingering worker**: ``gridrunner work`` (it lingers by default) with nothing to claim, traced for
  ``--window`` seconds after it settled;
* **watcher**: :class:`gridrunner.watcher.Watcher` on the same grid (the local launcher, so the holder is
  judged by its pid; on Slurm the queue is asked with ``squeue``, which touches no file);
* **per row**: ``gridrunner work`` over R no-op rows (on one shard and spread over S shards), traced from
  its start: operations on the grid's files per row, start-up included.

    .venv/bin/python bench/bench_metadata.py            # S = 10, 100, 1000; about 3 minutes
    .venv/bin/python bench/bench_metadata.py --quick    # S = 10, 100
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

import common  # noqa: E402

CALLS = ("open", "openat", "stat", "lstat", "newfstatat", "statx", "access", "faccessat2", "getdents64", "rename",
         "renameat", "renameat2", "unlink", "unlinkat", "utimensat", "mkdir", "link", "readlink")
LINE = re.compile(r"^\d+\s+(\w+)\((.*)$")


def count(trace: Path, grid: Path) -> tuple[Counter, Counter]:
    """(calls on the grid's files by name, all calls by name) in an strace output file. A ``getdents64``
    names a descriptor: it is the grid's when that descriptor was opened on a path of the grid."""
    mine, every = Counter(), Counter()
    root = str(grid.resolve())
    opened: dict[tuple[str, str], str] = {}  # (pid, fd) -> path
    for line in trace.read_text(errors="replace").splitlines():
        match = LINE.match(line)
        if not match or match.group(1) not in CALLS:
            continue
        pid = line.split()[0]
        name, args = match.groups()
        every[name] += 1
        if name == "getdents64":
            path = opened.get((pid, args.split(",")[0]), "")
        else:
            quoted = re.search(r'"([^"]*)"', args)
            path = quoted.group(1) if quoted else ""
            result = re.search(r"= (\d+)$", line)
            if name in ("open", "openat") and result:
                opened[(pid, result.group(1))] = path if path.startswith("/") else os.path.join(root, path)
        if path.startswith(root) or (path and not path.startswith("/")):
            mine[name] += 1
    return mine, every


def make(base: Path, shards: int, rows_per_shard: int = 3, duration: int = 600) -> Path:
    spec = {"name": "meta", "task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "max_len": rows_per_shard,
            "cost": "duration", "lease_s": 120,
            "grid": [{"i": [0], "duration": [duration]}, {"i": list(range(1, shards * rows_per_shard)),
                                                          "duration": [0.0]}]}
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return common.make_grid(path, base)


def finish_short_rows(grid: Path) -> None:
    """Mark every row but the long one done, as if a grid had run to its tail."""
    from gridrunner.store import GridStore, STATUS, now_iso, FINISHED

    store = GridStore(grid)
    for path in store.shard_paths():
        with store.transaction(path) as shard:
            p = shard.n_params
            for fields in shard.records:
                if fields[shard.header.index("duration")] != "600":
                    fields[p + STATUS] = "done"
                    fields[p + FINISHED] = now_iso()
            shard.dirty = True


def trace_for(pid: int, seconds: float, out: Path) -> None:
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", f"trace={','.join(CALLS)}", "-o", str(out), "-p", str(pid)],
                              stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)


def idle_case(shards: int, window: float, what: str) -> dict:
    base = common.scratch(f"metadata/{what}-{shards}")
    grid = make(base, shards)
    finish_short_rows(grid)
    holder = subprocess.Popen([*common.gridrunner_command(), "work", "--grid", str(grid), "--shard", "0", "--quiet"],
                              cwd=grid, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert_running(grid)
        if what == "lingering worker":
            command = [*common.gridrunner_command(), "work", "--grid", str(grid), "--quiet"]
        else:
            code = ("import sys, signal; from gridrunner.watcher import Watcher, LocalLauncher; "
                    f"w = Watcher({str(grid)!r}, 8, LocalLauncher([])); signal.signal(signal.SIGTERM, w.request_stop); "
                    "w.run()")
            command = [sys.executable, "-c", code]
        idle = subprocess.Popen(command, cwd=grid, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(8.0)  # started, its first pass over the shards done, backed off to its idle pace
            trace = base / "trace.txt"
            trace_for(idle.pid, window, trace)
            mine, every = count(trace, grid)
        finally:
            idle.send_signal(signal.SIGTERM)
            idle.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    shutil.rmtree(base, ignore_errors=True)
    return {"grid": sum(mine.values()) / window, "all": sum(every.values()) / window, "calls": mine}


def assert_running(grid: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(",running," in p.read_text() for p in (grid / "shards").glob("shard-*.csv")):
            return
        time.sleep(0.1)
    raise RuntimeError("the holder never claimed its row")


def per_row_case(rows: int, shards: int) -> dict:
    base = common.scratch(f"metadata/rows-{shards}")
    spec = {"name": "meta", "task": "gridrunner.tasks.toy:noop", "outcomes": ["value"],
            "max_len": max(rows // shards, 1), "grid": {"i": list(range(rows))}}
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    grid = common.make_grid(path, base)
    trace = base / "trace.txt"
    subprocess.run(["strace", "-f", "-qq", "-e", f"trace={','.join(CALLS)}", "-o", str(trace),
                    *common.gridrunner_command(), "work", "--grid", str(grid), "--quiet"], cwd=grid, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mine, every = count(trace, grid)
    shutil.rmtree(base, ignore_errors=True)
    return {"grid": sum(mine.values()) / rows, "all": sum(every.values()) / rows, "calls": mine}


def top(calls: Counter, n: int = 4) -> str:
    return ", ".join(f"{name} {k}" for name, k in calls.most_common(n)) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--window", type=float, default=20.0, help="seconds each idle process is traced")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="S = 10, 100; 10 s windows")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.shards, args.window = [10, 100], 10.0
    if not shutil.which("strace"):
        sys.exit("bench_metadata needs strace (apt-get install strace)")
    load_before = common.load_average()
    started = time.perf_counter()
    idle_rows = []
    for shards in args.shards:
        for what in ("lingering worker", "watcher"):
            got = idle_case(shards, args.window, what)
            print(f"{what:16s} S={shards:5d}: {got['grid']:.2f} ops/s on the grid's files ({top(got['calls'])}), "
                  f"{got['all']:.2f} ops/s in all", flush=True)
            idle_rows.append([what, shards, common.fmt(got["grid"]), common.fmt(got["all"]), top(got["calls"])])
    row_rows = []
    for shards in (1, min(args.shards[-1], args.rows // 2)):
        got = per_row_case(args.rows, shards)
        print(f"per row, {args.rows} rows in {shards} shard(s): {got['grid']:.1f} ops/row on the grid's files "
              f"({top(got['calls'])}), {got['all']:.1f} in all", flush=True)
        row_rows.append([args.rows, shards, common.fmt(got["grid"]), common.fmt(got["all"]), top(got["calls"])])
    minutes = (time.perf_counter() - started) / 60
    lines = [
        *common.section("Metadata operations", load_before, minutes),
        "File-system metadata calls (" + " ".join(CALLS) + ") counted with `strace -f`. *grid*: calls on the "
        "grid's files; *all*: every such call, Python's own included. Targets: an idle worker or the watcher ≤ 1 "
        "operation/s whatever the shard count; a row's claim and record ≤ 50 operations. In Slurm an idle worker "
        "exits (0 operations) while the watcher is on duty; the lingering worker is `gridrunner work`, local "
        "submissions, and the fallback without a watcher.",
        "",
        f"Idle, on a grid of S shards whose one open row runs in a live worker ({common.fmt(args.window)} s traced "
        "after 8 s of settling):",
        "",
        common.table(["process", "shards", "grid ops/s", "all ops/s", "most frequent (grid)"], idle_rows),
        "",
        f"Per row: one `gridrunner work` over {args.rows} no-op rows, traced from its start (start-up and its "
        "heartbeat included, divided over the rows):",
        "",
        common.table(["rows", "shards", "grid ops/row", "all ops/row", "most frequent (grid)"], row_rows),
    ]
    common.publish("metadata", lines, readme=not args.no_readme)


if __name__ == "__main__":
    main()
