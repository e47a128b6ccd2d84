"""The worker with real processes: crashes captured, many workers, kills, stalls, stops and resumes."""
import json
import os
import signal
import time

import pytest

from gridrunner.store import Claim, GridStore, now_iso, pid_alive
from gridrunner.worker import Liveness, Worker, heartbeat_path
from gridtools import events, kill, make_grid, start_worker, wait_until


def rows_by(grid, key="row_id"):
    store = GridStore(grid)
    out = {}
    for path in store.shard_paths():
        shard = store.read(path)
        for i in shard.valid():
            record = dict(zip(shard.header, shard.records[i]))
            out[record[key]] = record
    return out


def statuses(grid):
    return sorted(r["status"] for r in rows_by(grid).values())


def test_every_crash_mode_is_recorded_and_the_worker_survives(tmp_path):
    grid = make_grid(tmp_path, {
        "task": "gridrunner.tasks.toy:crash", "outcomes": ["value"],
        "grid": {"mode": ["raise", "nan", "exit", "segfault", "memory", "none", "ok"]},
        "fixed": {"cap_mb": 300},
    })
    summary = Worker(grid, handle_signals=False).run()
    assert (summary.done, summary.failed) == (1, 6)
    errors = {r["mode"]: (r["status"], r["error"]) for r in rows_by(grid).values()}
    assert errors == {
        "raise": ("failed", "RuntimeError: planted failure from the crash task"),
        "nan": ("failed", "NonFiniteMetric: value is nan"),
        "exit": ("failed", "TaskDied: the task process exited with code 3 without a result"),
        "segfault": ("failed", "TaskDied: the task process was killed by SIGSEGV"),
        "memory": ("failed", "MemoryError"),
        "none": ("failed", "TypeError: the task must return a dict of metrics, got NoneType"),
        "ok": ("done", ""),
    }
    by_mode = {r["mode"]: r["row_id"] for r in rows_by(grid).values()}
    trace = (grid / "rows" / by_mode["raise"] / "traceback.txt").read_text()
    assert "attempt 1" in trace and 'raise RuntimeError("planted failure from the crash task")' in trace


def test_failure_rule_and_missing_metric(tmp_path):
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept", "other"],
                                "grid": {"duration": [0.0]}, "failure": "slept > 100"})
    Worker(grid, handle_signals=False, inline=True).run()
    (row,) = rows_by(grid).values()
    assert row["status"] == "failed"
    assert row["error"] == "MissingMetric: the task returned no 'other' (it returned slept)"
    grid2 = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "grid": {"duration": [0.0]},
                                 "failure": "slept < 100"}, name="h")
    Worker(grid2, handle_signals=False).run()
    (row,) = rows_by(grid2).values()
    assert (row["status"], row["error"]) == ("failed", "rule: slept < 100")
    assert float(row["slept"]) >= 0


@pytest.mark.slow
def test_sixteen_workers_on_one_shard_run_every_row_exactly_once(tmp_path):
    side = tmp_path / "executions.log"
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "max_len": 1000,
                                "grid": {"i": list(range(1000))}, "fixed": {"record_to": str(side)}})
    procs = [start_worker(grid) for _ in range(16)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    assert statuses(grid) == ["done"] * 1000
    counts = events(side)
    starts = [n for (event, _), n in counts.items() if event == "start"]
    assert len(starts) == 1000 and set(starts) == {1}
    assert {row_id for (_, row_id) in counts} == set(rows_by(grid))
    workers = {r["worker"] for r in rows_by(grid).values()}
    assert len(workers) > 1  # the work was really shared


def test_kill_9_mid_row_the_row_is_reclaimed_and_finished(tmp_path):
    side = tmp_path / "executions.log"
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "lease_s": 2,
                                "grid": {"duration": [2.0, 0.1]}, "fixed": {"record_to": str(side)}})
    victim = start_worker(grid, "--no-steal")
    assert wait_until(lambda: any(e == "start" for e, _ in events(side)), 30)
    child_pid = int(side.read_text().split()[2])
    kill(victim)
    assert wait_until(lambda: not pid_alive(child_pid), 10), "the row's process outlived its worker"
    running = [r for r in rows_by(grid).values() if r["status"] == "running"]
    assert len(running) == 1
    rescuer = start_worker(grid)
    _, err = rescuer.communicate(timeout=120)
    assert rescuer.returncode == 0, err
    rows = rows_by(grid)
    assert statuses(grid) == ["done", "done"]
    assert rows[running[0]["row_id"]]["attempts"] == "2"
    finishes = [row for (event, row), n in events(side).items() if event == "finish" for _ in range(n)]
    assert sorted(finishes) == sorted(rows)


