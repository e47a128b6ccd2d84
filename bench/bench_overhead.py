"""Orchestration overhead: gridrunner against Optuna's GridSampler and the study's CSV-per-worker scheme.

Every system runs the same grid of ``gridrunner.tasks.toy:noop`` rows (or 50 ms sleeps) with N worker processes
and counts every execution in a side file, so duplicates and missing rows are measured, not assumed:

* **gridrunner**: N ``gridrunner work --shard i`` processes on one grid (the default 100-row shards,
  work stealing on). Each row runs in a fresh process, forked by the worker's spawner, as always.
* **Optuna**: ``GridSampler`` over the same parameters with ``JournalStorage(JournalFileBackend)`` on
  one file; N processes run ``study.optimize`` until the sampler stops the study. The task runs
  inside the worker process.
* **naive**: the study's scheme. One CSV per worker (R/N rows each); per row the worker takes a
  ``filelock`` lock, reads the whole CSV with pandas, runs the first ``not_run`` row, marks it
  ``done`` and writes the whole CSV back. The task runs inside the worker process.
* **floor**: lock (an ``O_EXCL`` lock file) → read a 100-row shard → write a temporary file → fsync
  → rename → fsync the directory → unlock, in a loop, on the same disk: the cost of one durable shard
  transaction.

``--dir-fsync`` measures only what the directory fsync after each shard rename costs (the rename is
durable through a power loss only with it; tests/sharedfs/test_power_loss.py): the floor with and
without it, and gridrunner's no-op rows with and without it (the latter with
``gridrunner.atomic.fsync_directory`` replaced by a no-op in the worker processes), interleaved.

    .venv/bin/python bench/bench_overhead.py            # the full run (about 27 minutes on 2 cores)
    .venv/bin/python bench/bench_overhead.py --quick    # 500 and 2,000 no-op rows, 400 sleep rows, once (about 3 minutes)
    .venv/bin/python bench/bench_overhead.py --dir-fsync  # the directory fsync's cost alone (about 3 minutes)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import fmt, median, with_spread  # noqa: E402

SLEEP_S = 0.05
FLOOR_OPS = 400
FLOOR_CASE_OPS = 100


# --------------------------------------------------------------------------- the floor

def floor_worker(directory: Path, shard: Path, ops: int, dir_fsync: bool = True) -> None:
    """``ops`` durable transactions on a copy of ``shard``; prints the seconds they took."""
    path = directory / "shard.csv"
    lock = str(path) + ".lock"
    shutil.copyfile(shard, path)
    start = time.perf_counter()
    for k in range(ops):
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, f"host {os.getpid()} {time.time():.3f} token{k}\n".encode())
        os.close(fd)
        with open(path, "rb") as fh:
            data = fh.read()
        tmp = directory / f".shard.csv.{k}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)
        if dir_fsync:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
        os.unlink(lock)
    print(time.perf_counter() - start)


def measure_floor(shard: Path, processes: int, ops: int = FLOOR_OPS, dir_fsync: bool = True) -> float:
    """Transactions per second of ``processes`` floor loops at once, each on its own file."""
    base = common.scratch(f"overhead/floor-{processes}")
    commands = []
    for i in range(processes):
        (base / str(i)).mkdir()
        commands.append([common.PYTHON, __file__, "--_floor", str(base / str(i)), str(shard), str(ops),
                         str(int(dir_fsync))])
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    seconds = [float(p.communicate()[0]) for p in procs]
    shutil.rmtree(base, ignore_errors=True)
    return processes * ops / max(seconds)


# --------------------------------------------------------------------------- the baselines' workers

def _task(kind: str):
    if kind == "noop":
        return lambda: 1.0

    def sleep():
        time.sleep(SLEEP_S)
        return SLEEP_S

    return sleep


def _record(fd: int, event: str, row: str) -> None:
    os.write(fd, f"{event} {row} {os.getpid()}\n".encode())


def optuna_worker(storage_path: str, space: str, record: str, kind: str) -> None:
    import optuna
    from optuna.storages import JournalStorage

    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # Optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    a, b = (int(x) for x in space.split("x"))
    search_space = {"a": list(range(a)), "b": list(range(b))}
    storage = JournalStorage(JournalFileBackend(storage_path))
    study = optuna.load_study(study_name="bench", storage=storage, sampler=optuna.samplers.GridSampler(search_space))
    task = _task(kind)
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def objective(trial):
        row = f"{trial.suggest_categorical('a', search_space['a'])}-{trial.suggest_categorical('b', search_space['b'])}"
        _record(fd, "start", row)
        value = task()
        _record(fd, "finish", row)
        return value

    study.optimize(objective, n_trials=a * b)


def naive_worker(csv_path: str, record: str, kind: str) -> None:
    import pandas as pd
    from filelock import FileLock

    task = _task(kind)
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lock = FileLock(csv_path + ".lock")
    while True:
        with lock:
            df = pd.read_csv(csv_path)
            todo = df.index[df["status"] == "not_run"]
            if len(todo) == 0:
                return
            i = todo[0]
            row = f"{df.at[i, 'a']}-{df.at[i, 'b']}"
            _record(fd, "start", row)
            df.at[i, "value"] = task()
            df.at[i, "status"] = "done"
            _record(fd, "finish", row)
            df.to_csv(csv_path, index=False)


# --------------------------------------------------------------------------- one measured run

def expected_rows(rows: int) -> set[str]:
    a, b = common.two_factors(rows)
    return {f"{i}-{j}" for i in range(a) for j in range(b)}


NO_DIR_FSYNC = [common.PYTHON, "-c", "import gridrunner.atomic as atomic; atomic.fsync_directory = lambda path: None; "
                                     "from gridrunner.cli import main; main()"]


def run_gridrunner(kind: str, rows: int, workers: int, tag: str, *extra: str, command: list[str] | None = None) -> dict:
    base = common.scratch(f"overhead/{tag}")
    record = base / "executions.txt"
    fixed = {"record_to": str(record)}
    if kind == "sleep":
        fixed["duration"] = SLEEP_S
    spec = common.write_spec(base / "spec.yaml", "bench", f"gridrunner.tasks.toy:{kind}", rows,
                             ["value" if kind == "noop" else "slept"], fixed)
    grid = common.make_grid(spec, base)
    commands = common.gridrunner_workers(grid, workers, *extra)
    if command is not None:  # the same workers through another entry point
        commands = [[*command, *c[len(common.gridrunner_command()):]] for c in commands]
    timed = common.run_processes(commands)
    statuses = common.grid_row_ids(grid)
    duplicates, missing, _ = common.count_executions(record, set(statuses))
    not_done = sum(1 for s in statuses.values() if s != "done")
    shutil.rmtree(base, ignore_errors=True)
    return {"wall": timed.wall_s, "cpu": timed.cpu_s, "dup": duplicates, "missing": missing + not_done,
            "ok": all(c == 0 for c in timed.codes) and len(statuses) == rows}


def run_optuna(kind: str, rows: int, workers: int, tag: str) -> dict:
    import optuna
    from optuna.storages import JournalStorage

    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:
        from optuna.storages import JournalFileStorage as JournalFileBackend

    base = common.scratch(f"overhead/{tag}")
    record = base / "executions.txt"
    storage_path = str(base / "journal.log")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="bench", storage=JournalStorage(JournalFileBackend(storage_path)))
    a, b = common.two_factors(rows)
    commands = [[common.PYTHON, __file__, "--_optuna", storage_path, f"{a}x{b}", str(record), kind]
                for _ in range(workers)]
    return _run_baseline(commands, record, rows, base)


def _run_baseline(commands: list[list[str]], record: Path, rows: int, base: Path) -> dict:
    """Run a baseline's worker processes, count their executions, and clear their scratch folder."""
    timed = common.run_processes(commands)
    duplicates, missing, _ = common.count_executions(record, expected_rows(rows))
    shutil.rmtree(base, ignore_errors=True)
    return {"wall": timed.wall_s, "cpu": timed.cpu_s, "dup": duplicates, "missing": missing,
            "ok": all(c == 0 for c in timed.codes)}


