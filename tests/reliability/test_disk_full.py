"""A full disk while workers write: the shard keeps its last good version, the worker says so and stops.

The grid lives on a tmpfs of 512 KiB (the ``small_disk`` fixture). A worker runs rows; the test fills the
disk at a random instant, leaving no page free (the lock file cannot be written, unless a lock released
after the fill gives its page back) or one page (the lock fits, the shard's temporary file does not). Then:

* the worker exits 1 with one ``Error: ...`` line saying which file, that the disk is full, and which
  row's result could not be recorded;
* every shard still parses and follows the contract: the rows recorded before stay recorded, the row the
  worker was running stays ``running`` (its result could not be written; the row is run again), and no
  temporary or lock file is left;
* once there is space again, a new worker finishes the grid, and every row is recorded exactly once.
"""
import random
import re
import subprocess
import time

import pytest

from gridrunner.store import HOST
from gridrunner.grid import make
from gridtools import wait_until, worker_cmd, write_spec
from reliability_tools import by_row, cli, executions, leftovers, rows, start_reader, stop_reader

N_ROWS = 60


# With no page left, the lock file usually cannot be written. But a lock file removed after the fill (the
# worker releasing the lock it held when the disk filled) gives its page back, so the next lock fits and the shard's
# temporary file is what fails: either error is the right one then (CI saw the second, 2026-12-03).
@pytest.mark.parametrize("free_pages, what", [(0, "(cannot create the shard's lock file|cannot write the shard)"),
                                              (1, "cannot write the shard")])
def test_a_full_disk_keeps_the_shard_whole_and_the_worker_stops_with_a_clear_error(project, small_disk, reaper,
                                                                                      free_pages, what):
    side = project / "executions.log"  # on the big disk: the task's own log must not fail
    spec = write_spec(project, {"task": "reliability_tasks:run", "outcomes": ["token", "value"], "max_len": 30,
                                "grid": {"i": list(range(N_ROWS)), "pad": ["x" * 200]},  # 2 shards, ~3 pages each
                                "fixed": {"record_to": str(side), "duration": 0.02}})
    grid = make(spec, small_disk.path / "runs").grid_dir
    reader, stop, summary_file = start_reader(grid, project)
    reaper(reader)

    worker = reaper(subprocess.Popen(worker_cmd(grid), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert wait_until(lambda: sum(run.finished for run in executions(side).values()) >= 5, 60)
    time.sleep(random.uniform(0, 0.05))
    small_disk.fill(leave_pages=free_pages)
    _, err = worker.communicate(timeout=120)
    summary = stop_reader(reader, stop, summary_file)

    assert summary["failures"] == [] and summary["reads"] > 0
    assert leftovers(grid) == []
    before = rows(grid)
    running = [r for r in before.values() if r["status"] == "running"]
    assert len(running) == 1 and running[0]["worker"] == f"{HOST}:{worker.pid}"
    assert worker.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"Error: {re.escape(str(grid))}/shards/shard-00[01]\.csv: {what} \(the disk is full\); "
                        rf"(it|the shard) keeps its previous content; the result of row {running[0]['row_id']} was "
                        rf"not recorded, and the row runs again once this worker has stopped", last), err
    runs = executions(side)
    assert {r["row_id"] for r in before.values() if r["status"] == "done"} == \
        {run.row_id for run in runs.values() if run.finished} - {running[0]["row_id"]}

    small_disk.free()
    rescuer = reaper(subprocess.Popen(worker_cmd(grid), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    _, err = rescuer.communicate(timeout=120)
    assert rescuer.returncode == 0, err
    after = rows(grid)
    assert len(after) == N_ROWS and {r["status"] for r in after.values()} == {"done"}
    runs = executions(side)
    for row_id, row in after.items():
        recorded = [run for run in by_row(runs)[row_id] if run.token == int(float(row["token"]))]
        assert len(recorded) == 1 and recorded[0].finished
        if before[row_id]["status"] == "done":
            assert row == before[row_id]  # recorded before the disk filled: never touched again
    assert leftovers(grid) == []


def test_make_on_a_full_disk_gives_one_error_and_leaves_nothing(project, small_disk):
    spec = write_spec(project, {"task": "reliability_tasks:run", "outcomes": ["token"], "max_len": 30,
                                "grid": {"i": list(range(N_ROWS)), "pad": ["x" * 200]}})
    small_disk.fill(leave_pages=2)
    result = cli("make", str(spec), "--runs", str(small_disk.path / "runs"))
    assert (result.returncode, result.stderr) == (
        1, f"Error: cannot write {small_disk.path / 'runs' / 'g'} (the disk is full); nothing was written\n")
    assert sorted(p.name for p in small_disk.path.rglob("*")) == ["filler.bin", "runs"]
