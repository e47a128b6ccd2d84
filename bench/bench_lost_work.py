"""Lost work after kills: SIGKILL workers at random times during checkpointed rows and measure what is redone.

The rows are ``gridrunner.tasks.toy:steps``: ``--steps`` steps of ``--step-s`` seconds, a checkpoint every
``--checkpoint-every`` steps, resumed from the checkpoint by whoever runs the row next, and a ``step``
line in the side file for every step executed. Two workers run a grid of two long rows. At random
times (exponential gaps, seeded) one of them is killed with SIGKILL (its spawner and its row's process die with it) and
a replacement is started at once, as a requeued job would be. With as many rows as workers the
replacement has nothing else to claim, so the delay measured is the reclaim itself, not a wait for a
free worker. The harness reads the side file every 10 ms and times
every line, so for each kill that hit a running row it knows the step the row had reached, the step
the next run of the row resumed from, and when that run started.

Per kill: *steps redone* = step reached − step resumed from; *delay* = kill → the row's next start.
The bound is one checkpoint interval of steps redone plus the heartbeat lease of delay (in seconds:
checkpoint_every · step_s + lease_s).

Two placements:

* **same host**: a dead worker's pid is gone, so its rows are reclaimed at once;
* **other hosts**: every worker runs in its own UTS namespace (``unshare -u``) under its own host name,
  as on a cluster, so nobody can see its pid and its rows wait for the heartbeat lease. Needs root;
  skipped otherwise.

    .venv/bin/python bench/bench_lost_work.py            # 30 kills per placement
    .venv/bin/python bench/bench_lost_work.py --quick    # 8 kills, same host only
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

import common  # noqa: E402
from common import fmt, median  # noqa: E402

WORKERS = 2


@dataclass
class Attempt:
    row: str
    pid: int
    resumed_from: int
    started: float
    steps: int = 0

    @property
    def reached(self) -> int:
        return self.resumed_from + self.steps


@dataclass
class Kill:
    at: float
    row: str | None
    reached: int | None
    resumed_from: int | None = None
    resumed_at: float | None = None

    @property
    def redone(self) -> int | None:
        return None if self.resumed_from is None else self.reached - self.resumed_from

    @property
    def delay(self) -> float | None:
        return None if self.resumed_at is None else self.resumed_at - self.at


@dataclass
class Tail:
    """Reads new lines of the side file and keeps every attempt of every row."""

    path: Path
    offset: int = 0
    attempts: dict = field(default_factory=dict)  # pid -> Attempt (the task's child process)
    steps: int = 0
    finished: set = field(default_factory=set)
    pending: dict = field(default_factory=dict)  # row -> Kill waiting for the row's next start

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        now = time.monotonic()
        for line in data[:end].decode().splitlines():
            event, row, pid = line.split()
            pid = int(pid)
            if event.startswith("start@"):
                step = int(event.split("@")[1])
                self.attempts[pid] = Attempt(row, pid, step, now)
                kill = self.pending.pop(row, None)
                if kill is not None:
                    kill.resumed_from, kill.resumed_at = step, now
            elif event == "step":
                self.steps += 1
                if pid in self.attempts:
                    self.attempts[pid].steps += 1
            elif event == "finish":
                self.finished.add(row)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: the worker's spawner and the row's process it forked (and, for other
    hosts, what runs under ``sh`` and ``unshare``)."""
    out, todo = [], children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo += children(child)
    return out