def run_naive(kind: str, rows: int, workers: int, tag: str) -> dict:
    import pandas as pd

    base = common.scratch(f"overhead/{tag}")
    record = base / "executions.txt"
    a, b = common.two_factors(rows)
    frame = pd.DataFrame({"a": [i for i in range(a) for _ in range(b)], "b": list(range(b)) * a})
    frame["status"] = "not_run"
    frame["value"] = float("nan")
    commands = []
    for w in range(workers):
        path = base / f"worker-{w}.csv"
        frame.iloc[w::workers].to_csv(path, index=False)
        commands.append([common.PYTHON, __file__, "--_naive", str(path), str(record), kind])
    return _run_baseline(commands, record, rows, base)


def run_gridrunner_inline(kind: str, rows: int, workers: int, tag: str) -> dict:
    """gridrunner with ``work --inline`` (no process per row): what the fresh process costs, for the diagnosis."""
    return run_gridrunner(kind, rows, workers, tag, "--inline")


SYSTEMS = {"gridrunner": run_gridrunner, "gridrunner --inline": run_gridrunner_inline, "optuna": run_optuna,
           "naive": run_naive}


# --------------------------------------------------------------------------- the report

def summarise(system: str, kind: str, rows: int, workers: int, runs: list[dict]) -> dict:
    walls = [r["wall"] for r in runs]
    task_s = SLEEP_S if kind == "sleep" else 0.0
    return {
        "system": system, "kind": kind, "rows": rows, "workers": workers, "repeats": len(runs),
        "rows_per_s": [rows / w for w in walls],
        "wall_ms": [1000 * w / rows for w in walls],
        "overhead_ms": [1000 * (w * workers - rows * task_s) / rows for w in walls],
        "cpu_ms": [1000 * r["cpu"] / rows for r in runs],
        "dup": max(r["dup"] for r in runs), "missing": max(r["missing"] for r in runs),
        "ok": all(r["ok"] for r in runs),
        "floor_ms": median([r["floor_ms"] for r in runs if "floor_ms" in r]),
    }


