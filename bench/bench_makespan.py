"""Makespan with stragglers: static shards against work stealing, with and without cost-ordered claiming.

The rows sleep for durations of the study's shape: most runs short, a heavy tail up to 12 times the
shortest. Duration ``i`` of ``R`` is ``base · 12 ** (u ** 3)`` with ``u = i / (R − 1)``, and the grid
lists them in a seeded random order, so a static split gives each worker a random mix. 8 workers run
8 shards of R/8 rows:

* **static**: one CSV per worker, ``gridrunner work --shard i --no-steal`` (the study's scheme);
* **stealing**: the same shards, work stealing on (the default);
* **stealing + cost**: the same, with ``cost: duration`` in the spec: ``make`` deals rows into the shards
  most expensive first and workers claim in file order, so the longest rows start first.

* **stealing + cost, no linger**: the same, with ``--no-linger``: a worker with nothing to claim exits
  instead of waiting for the others' rows (workers in Slurm while the grid's watcher is on duty).

Makespan: from starting the 8 worker processes until the last row's ``finish`` line is written to the
side file (its mtime), so it includes the workers' start-up but not a lingering worker's last poll.
Allocated worker-seconds: each worker process's lifetime, summed; busy: the rows' runtimes, summed.
Lower bound: max(sum of durations / 8, longest duration), the task time alone.

    .venv/bin/python bench/bench_makespan.py            # 320 rows, 3 repeats (about 5 minutes)
    .venv/bin/python bench/bench_makespan.py --quick    # 96 rows, one repeat
    .venv/bin/python bench/bench_makespan.py --straggler 15   # the longest row lasts 15 s
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

import common  # noqa: E402
from common import fmt, median, with_spread  # noqa: E402

WORKERS = 8
MODES = ("static", "stealing", "stealing + cost", "stealing + cost, no linger")


def durations(rows: int, longest: float, tail: float = 12.0) -> list[float]:
    base = longest / tail
    return [round(base * tail ** ((i / (rows - 1)) ** 3), 4) for i in range(rows)]


def run_mode(mode: str, times: list[float], tag: str) -> dict:
    base = common.scratch(f"makespan/{tag}")
    record = base / "executions.txt"
    order = times[:]
    random.Random(0).shuffle(order)
    spec = {
        "name": "bench",
        "task": "gridrunner.tasks.toy:sleep",
        "grid": {"job": [{"i": i, "duration": d} for i, d in enumerate(order)]},
        "fixed": {"record_to": str(record)},
        "outcomes": ["slept"],
        "max_len": len(times) // WORKERS,
    }
    if mode.startswith("stealing + cost"):
        spec["cost"] = "duration"
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100_000))
    grid = common.make_grid(path, base)
    extra = ("--no-steal",) if mode == "static" else ("--no-linger",) if mode.endswith("no linger") else ()
    start = time.time()
    lifetimes, codes, wall = run_workers(common.gridrunner_workers(grid, WORKERS, *extra))
    makespan = record.stat().st_mtime - start
    statuses = common.grid_row_ids(grid)
    duplicates, missing, _ = common.count_executions(record, set(statuses))
    busy = sum(float(row["runtime_s"] or 0) for shard in (grid / "shards").glob("shard-*.csv")
               for row in csv.DictReader(shard.open(newline="")))
    shutil.rmtree(base, ignore_errors=True)
    return {"makespan": makespan, "wall": wall, "dup": duplicates, "missing": missing, "ok": all(c == 0 for c in codes),
            "allocated": sum(lifetimes), "busy": busy}


def run_workers(commands: list[list[str]]) -> tuple[list[float], list[int], float]:
    """Start every worker at once; (each one's lifetime in s, exit codes, wall time to the last exit). A
    worker's lifetime is what an array task holding it would be allocated, start-up included."""
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for cmd in commands]
    ended: dict[int, float] = {}
    while len(ended) < len(procs):
        for k, proc in enumerate(procs):
            if k not in ended and proc.poll() is not None:
                ended[k] = time.perf_counter() - start
        time.sleep(0.02)
    return [ended[k] for k in range(len(procs))], [p.returncode for p in procs], max(ended.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=320, help="rows (a multiple of 8)")
    parser.add_argument("--longest", type=float, default=3.0, help="seconds of the longest row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="96 rows, one repeat")
    parser.add_argument("--straggler", type=float, default=0.0,
                        help="seconds of one more row, the grid's longest (0: none)")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 96, 1
    if args.rows % WORKERS:
        parser.error(f"--rows must be a multiple of {WORKERS}")
    load_before = common.load_average()
    started = time.perf_counter()
    times = durations(args.rows, args.longest)
    if args.straggler:
        times = times[:-1] + [args.straggler]  # the longest row becomes the straggler; shards stay even
    bound = max(sum(times) / WORKERS, max(times))
    results = {mode: [] for mode in MODES}
    for k in range(args.repeats):
        for mode in MODES:  # interleaved, so a burst of load on the machine hits every mode alike
            run = run_mode(mode, times, f"{mode.replace(' + ', '-')}-{k}")
            results[mode].append(run)
            print(f"{mode:26s} makespan {run['makespan']:6.2f} s (bound {bound:.2f}), workers exited after "
                  f"{run['wall']:.2f} s, busy {run['busy']:.1f} of {run['allocated']:.1f} worker-s, dup {run['dup']} "
                  f"missing {run['missing']}", flush=True)
    minutes = (time.perf_counter() - started) / 60
    short = sum(1 for t in times if t < 2 * min(times))
    lines = [
        *common.section("Makespan with stragglers" if not args.straggler else
                        f"Makespan with one straggler of {fmt(args.straggler)} s", load_before, minutes),
        f"{args.rows} sleep rows, 8 workers, 8 shards of {args.rows // WORKERS}. Durations "
        f"{fmt(min(times))}–{fmt(max(times))} s (mean {fmt(sum(times) / len(times))} s, median "
        f"{fmt(median(times))} s; {short} of {args.rows} under twice the shortest). Lower bound "
        f"max(total / 8, longest) = max({fmt(sum(times) / WORKERS)}, {fmt(max(times))}) = {fmt(bound)} s. "
        "Makespan runs from starting the workers to the last row's end, so it includes starting 8 "
        "worker processes. *Worker-s*: each worker's lifetime, summed (what array tasks would be allocated), "
        "and the rows' runtimes (busy). *no linger*: `--no-linger`, as workers in Slurm with a watcher on "
        "duty: a worker with nothing to claim exits. Median of the repeats (min–max).",
        "",
        common.table(["mode", "runs", "makespan s", "makespan / bound", "allocated worker-s", "busy worker-s",
                      "busy / allocated", "dup", "missing"],
                     [[mode, len(runs), with_spread([r["makespan"] for r in runs]),
                       with_spread([r["makespan"] / bound for r in runs]),
                       with_spread([r["allocated"] for r in runs]), with_spread([r["busy"] for r in runs]),
                       with_spread([r["busy"] / r["allocated"] for r in runs]),
                       max(r["dup"] for r in runs), max(r["missing"] for r in runs)]
                      for mode, runs in results.items()]),
    ]
    common.publish("makespan" if not args.straggler else "makespan_straggler", lines, readme=not args.no_readme)


if __name__ == "__main__":
    main()
