"""`gridrunner submit` on the real one-node Slurm cluster: arrays, kills, time limits, failures, chaos.

Every test makes a grid of toy tasks in its own project directory, submits it with the `gridrunner`
command, and checks the shards and the tasks' side file (``record_to``: one ``<event> <row_id> <pid>``
line per start, finish and step), which counts executions across every process and job.
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from gridrunner.cli import main
from gridrunner.status import grid_status
from gridrunner.submit import submissions
from gridtools import events, make_grid, start_worker, wait_until
from test_worker import rows_by

pytestmark = pytest.mark.slurm

# --------------------------------------------------------------------------- helpers

def gridrunner(*args: str) -> str:
    """Run the `gridrunner` command in this process (SLURM_CONF comes from the fixture); return its output."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def task_ids(grid: Path) -> list[str]:
    """Every job id of every submission of the grid (the watcher's included), in submission order."""
    return [job for entry in submissions(grid) for job in entry["job_ids"]]


def worker_entries(grid: Path, kind: str = "workers") -> list[dict]:
    """The submissions of workers by the user (``workers``), of replacements, or of the watcher."""
    return [entry for entry in submissions(grid) if entry.get("kind", "workers") == kind]


def array_states(cluster, grid: Path) -> dict[str, str]:
    """sacct's state of each array task of the grid; a task sacct does not list yet reads as UNKNOWN."""
    arrays = sorted({job.split("_")[0] for job in task_ids(grid)})
    states = {}
    for array in arrays:
        states.update(cluster.sacct(array))
    return {job: states.get(job, "UNKNOWN") for job in task_ids(grid)}


def live_tasks(cluster, grid: Path) -> list[str]:
    """The grid's array tasks that slurmctld still holds (pending, running or being killed)."""
    held = set(cluster.run("squeue", "-h", "--array", "-o", "%i").split())
    return [job for job in task_ids(grid) if job in held]


def wait_all_ended(cluster, grid: Path, timeout_s: float) -> None:
    assert wait_until(lambda: not live_tasks(cluster, grid), timeout_s, interval_s=0.5), live_tasks(cluster, grid)


def wait_all_completed(cluster, grid: Path, timeout_s: float) -> None:
    """Until sacct says COMPLETED for every array task of the grid (accounting lags the jobs by a moment)."""
    assert wait_until(lambda: set(array_states(cluster, grid).values()) == {"COMPLETED"}, timeout_s,
                      interval_s=0.5), array_states(cluster, grid)


def resubmit(shards: int) -> bool:
    """`gridrunner submit` again; False if it found nothing to run (every open row is in a live worker)."""
    result = CliRunner().invoke(main, ["submit", "--shards", str(shards)], catch_exceptions=False)
    if result.exit_code == 1 and "Error: nothing to run in" in result.output:
        return False
    assert result.exit_code == 0, result.output
    return True


def wait_finished(grid: Path, timeout_s: float) -> None:
    """Until every row is done or failed."""
    assert wait_until(lambda: grid_status(grid).finished, timeout_s, interval_s=0.25), \
        grid_status(grid).counts


def running_rows(grid: Path) -> dict[str, str]:
    """row_id -> the Slurm job (``array_task``) of the worker running it."""
    return {row_id: row["worker"].split(":")[2] for row_id, row in rows_by(grid).items()
            if row["status"] == "running" and row["worker"].count(":") == 2}


def counts_of(side_file: Path, event: str, rows) -> dict[str, int]:
    counted = events(side_file)
    return {row_id: counted[(event, row_id)] for row_id in rows}


def assert_each_row_done_once(grid: Path, side_file: Path) -> None:
    rows = rows_by(grid)
    assert Counter(row["status"] for row in rows.values()) == {"done": len(rows)}
    assert counts_of(side_file, "finish", rows) == {row_id: 1 for row_id in rows}


def assert_a_helper_leaves_the_row_to_its_job(grid: Path, side: Path, row_id: str, job: str) -> None:
    """A worker started now exits without taking ``row_id`` from ``job``, which finishes it, once."""
    helper = start_worker(grid)
    _, stderr = helper.communicate(timeout=60)
    assert helper.returncode == 0, stderr
    row = rows_by(grid)[row_id]
    assert (row["status"], row["worker"].endswith(f":{job}")) == ("done", True), row["worker"]
    assert counts_of(side, "start", [row_id]) == {row_id: 1}
    assert not list((grid / "rows" / row_id).glob("stale-result-*"))