def render(results: list[dict], floors: dict, args, load_before: str, minutes: float) -> list[str]:
    floor1 = floors.get(1)
    out = [
        *common.section("Orchestration overhead", load_before, minutes),
        "Median of the repeats, (min–max) where there were several. *wall ms/row* = 1000 · wall / R, the "
        "whole grid's time per row (its inverse is rows/s). *orchestration ms/row* = 1000 · (wall · N − "
        "R · task) / R: the worker time per row that is not the task (task = 0 for no-op, 0.05 s for sleep; "
        "for no-op rows it is N · wall ms/row). *CPU ms/row*: user + system time of every process "
        "(workers, their spawners and the rows' processes) per row; it does not depend on how busy the machine was. "
        "Wall times include starting the N worker processes. *dup*: rows executed more than once; "
        "*missing*: rows never finished (or not `done` in the shards), both counted from the side file "
        "every execution appends to.",
        "",
        f"The baselines ran only where the table lists them (nothing is extrapolated): Optuna up to R = "
        f"{args.optuna_max:,} with N = {', '.join(map(str, args.optuna_workers))} (sleep: N = "
        f"{', '.join(map(str, args.optuna_sleep_workers))}), as its trials cost 50–120 ms of CPU each, "
        f"the naive scheme where R / N ≤ {args.naive_rows_per_worker:,} rows per CSV, because each of its rows "
        f"reads and writes the worker's whole CSV. Optuna and the naive scheme run the task inside the worker "
        f"process; gridrunner runs each row in a fresh process, forked by the worker's spawner.",
        "",
    ]
    if floor1:
        line = f"**Floor** (lock → read → write temp → fsync → rename → unlock, 100-row shard), at the start of " \
               f"the run: {fmt(floor1)} transactions/s in one process ({fmt(1000 / floor1)} ms each)"
        if floors.get(8):
            line += f", {fmt(floors[8])}/s in total from 8 processes on 8 files"
        out += [line + ".", ""]
    header = ["system", "task", "R", "N", "runs", "rows/s", "wall ms/row", "orchestration ms/row", "CPU ms/row",
              "dup", "missing"]
    if floor1:
        header.insert(8, "× floor")
    rows = []
    for r in results:
        cells = [r["system"], r["kind"], f"{r['rows']:,}", r["workers"], r["repeats"], with_spread(r["rows_per_s"]),
                 with_spread(r["wall_ms"]), with_spread(r["overhead_ms"]), with_spread(r["cpu_ms"]),
                 r["dup"], r["missing"] if r["ok"] else f"{r['missing']} (a worker failed)"]
        if floor1:
            # One durable transaction per row is the design's floor; the multiple compares worker time.
            per_row = median(r["overhead_ms"]) if r["kind"] == "sleep" else median(r["wall_ms"])
            cells.insert(8, fmt(per_row / r["floor_ms"], 2) if r["system"].startswith("gridrunner") else "")
        rows.append(cells)
    out.append(common.table(header, rows))
    out += ["", f"*× floor*: gridrunner's wall ms/row (no-op) or orchestration ms/row (sleep) over one floor "
                f"transaction, timed ({FLOOR_CASE_OPS} transactions in one process) just before each run of the "
                f"case, because the disk's latency changed by several times during the session. Floor at the "
                f"end of the run: {fmt(floors['end'])} transactions/s in one process "
                f"({fmt(1000 / floors['end'])} ms each)."]
    ratios = []
    for r in results:
        if r["system"] != "gridrunner":
            continue
        for other in results:
            if other["system"] in ("optuna", "naive") and (other["kind"], other["rows"], other["workers"]) == \
                    (r["kind"], r["rows"], r["workers"]):
                ratios.append(f"{r['kind']} R={r['rows']:,} N={r['workers']}: "
                              f"{fmt(median(r['rows_per_s']) / median(other['rows_per_s']), 3)}× {other['system']}")
    if ratios:
        out += ["", "gridrunner's rows/s over the baseline's at the same R and N: " + "; ".join(ratios) + "."]
    return out