def start_worker(grid: Path, host: str | None) -> subprocess.Popen:
    command = [*common.gridrunner_command(), "work", "--grid", str(grid), "-q"]
    if host is not None:
        command = ["unshare", "-u", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *command]
    return subprocess.Popen(command, cwd=common.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_placement(placement: str, args, seed: int) -> dict:
    base = common.scratch(f"lost_work/{placement.replace(' ', '-')}")
    record = base / "executions.txt"
    spec = {"name": "bench", "task": "gridrunner.tasks.toy:steps", "grid": {"i": list(range(args.rows))},
            "fixed": {"steps": args.steps, "step_s": args.step_s, "checkpoint_every": args.checkpoint_every,
                      "record_to": str(record)},
            "outcomes": ["final_step"], "lease_s": args.lease_s, "max_attempts": 1000}
    (base / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, default_flow_style=None))
    grid = common.make_grid(base / "spec.yaml", base)
    rng = random.Random(seed)
    hosts = iter(f"node-{k}" for k in range(10_000))
    remote = placement == "other hosts"
    workers = [start_worker(grid, next(hosts) if remote else None) for _ in range(WORKERS)]
    tail = Tail(record)
    kills: list[Kill] = []
    idle_kills = 0
    start = time.monotonic()
    next_kill = start + rng.expovariate(1 / args.kill_every)
    while True:
        tail.poll()
        now = time.monotonic()
        live = [w for w in workers if w.poll() is None]
        if len(tail.finished) == args.rows and not live:
            break
        if not live:
            workers.append(start_worker(grid, next(hosts) if remote else None))  # the grid is not done
        if now >= next_kill and len(kills) + idle_kills < args.kills and live:
            victim = rng.choice(live)
            # the row runs in a process forked by the worker's spawner: look at every level below the worker
            pids = descendants(victim.pid)
            os.kill(victim.pid, signal.SIGKILL)
            if remote:
                for p in pids:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            victim.wait()
            killed_at = time.monotonic()
            tail.poll()
            attempt = next((tail.attempts[p] for p in pids if p in tail.attempts), None)
            if attempt is not None and attempt.row not in tail.finished:
                kill = Kill(killed_at, attempt.row, attempt.reached)
                tail.pending[attempt.row] = kill
                kills.append(kill)
            else:
                idle_kills += 1
            workers.append(start_worker(grid, next(hosts) if remote else None))
            next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every)
        if now - start > args.timeout:
            for w in workers:
                w.kill()
            raise SystemExit(f"{placement}: not done after {args.timeout} s")
        time.sleep(0.01)
    wall = time.monotonic() - start
    statuses = common.grid_row_ids(grid)
    shutil.rmtree(base, ignore_errors=True)
    return {"kills": kills, "idle_kills": idle_kills, "steps": tail.steps, "wall": wall,
            "done": sum(1 for s in statuses.values() if s == "done")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=WORKERS)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--step-s", type=float, default=0.05)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--lease-s", type=float, default=2.0, help="the spec's lease_s (heartbeat every lease/4)")
    parser.add_argument("--kill-every", type=float, default=1.0, help="mean seconds between kills")
    parser.add_argument("--kills", type=int, default=30, help="kills per placement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--placements", nargs="+", default=["same host", "other hosts"],
                        choices=["same host", "other hosts"])
    parser.add_argument("--quick", action="store_true", help="8 kills, same host only")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.placements, args.steps = 8, ["same host"], 100
    if "other hosts" in args.placements and (os.geteuid() != 0 or shutil.which("unshare") is None):
        print("other hosts: skipped (needs root and unshare)")
        args.placements = [p for p in args.placements if p != "other hosts"]
    load_before = common.load_average()
    started = time.perf_counter()
    bound_steps = args.checkpoint_every
    bound_s = args.checkpoint_every * args.step_s + args.lease_s
    rows_out = []
    notes = []
    for k, placement in enumerate(args.placements):
        result = run_placement(placement, args, args.seed + k)
        kills = [x for x in result["kills"] if x.redone is not None]
        redone = [x.redone for x in kills]
        delays = [x.delay for x in kills]
        lost = [x.redone * args.step_s + x.delay for x in kills]
        extra = result["steps"] - args.rows * args.steps
        print(f"{placement}: {len(result['kills'])} kills in a row, {result['idle_kills']} between rows; "
              f"redone {redone}; delays {[round(d, 2) for d in delays]}", flush=True)
        rows_out.append([
            placement, len(kills), result["idle_kills"],
            f"{fmt(median(redone))} / {max(redone) if redone else '–'}",
            f"{fmt(median(delays))} / {fmt(max(delays)) if delays else '–'}",
            f"{fmt(median(lost))} / {fmt(max(lost)) if lost else '–'}",
            f"{sum(1 for r, d in zip(redone, lost) if r <= bound_steps and d <= bound_s)} of {len(kills)}",
            f"{extra:,} (= Σ redone {sum(redone):,})" if extra == sum(redone) else f"{extra:,} (Σ redone {sum(redone):,})",
            f"{result['done']} of {args.rows}",
        ])
        unmatched = len(result["kills"]) - len(kills)
        if unmatched:
            notes.append(f"{placement}: {unmatched} killed row(s) never started again (they finished first).")
    minutes = (time.perf_counter() - started) / 60
    lines = [
        *common.section("Lost work after kills", load_before, minutes),
        f"{args.rows} rows of `gridrunner.tasks.toy:steps`, {args.steps} steps of {args.step_s:g} s, a checkpoint every "
        f"{args.checkpoint_every} steps ({fmt(args.checkpoint_every * args.step_s)} s), lease {args.lease_s:g} s "
        f"(heartbeat every {fmt(args.lease_s / 4)} s), {WORKERS} workers, a SIGKILL every "
        f"{args.kill_every:g} s on average (seeded exponential gaps) and a replacement worker at once. "
        f"Bound per kill: {bound_steps} steps redone and {fmt(bound_s)} s lost "
        f"({args.checkpoint_every} · {args.step_s:g} s + {args.lease_s:g} s). *lost s* = steps redone · step_s "
        f"+ delay. Cells are median / max.",
        "",
        common.table(["placement", "kills in a row", "kills between rows", "steps redone", "delay s", "lost s",
                      "within the bound", "steps executed beyond the grid's", "rows done"], rows_out),
    ]
    if notes:
        lines += [""] + notes
    common.publish("lost_work", lines, readme=not args.no_readme)


if __name__ == "__main__":
    main()