@pytest.fixture
def project(tmp_path, monkeypatch, slurm_cluster):
    """An empty project directory as the working directory; at the end no job of it is left running."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    yield tmp_path
    for grid in (tmp_path / "runs").glob("*/"):
        left = live_tasks(slurm_cluster, grid)
        if left:
            slurm_cluster.run("scancel", *left)
            wait_all_ended(slurm_cluster, grid, 60)


# --------------------------------------------------------------------------- the tests

@pytest.mark.timeout(240)
def test_submit_runs_one_array_task_per_shard_and_every_row_once(project, slurm_cluster):
    side = project / "side.log"
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "max_len": 5,
                               "grid": {"i": list(range(40))}, "fixed": {"duration": 1.0, "record_to": str(side)}})

    output = gridrunner("submit", "--shards", "8")

    (entry,) = worker_entries(grid)
    (watcher,) = worker_entries(grid, "watcher")
    array = entry["job_ids"][0].split("_")[0]
    assert entry["executor"] == "slurm" and entry["array_size"] == 8
    assert entry["job_ids"] == [f"{array}_{i}" for i in range(8)]
    assert output.startswith(f"submitted 8 Slurm array task(s) {array}_0 … {array}_7")
    assert wait_until(lambda: "RUNNING" in gridrunner("status"), 60, interval_s=0.5)
    wait_finished(grid, 120)
    assert_each_row_done_once(grid, side)
    assert {row["worker"].split(":")[2] for row in rows_by(grid).values()} <= set(entry["job_ids"])
    wait_all_completed(slurm_cluster, grid, 60)
    status = gridrunner("status")
    assert "40/40 finished" in status
    for job in entry["job_ids"]:
        assert f"job {job}: COMPLETED" in status
    assert (f"job {watcher['job_ids'][0]}: COMPLETED the grid's watcher: finished, 0 replacement task(s)"
            in " ".join(status.split()))  # words, whatever the columns' spacing


@pytest.mark.timeout(240)
def test_rows_of_cancelled_array_tasks_are_run_again_by_the_next_submit(project, slurm_cluster):
    side = project / "side.log"
    # Each of the 8 shards starts with a 10 s row (cost ranks it first), longer than Slurm's KillWait:
    # a task cancelled a moment after it started is killed in the middle of its row.
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "max_len": 4, "cost": "duration",
                               "grid": [{"i": list(range(8)), "duration": [10]},
                                        {"i": list(range(8, 32)), "duration": [0.5]}],
                               "fixed": {"record_to": str(side)}})
    gridrunner("submit", "--shards", "8")
    assert wait_until(lambda: len(set(running_rows(grid).values())) >= 3, 60, interval_s=0.2)
    running = running_rows(grid)
    victims = sorted(set(running.values()))[:3]
    killed_rows = [row_id for row_id, job in running.items() if job in victims]

    slurm_cluster.run("scancel", *victims)
    assert wait_until(lambda: all(array_states(slurm_cluster, grid)[job] == "CANCELLED" for job in victims), 30)
    output = gridrunner("submit", "--shards", "8")

    assert output.startswith("submitted 8 Slurm array task(s)")
    wait_finished(grid, 120)
    assert_each_row_done_once(grid, side)
    # The killed rows started again, in another job.
    assert counts_of(side, "start", killed_rows) == {row_id: 2 for row_id in killed_rows}
    assert all(rows_by(grid)[row_id]["worker"].split(":")[2] not in victims for row_id in killed_rows)
    wait_all_ended(slurm_cluster, grid, 60)  # the workers left exit by themselves


@pytest.mark.timeout(120)
def test_a_cancelled_job_keeps_its_row_until_slurm_has_ended_its_processes(project, slurm_cluster):
    side = project / "side.log"
    # The row outlives the cancel by 2.5 s, within Slurm's KillWait (5 s): the cancelled job finishes it.
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "grid": {"i": [0]},
                               "fixed": {"duration": 4.0, "record_to": str(side)}})
    gridrunner("submit", "--shards", "1")
    assert wait_until(lambda: running_rows(grid), 60)
    ((row_id, job),) = running_rows(grid).items()
    time.sleep(1.5)  # past the margin within which a job's end does not count for a fresh claim

    slurm_cluster.run("scancel", job)
    assert wait_until(lambda: array_states(slurm_cluster, grid)[job] == "CANCELLED", 10)
    # A new worker asks sacct at once, which already says CANCELLED, while the job is still COMPLETING.
    assert_a_helper_leaves_the_row_to_its_job(grid, side, row_id, job)


@pytest.mark.timeout(120)
def test_regression_a_running_job_that_accounting_still_calls_pending_keeps_its_row(project, slurm_cluster, monkeypatch):
    # sacct answers from the accounting database, which slurmctld updates after the fact: on a loaded node
    # a started array task read PENDING for over a second, and a worker that asked then reclaimed the row
    # that task was running (two rows ran twice in the chaos test below). Here accounting lags for good:
    # an `sacct` first on PATH (for this process, the jobs and the helper) says PENDING where the real one
    # says RUNNING. Slurm itself is real; only its accounting's delay is made to last.
    import shutil

    real = shutil.which("sacct")
    fake_bin = project / "lagging-accounting"
    fake_bin.mkdir()
    (fake_bin / "sacct").write_text(f'#!/bin/sh\nset -e\n"{real}" "$@" | sed "s/|RUNNING/|PENDING/g"\n')
    (fake_bin / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    side = project / "side.log"
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "grid": {"i": [0]},
                               "fixed": {"duration": 6.0, "record_to": str(side)}})
    gridrunner("submit", "--shards", "1")
    assert wait_until(lambda: running_rows(grid), 60)
    ((row_id, job),) = running_rows(grid).items()
    assert slurm_cluster.sacct(job.split("_")[0]).get(job) == "PENDING"  # what every worker hears
    time.sleep(2.5)  # past the margin within which a job's state does not count for a fresh claim

    assert_a_helper_leaves_the_row_to_its_job(grid, side, row_id, job)


@pytest.mark.timeout(360)
def test_a_row_stopped_by_the_time_limit_resumes_from_its_checkpoint_after_the_requeue(project, slurm_cluster):
    side = project / "side.log"
    # USR2 comes 15-45 s into a 1-minute task; the row needs 60 s, so it is stopped at least once.
    (project / "jobs" / "short.yaml").write_text("time_min: 1\nsignal_delay_s: 15\n")
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:steps", "outcomes": ["final_step", "steps_run", "resumed_from"],
                               "grid": {"i": [0]},
                               "fixed": {"steps": 120, "step_s": 0.5, "checkpoint_every": 1000,
                                         "record_to": str(side)}})

    gridrunner("submit", "--shards", "1", "--profile", "short", "--max-requeues", "5")

    wait_finished(grid, 300)
    ((row_id, row),) = rows_by(grid).items()
    assert row["status"] == "done" and float(row["final_step"]) == 120
    lines = [line.split()[0] for line in side.read_text().splitlines()]
    stops = [int(event.split("@")[1]) for event in lines if event.startswith("interrupted@")]
    starts = [int(event.split("@")[1]) for event in lines if event.startswith("start@")]
    assert stops, "the time limit never stopped the row"
    # Every run starts where the previous one stopped, so no step ran twice.
    assert starts == [0, *stops]
    assert lines.count("step") == 120
    assert float(row["resumed_from"]) == stops[-1] and float(row["steps_run"]) == 120 - stops[-1]
    assert counts_of(side, "finish", [row_id]) == {row_id: 1}
    wait_all_completed(slurm_cluster, grid, 60)


@pytest.mark.timeout(180)
def test_a_task_exception_in_a_slurm_job_is_recorded_like_a_local_one(project, slurm_cluster):
    spec = {"task": "gridrunner.tasks.toy:crash", "outcomes": ["value"], "grid": {"mode": ["raise", "ok"]}}
    local = make_grid(project, spec, name="local")
    gridrunner("work", "--grid", str(local), "--quiet")
    on_slurm = make_grid(project, spec, name="slurm")

    gridrunner("submit", "--grid", str(on_slurm), "--shards", "1")

    wait_finished(on_slurm, 120)
    for grid in (local, on_slurm):
        by_mode = {row["mode"]: row for row in rows_by(grid).values()}
        assert (by_mode["ok"]["status"], by_mode["ok"]["error"]) == ("done", "")
        failed = by_mode["raise"]
        assert (failed["status"], failed["error"]) == ("failed", "RuntimeError: planted failure from the crash task")
        traceback = (grid / "rows" / failed["row_id"] / "traceback.txt").read_text()
        assert traceback.startswith(f"--- attempt 1 by {failed['worker']} at {failed['started_at']}\n")
        assert traceback.rstrip().endswith("RuntimeError: planted failure from the crash task")
    ((job,),) = [entry["job_ids"] for entry in worker_entries(on_slurm)]
    assert rows_by(on_slurm)[failed["row_id"]]["worker"].endswith(f":{job}")
    wait_all_completed(slurm_cluster, on_slurm, 60)  # a failed row is the row's failure, not the job's


@pytest.mark.timeout(300)
def test_random_cancels_and_resubmits_run_every_row_exactly_once(project, slurm_cluster):
    seed = random.randrange(1 << 16)
    print(f"chaos seed {seed}")
    chance = random.Random(seed)
    side = project / "side.log"
    # Rows shorter than Slurm's KillWait (5 s) finish in their cancelled job; 7 s rows are killed.
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "max_len": 8,
                               "grid": {"i": list(range(16)), "duration": [0.5, 2.0, 7.0]},
                               "fixed": {"record_to": str(side)}})
    gridrunner("submit", "--shards", "6")
    deadline = time.monotonic() + 200
    for _ in range(4):
        time.sleep(chance.uniform(1.0, 6.0))
        live = live_tasks(slurm_cluster, grid)
        if live:
            slurm_cluster.run("scancel", *chance.sample(live, min(len(live), chance.randint(1, 3))))
        if grid_status(grid).finished:
            break
        resubmit(chance.randint(1, 4))
    while not grid_status(grid).finished:
        assert time.monotonic() < deadline, grid_status(grid).counts
        if not live_tasks(slurm_cluster, grid):
            resubmit(6)
        time.sleep(1.0)

    assert_each_row_done_once(grid, side)
    wait_all_ended(slurm_cluster, grid, 60)


# --------------------------------------------------------------------------- the watcher

def sacct_times(cluster, jobs: list[str]) -> dict[str, tuple[float, float]]:
    """(start, end) in epoch seconds of each finished job, from sacct."""
    from datetime import datetime

    arrays = sorted({job.split("_")[0] for job in jobs})
    out = cluster.run("sacct", "-n", "-P", "-X", "-o", "JobID,Start,End", "-j", ",".join(arrays))
    times = {}
    for line in out.splitlines():
        job, start, end = line.split("|")
        if job in jobs and start[:1].isdigit() and end[:1].isdigit():
            times[job] = tuple(datetime.fromisoformat(t).timestamp() for t in (start, end))
    return times


def epoch(iso: str) -> float:
    from gridrunner.store import parse_iso

    return parse_iso(iso)


@pytest.mark.timeout(300)
def test_tasks_whose_rows_are_done_end_at_once_while_the_watcher_stays_until_the_long_row_ends(project, slurm_cluster):
    # One 90 s row and 24 of 10 s on 4 array tasks: cost ordering starts the long row first, and the other
    # three tasks share the short rows, 80 s each, so they end about 10 s before the long row does. Rows
    # this long against the ~7 s that a task spends starting and ending here make ~0.9 of the time busy.
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "max_len": 7,
                               "cost": "duration",
                               "grid": [{"i": [0], "duration": [90]}, {"i": list(range(1, 25)), "duration": [10]}]})
    gridrunner("submit", "--shards", "4")
    (entry,) = worker_entries(grid)
    (watcher,) = worker_entries(grid, "watcher")
    wait_finished(grid, 200)
    wait_all_ended(slurm_cluster, grid, 60)
    jobs = entry["job_ids"]
    assert wait_until(lambda: len(sacct_times(slurm_cluster, jobs + watcher["job_ids"])) == 5, 30)
    times = sacct_times(slurm_cluster, jobs + watcher["job_ids"])

    rows = rows_by(grid).values()
    by_job = {job: [row for row in rows if row["worker"].endswith(f":{job}")] for job in jobs}
    (long_job,) = [job for job, mine in by_job.items() if any(row["duration"] == "90" for row in mine)]
    last_row_end = max(epoch(row["finished_at"]) for row in rows)
    for job in jobs:
        last = max(epoch(row["finished_at"]) for row in by_job[job])
        print(f"{job}: allocated {times[job][1] - times[job][0]:.0f} s, busy "
              f"{sum(float(row['runtime_s']) for row in by_job[job]):.1f} s, ended {times[job][1] - last:.0f} s after "
              f"its last row and {last_row_end - times[job][1]:.0f} s before the grid's")
    for job in jobs:
        if job == long_job:
            continue
        # Within a few seconds of its last row (sacct and the CSV both count whole seconds), while the
        # long row still runs.
        last = max(epoch(row["finished_at"]) for row in by_job[job])
        assert times[job][1] - last <= 6, (job, times[job], last)
        assert times[job][1] < last_row_end, (job, times[job], last_row_end)
    # The watcher ends after the last row, and by itself (COMPLETED, not its time limit).
    (watcher_job,) = watcher["job_ids"]
    assert times[watcher_job][1] >= last_row_end
    assert slurm_cluster.sacct(watcher_job)[watcher_job] == "COMPLETED"
    assert not worker_entries(grid, "replacement")
    allocated = sum(end - start for start, end in (times[job] for job in jobs))
    busy = sum(float(row["runtime_s"]) for row in rows)
    print(f"busy {busy:.0f} s of {allocated:.0f} s allocated to the 4 worker tasks: {busy / allocated:.3f}; "
          f"the watcher: {times[watcher_job][1] - times[watcher_job][0]:.0f} s of 1 CPU")
    assert busy / allocated >= 0.85, (busy, allocated)  # the issue aims at 0.9: what limits it, bench/README.md


@pytest.mark.timeout(240)
def test_the_watcher_resubmits_a_cancelled_tasks_row_which_resumes_from_its_checkpoint(project, slurm_cluster):
    side = project / "side.log"
    # One row of 40 half-second steps, checkpointed every 2 steps, and a few short rows for a second task.
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:steps", "outcomes": ["final_step", "steps_run", "resumed_from"],
                               "max_len": 3, "cost": "steps",
                               "grid": [{"i": [0], "steps": [40]}, {"i": [1, 2, 3], "steps": [2]}],
                               "fixed": {"step_s": 0.5, "checkpoint_every": 2, "record_to": str(side)}})
    long_id = next(row_id for row_id, row in rows_by(grid).items() if row["steps"] == "40")
    gridrunner("submit", "--shards", "2")
    (entry,) = worker_entries(grid)
    assert wait_until(lambda: events(side)[("step", long_id)] >= 8, 90, interval_s=0.2)
    job = running_rows(grid)[long_id]

    slurm_cluster.run("scancel", job)

    wait_finished(grid, 150)
    row = rows_by(grid)[long_id]
    (replacement,) = worker_entries(grid, "replacement")
    assert row["status"] == "done" and float(row["final_step"]) == 40
    assert row["worker"].split(":")[2] in replacement["job_ids"]
    assert (replacement["array_size"], replacement["by"]) == (1, worker_entries(grid, "watcher")[0]["job_ids"][0])
    assert replacement["settings"] == entry["settings"]
    lines = [line.split()[0] for line in side.read_text().splitlines() if line.split()[1] == long_id]
    stops = [int(e.split("@")[1]) for e in lines if e.startswith("interrupted@")]
    starts = [int(e.split("@")[1]) for e in lines if e.startswith("start@")]
    assert len(stops) == 1 and starts == [0, stops[0]] and stops[0] >= 8
    assert lines.count("step") == 40 and float(row["resumed_from"]) == stops[0]
    assert len(worker_entries(grid)) == 1  # no submit by the user
    status = gridrunner("status")
    status = " ".join(status.split())  # words, whatever the columns' spacing
    assert "replacement submitted by the watcher" in status and "1 replacement task(s) submitted" in status
    wait_all_ended(slurm_cluster, grid, 60)


@pytest.mark.timeout(120)
def test_cancel_stops_the_watcher_first_and_nothing_is_resubmitted(project, slurm_cluster):
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "grid": {"i": [0, 1]},
                               "fixed": {"duration": 60}})
    gridrunner("submit", "--shards", "2")
    (watcher,) = worker_entries(grid, "watcher")
    assert wait_until(lambda: len(running_rows(grid)) == 2, 60, interval_s=0.2)
    assert wait_until(lambda: "watching" in gridrunner("status"), 30, interval_s=0.5)

    output = gridrunner("cancel")

    (watcher_job,) = watcher["job_ids"]
    assert f"Slurm job {watcher_job} (the watcher)" in output
    wait_all_ended(slurm_cluster, grid, 60)
    assert set(array_states(slurm_cluster, grid).values()) == {"CANCELLED"}
    # (words, whatever the columns' spacing)
    assert wait_until(lambda: "the grid's watcher: ended, 0 replacement task(s) submitted (stopped)"
                      in " ".join(gridrunner("status").split()), 30, interval_s=1)
    time.sleep(3)  # the rows' workers are gone: a watcher still on duty would submit replacements now
    assert not worker_entries(grid, "replacement")