def dir_fsync_cost(args, shard: Path) -> None:
    """The directory fsync after each shard rename: floor and gridrunner with and without it, interleaved."""
    load_before = common.load_average()
    started = time.perf_counter()
    floors = {True: [], False: []}
    runs = {(n, sync): [] for n in args.workers for sync in (True, False)}
    for k in range(args.repeats):
        for sync in (True, False):
            floors[sync].append(measure_floor(shard, 1, FLOOR_OPS, dir_fsync=sync))
        for n in args.workers:
            for sync in (True, False):
                run = run_gridrunner("noop", args.dir_fsync_rows, n, f"dirfsync-{n}-{int(sync)}-{k}",
                                     command=None if sync else NO_DIR_FSYNC)
                assert run["ok"] and run["dup"] == 0 and run["missing"] == 0, run
                runs[(n, sync)].append(1000 * run["wall"] / args.dir_fsync_rows)
                print(f"dir fsync {sync}: N={n} {runs[(n, sync)][-1]:.3f} ms/row", flush=True)
    out = [*common.section("Directory fsync after each shard rename", load_before,
                           (time.perf_counter() - started) / 60),
           "A shard's rename survives a power loss only once its directory is fsynced (POSIX; "
           "`tests/sharedfs/test_power_loss.py` loses recorded results without it). Medians of "
           f"{args.repeats} interleaved repeats, (min–max). The floor: {FLOOR_OPS} transactions in one process; "
           f"gridrunner: {args.dir_fsync_rows:,} no-op rows, wall ms/row; *without* replaces "
           "`gridrunner.atomic.fsync_directory` by a no-op in the worker processes.",
           ""]
    rows = [["floor (ms/transaction)", with_spread([1000 / f for f in floors[True]]),
             with_spread([1000 / f for f in floors[False]]),
             fmt(median([1000 / f for f in floors[True]]) / median([1000 / f for f in floors[False]]), 3)]]
    for n in args.workers:
        rows.append([f"gridrunner N={n} (wall ms/row)", with_spread(runs[(n, True)]), with_spread(runs[(n, False)]),
                     fmt(median(runs[(n, True)]) / median(runs[(n, False)]), 3)])
    out.append(common.table(["case", "with the directory fsync", "without", "with / without"], rows))
    common.publish("dir_fsync", out, readme=not args.no_readme)


