"""The journal's cost: bench_overhead.py's target case with the journal and without it, in one run.

The journal (``gridrunner/journal.py``) appends and fsyncs one line per shard transaction before the
shard's rename. This runs bench_overhead.py's gridrunner case (N workers, R no-op rows, rows forked by
the spawner) alternately with this checkout and with a build of gridrunner that has no journal (a git
checkout given by ``--without``, for example the commit before the journal: ``git worktree add --detach
/tmp/nojournal a171bd6``), so both see the same machine and the same load. The grid is made by this
checkout each time; the build without the journal ignores its ``journal/`` folder.

    .venv/bin/python bench/bench_journal.py --without /tmp/nojournal     # 8 workers, 2,000 rows, 3 pairs
"""
from __future__ import annotations

import argparse
import compileall
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_overhead import measure_floor, run_gridrunner  # noqa: E402
from common import fmt, median  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--without", required=True, type=Path, help="a checkout of gridrunner without the journal")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3, help="runs of each build, alternating")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    without = args.without.resolve()
    compileall.compile_dir(str(without / "gridrunner"), quiet=1)
    commit = os.popen(f"git -C '{without}' rev-parse --short HEAD").read().strip()
    builds = {
        "with the journal": None,
        f"without (commit {commit})": f"env PYTHONPATH={without} {common.PYTHON} -m gridrunner.cli",
    }
    load_before = common.load_average()
    started = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name in builds}
    for k in range(args.pairs):
        order = list(builds.items()) if k % 2 == 0 else list(reversed(builds.items()))
        for name, command in order:
            if command is None:
                os.environ.pop("BENCH_GRIDRUNNER", None)
            else:
                os.environ["BENCH_GRIDRUNNER"] = command
            result = run_gridrunner("noop", args.rows, args.workers, f"journal-{k}")
            print(f"{name}: {result}", flush=True)
            results[name].append(result)
    os.environ.pop("BENCH_GRIDRUNNER", None)
    shard_probe = common.scratch("journal/probe")
    grid = common.make_grid(common.write_spec(shard_probe / "spec.yaml", "probe", "gridrunner.tasks.toy:noop", 2000,
                                              ["value"]), shard_probe)
    floor_ms = 1000 / measure_floor(sorted((grid / "shards").glob("shard-*.csv"))[0], 1)
    import shutil

    shutil.rmtree(shard_probe, ignore_errors=True)
    rows_out = []
    base = None
    for name, runs in results.items():
        per_row = [r["wall"] / args.rows * 1000 for r in runs]
        cpu = [r["cpu"] / args.rows * 1000 for r in runs]
        ok = all(r["ok"] and r["dup"] == 0 and r["missing"] == 0 for r in runs)
        wall = median(per_row)
        base = wall if base is None else base
        rows_out.append([name, f"{fmt(wall)} ({fmt(min(per_row))}–{fmt(max(per_row))})", fmt(median(cpu)),
                         "0 and 0" if ok else "SEE LOG", ""])
    with_journal, without_journal = (median([r["wall"] for r in runs]) for runs in results.values())
    rows_out[0][4] = f"{fmt((with_journal - without_journal) / args.rows * 1000)} ms/row " \
                     f"({(with_journal / without_journal - 1) * 100:+.0f}%)"
    minutes = (time.perf_counter() - started) / 60
    lines = [
        *common.section("The journal's cost", load_before, minutes),
        f"bench_overhead.py's target case, N = {args.workers} workers, R = {args.rows:,} no-op rows, {args.pairs} runs of "
        f"each build alternating (medians, range in brackets). One durable shard transaction (the floor: lock, "
        f"read, write, fsync, rename) cost {fmt(floor_ms)} ms at the end of the run. The machine was shared "
        f"with other work: compare the two builds, measured side by side.",
        "",
        common.table(["build", "wall ms/row", "CPU ms/row", "duplicates and missing", "the journal's cost"], rows_out),
    ]
    common.publish("journal", lines, readme=not args.no_readme)


if __name__ == "__main__":
    main()
