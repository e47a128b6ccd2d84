"""Scale of ``gridrunner make``, ``status`` and ``analyze``: time and peak memory at 10k, 100k and 1M rows.

Each command runs in its own subprocess; its wall time and peak RSS come from ``wait4``. The grid is
``a × b × loss`` (two numbers and a two-level string) of ``gridrunner.tasks.toy:noop`` rows in the default
100-row shards.

``analyze`` needs finished rows. They are fabricated, not run: one transaction per shard through
gridrunner's own store (``GridStore.transaction``) marks every row ``done`` with a runtime and a
``score`` that is a known function of the parameters plus noise, and about 5% of rows ``failed``
with an error. ``status`` is timed on the same finished grid where there is one (sizes up to
``--analyze-max``), else on the freshly made grid.

    .venv/bin/python bench/bench_scale.py                  # 10k, 100k, 1M rows; analyze up to 100k
    .venv/bin/python bench/bench_scale.py --quick          # 10k and 100k
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

import common  # noqa: E402
from common import fmt, with_spread  # noqa: E402

TARGETS = {("make", 1_000_000): (10.0, 1024.0), ("status", 100_000): (2.0, None), ("analyze", 100_000): (30.0, None)}


def write_scale_spec(path: Path, rows: int) -> Path:
    a, b = common.two_factors(rows // 2)
    spec = {"name": "bench", "task": "gridrunner.tasks.toy:noop",
            "grid": {"a": list(range(a)), "b": list(range(b)), "loss": ["l1", "ssim"]},
            "outcomes": ["score"], "metric": "score", "goal": "max", "failure": "score < 0"}
    path.write_text(yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100_000))
    return path


def fabricate_results(grid: Path, seed: int = 0) -> float:
    """Mark every row done (5% failed) through the store; returns the seconds it took."""
    from gridrunner.store import ERROR, FINISHED, RUNTIME, STARTED, STATUS, WORKER, GridStore, now_iso

    rng = random.Random(seed)
    store = GridStore(grid)
    start = time.perf_counter()
    stamp = now_iso()
    for path in store.shard_paths():
        with store.transaction(path) as shard:
            p = shard.n_params
            a_col, b_col, loss_col = (shard.params.index(n) for n in ("a", "b", "loss"))
            for i in shard.valid():
                fields = shard.records[i]
                a, b = int(fields[a_col]), int(fields[b_col])
                shard.set(i, WORKER, "bench:0")
                shard.set(i, STARTED, stamp)
                shard.set(i, FINISHED, stamp)
                shard.set(i, RUNTIME, f"{1 + 0.01 * a + rng.random():.3f}")
                if rng.random() < 0.05:
                    shard.set(i, STATUS, "failed")
                    shard.set(i, ERROR, "FloatingPointError: loss became NaN (fabricated)")
                    continue
                score = 0.5 + 0.002 * a - 0.001 * b - 0.1 * (fields[loss_col] == "ssim") + rng.gauss(0, 0.05)
                shard.set(i, STATUS, "done")
                fields[p + 8] = repr(score)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--analyze-max", type=int, default=100_000, help="largest grid to fabricate and analyze")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of make and status (analyze: --analyze-repeats)")
    parser.add_argument("--analyze-repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="10k and 100k rows, one repeat")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = [10_000, 100_000], 1
    load_before = common.load_average()
    started = time.perf_counter()
    gr = common.gridrunner_command()
    results = []  # (command, rows, [Timed], note)
    fabricated = {}
    for rows in args.rows:
        makes = []
        for k in range(args.repeats):
            base = common.scratch(f"scale/{rows}")
            spec = write_scale_spec(base / "spec.yaml", rows)
            makes.append(common.measure_command([*gr, "make", str(spec), "--runs", str(base)]))
            print(f"make {rows}: {makes[-1].wall_s:.2f} s, {makes[-1].peak_rss_mb:.0f} MB", flush=True)
        results.append(("make", rows, makes))
        grid = base / "bench"
        if rows <= args.analyze_max:
            fabricated[rows] = fabricate_results(grid)
            print(f"fabricated {rows} results in {fabricated[rows]:.1f} s", flush=True)
        statuses = [common.measure_command([*gr, "status", "--grid", str(grid)]) for _ in range(args.repeats)]
        print(f"status {rows}: {statuses[0].wall_s:.2f} s", flush=True)
        results.append(("status", rows, statuses))
        if rows <= args.analyze_max:
            out = base / "report"
            runs = [common.measure_command([*gr, "analyze", "--grid", str(grid), "--out", str(out)], timeout_s=1800)
                    for _ in range(args.analyze_repeats)]
            print(f"analyze {rows}: {runs[0].wall_s:.2f} s, {runs[0].peak_rss_mb:.0f} MB", flush=True)
            results.append(("analyze", rows, runs))
        shutil.rmtree(base, ignore_errors=True)
    minutes = (time.perf_counter() - started) / 60

    rows_out = []
    for command, rows, runs in sorted(results, key=lambda r: (["make", "status", "analyze"].index(r[0]), r[1])):
        target = TARGETS.get((command, rows))
        verdict = ""
        if target:
            wall_ok = min(r.wall_s for r in runs) <= target[0] if len(runs) == 1 else \
                sorted(r.wall_s for r in runs)[len(runs) // 2] <= target[0]
            mem_ok = target[1] is None or max(r.peak_rss_mb for r in runs) <= target[1]
            want = f"≤ {target[0]:g} s" + (f", ≤ {target[1] / 1024:g} GiB" if target[1] else "")
            verdict = f"{want}: {'met' if wall_ok and mem_ok else 'missed'}"
        ok = all(c == 0 for r in runs for c in r.codes)
        rows_out.append([f"`{command}`", f"{rows:,}", len(runs), with_spread([r.wall_s for r in runs]),
                         with_spread([r.cpu_s for r in runs]), fmt(max(r.peak_rss_mb for r in runs)),
                         verdict + ("" if ok else " (the command failed)")])
    lines = [
        *common.section("Scale of make, status and analyze", load_before, minutes),
        "Each command in its own subprocess; wall and CPU seconds, median of the runs (min–max); peak "
        "RSS from `wait4`, the largest of the runs. `status` and `analyze` ran on grids whose results "
        "were fabricated through `GridStore.transaction` (every row done, 5% failed; "
        + ", ".join(f"{fmt(s)} s for {r:,} rows" for r, s in fabricated.items())
        + "); larger grids were timed freshly made (all `not_run`).",
        "",
        common.table(["command", "rows", "runs", "wall s", "CPU s", "peak RSS MB", "target"], rows_out),
    ]
    common.publish("scale", lines, readme=not args.no_readme)


if __name__ == "__main__":
    main()