def plan(args) -> list[tuple[str, str, int, int, int]]:
    """The cases to run: (system, task, R, N, repeats)."""
    cases = []
    for kind, sizes in (("noop", args.rows), ("sleep", args.sleep_rows)):
        for rows in sizes:
            workers = args.workers if rows <= args.all_workers_max else args.big_workers
            for n in workers:
                repeats = args.repeats if rows <= args.repeat_max else 1
                if kind == "sleep":
                    repeats = args.sleep_repeats
                cases.append(("gridrunner", kind, rows, n, repeats))
                if kind == "noop" and rows in args.inline_rows:
                    cases.append(("gridrunner --inline", kind, rows, n, 1))
                optuna_ok = rows <= args.optuna_max and n in (
                    args.optuna_workers if kind == "noop" else args.optuna_sleep_workers)
                if optuna_ok:
                    cases.append(("optuna", kind, rows, n, args.baseline_repeats))
                if rows / n <= args.naive_rows_per_worker:
                    cases.append(("naive", kind, rows, n, args.baseline_repeats))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="500 and 2,000 no-op rows (Optuna at 500), 400 sleep rows, N = 1 and 8, once")
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 20000, 200000], help="no-op grid sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--all-workers-max", type=int, default=20000,
                        help="larger no-op grids run with --big-workers only")
    parser.add_argument("--big-workers", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--repeats", type=int, default=3, help="repeats of gridrunner's no-op cases up to --repeat-max")
    parser.add_argument("--repeat-max", type=int, default=2000, help="larger cases run once")
    parser.add_argument("--sleep-rows", type=int, nargs="*", default=[2000], help="sleep-task grid sizes")
    parser.add_argument("--sleep-repeats", type=int, default=1)
    parser.add_argument("--optuna-max", type=int, default=2000, help="largest R for the Optuna baseline")
    parser.add_argument("--optuna-workers", type=int, nargs="+", default=[1, 8],
                        help="worker counts of the Optuna baseline on the no-op task")
    parser.add_argument("--optuna-sleep-workers", type=int, nargs="+", default=[8],
                        help="worker counts of the Optuna baseline on the sleep task")
    parser.add_argument("--naive-rows-per-worker", type=int, default=10000,
                        help="the naive baseline runs where R / N is at most this (its cost per row grows with R / N)")
    parser.add_argument("--baseline-repeats", type=int, default=1)
    parser.add_argument("--inline-rows", type=int, nargs="*", default=[2000],
                        help="no-op sizes also run with `work --inline` (rows in the worker, no process per row)")
    parser.add_argument("--no-readme", action="store_true", help="print the table, leave bench/README.md alone")
    parser.add_argument("--dir-fsync", action="store_true",
                        help="only the directory fsync's cost: floor and no-op rows with and without it")
    parser.add_argument("--dir-fsync-rows", type=int, default=2000)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.workers, args.repeats, args.sleep_rows, args.optuna_max = [500, 2000], [1, 8], 1, [400], 500
    load_before = common.load_average()
    started = time.perf_counter()

    probe = common.scratch("overhead/probe")
    grid = common.make_grid(common.write_spec(probe / "spec.yaml", "probe", "gridrunner.tasks.toy:noop", 2000, ["value"]), probe)
    shard = sorted((grid / "shards").glob("shard-*.csv"))[0]
    shutil.copyfile(shard, common.RUNS / "overhead" / "shard.csv")
    shutil.rmtree(probe)
    shard = common.RUNS / "overhead" / "shard.csv"
    if args.dir_fsync:
        dir_fsync_cost(args, shard)
        return
    floors = {n: median([measure_floor(shard, n) for _ in range(3)]) for n in (1, 8)}
    print(f"floor: {floors}", flush=True)

    cases = plan(args)
    results = []
    for system, kind, rows, n, repeats in cases:
        runs = []
        for k in range(repeats):
            floor_ms = 1000 / measure_floor(shard, 1, FLOOR_CASE_OPS) if system.startswith("gridrunner") else None
            run = SYSTEMS[system](kind, rows, n, f"{system.replace(' --', '-')}-{kind}-{rows}-{n}-{k}")
            if floor_ms is not None:
                run["floor_ms"] = floor_ms
            runs.append(run)
            print(f"{system:10s} {kind:5s} R={rows:<7d} N={n} wall {run['wall']:7.2f} s  cpu {run['cpu']:7.2f} s  "
                  f"dup {run['dup']} missing {run['missing']}", flush=True)
        results.append(summarise(system, kind, rows, n, runs))
    floors["end"] = measure_floor(shard, 1)
    lines = render(results, floors, args, load_before, (time.perf_counter() - started) / 60)
    common.publish("overhead", lines, readme=not args.no_readme)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_floor":
        floor_worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5:6] != ["0"])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_optuna":
        optuna_worker(*sys.argv[2:6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_naive":
        naive_worker(*sys.argv[2:5])
    else:
        main()