def test_stalled_worker_is_reclaimed_after_the_lease_and_its_late_result_is_set_aside(tmp_path):
    side = tmp_path / "executions.log"
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "lease_s": 1.5,
                                "grid": {"duration": [1.0]}, "fixed": {"record_to": str(side)}})
    stalled = start_worker(grid)
    assert wait_until(lambda: any(e == "start" for e, _ in events(side)), 30)
    os.kill(stalled.pid, signal.SIGSTOP)  # the worker (and its heartbeat) freeze; its row's process goes on
    t0 = time.monotonic()
    rescuer = start_worker(grid)
    _, err = rescuer.communicate(timeout=120)
    assert rescuer.returncode == 0, err
    assert time.monotonic() - t0 >= 1.0  # it had to wait for the lease
    (row,) = rows_by(grid).values()
    assert row["status"] == "done" and row["attempts"] == "2"
    finished_by = row["worker"]
    os.kill(stalled.pid, signal.SIGCONT)
    _, err = stalled.communicate(timeout=60)
    assert stalled.returncode == 0, err
    (after,) = rows_by(grid).values()
    assert after == row and after["worker"] == finished_by  # the newer result stands
    aside = list((grid / "rows" / row["row_id"]).glob("stale-result-*.json"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["status"] == "done"
    assert "stale result" in err


def test_sigterm_gives_the_row_back_with_its_checkpoint_and_the_next_worker_resumes(tmp_path):
    side = tmp_path / "executions.log"
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:steps", "outcomes": ["final_step", "steps_run", "resumed_from"],
                                "grid": {"steps": [60]}, "fixed": {"record_to": str(side), "step_s": 0.05}})
    worker = start_worker(grid)
    assert wait_until(lambda: events(side)[("step", next(iter(rows_by(grid))))] >= 10, 60)
    os.kill(worker.pid, signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    (row,) = rows_by(grid).values()
    assert (row["status"], row["attempts"], row["worker"]) == ("not_run", "0", "")
    saved = int((grid / "rows" / row["row_id"] / "checkpoint" / "step").read_text())
    assert saved >= 10
    resumed = start_worker(grid)
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    (row,) = rows_by(grid).values()
    assert row["status"] == "done"
    assert float(row["resumed_from"]) == saved and float(row["steps_run"]) == 60 - saved
    assert events(side)[("step", row["row_id"])] == 60  # no step ran twice


def test_liveness_uses_pid_on_this_host_and_the_heartbeat_lease_elsewhere(tmp_path):
    judge = Liveness(tmp_path, lease_s=1.0, me="me:1")
    host = os.uname().nodename
    assert judge(f"{host}:{os.getpid()}", now_iso()) is False  # alive, and started within the lease
    assert Liveness(tmp_path, 1.0, "me:1")(f"{host}:{os.getpid()}", "2020-01-01T00:00:00Z") is True  # no beat
    assert judge(f"{host}:999999999", "2030-01-01T00:00:00Z") is True
    other = "otherhost:42:1234_5"
    beat = heartbeat_path(tmp_path, other)
    beat.parent.mkdir()
    beat.write_text(json.dumps({"lease_s": 1.0}))
    assert Liveness(tmp_path, 1.0, "me:1")(other, "2020-01-01T00:00:00Z") is False
    old = time.time() - 5
    os.utime(beat, (old, old))
    assert Liveness(tmp_path, 1.0, "me:1")(other, "2020-01-01T00:00:00Z") is True
    assert Liveness(tmp_path, 1.0, "me:1", dead_jobs=lambda: {"1234_5"})(other, "2099-01-01T00:00:00Z") is True


def test_a_stop_that_comes_as_the_row_starts_gives_the_row_back_instead_of_killing_it(tmp_path):
    # A stop asked for before the child has its handlers (the worker signals it at once) must reach the
    # task as should_stop(), not kill the child with SIGUSR1's default action and fail the row.
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:steps", "outcomes": ["step"], "grid": {"i": [1]},
                                "fixed": {"steps": 3, "step_s": 0.01}})
    worker = Worker(grid, linger=False, handle_signals=False)
    worker.request_stop()
    try:
        for attempt in range(20):
            claim = Claim(tmp_path / "shard.csv", "r1", {"i": 1}, 1, worker.worker_id, now_iso())
            payload = worker._run_forked({"i": 1, "steps": 3, "step_s": 0.01}, tmp_path / "row", claim, 0)
            assert payload == {"interrupted": True}, (attempt, payload)
    finally:
        worker._spawner.close()


def test_a_lease_that_ran_out_before_the_linger_began_wakes_it_at_once(tmp_path):
    """A holder seen alive by the pass whose lease runs out before the worker starts to linger (a frozen
    worker, found with its heartbeat almost a lease old): the linger ends at once, so that the next pass
    reclaims the row, instead of waiting for a change that never comes."""
    import threading

    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "grid": {"i": [0]}})
    worker = Worker(grid, handle_signals=False)
    (path,) = worker.store.shard_paths()
    worker._pass_signature = worker._change_signature()
    # What the pass remembered: the shard had 1 row running elsewhere, whose lease ran out 0.1 s later.
    worker._skip[path] = (worker._signature(path), time.monotonic(), 1, time.time() - 0.1)
    ended = threading.Event()
    threading.Thread(target=lambda: (worker._linger_quietly(), ended.set()), daemon=True).start()
    assert ended.wait(10), "the worker lingered on past the holder's lease"
    assert path not in worker._skip  # the next pass looks at the shard again
