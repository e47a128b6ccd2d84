"""Rows the grid stops (a prune, a hang) whose worker is SIGKILLed before it records the ending: the verdict
was kept in the row's outbox when it was made, so the next worker records it, with the step the rule matched
at, and the row is not run again. Before, the verdict lived only in the worker's memory: the row ran again,
or ended ``done`` with the metrics the task returned after the stop."""
import json
import os
import signal
import subprocess

import pytest

from gridrunner.lock import ShardLock
from gridrunner.outbox import OUTBOX_FILE
from gridtools import events, make_grid, wait_until, worker_cmd
from reliability_tools import leftovers, rows

STEPS = "gridrunner.tasks.toy:steps"


def steps_grid(project, **keys):
    fixed = {"steps": 60, "step_s": 0.3, "checkpoint_every": 1, "record_to": str(project / "events"),
             "plateau": 0.5, **keys.pop("fixed", {})}
    return make_grid(project, {"task": STEPS, "outcomes": ["final_step"], "grid": {"copy": [0]}, "fixed": fixed,
                               **keys})


def kept(grid, row_id):
    path = grid / "rows" / row_id / OUTBOX_FILE
    try:
        return json.loads(path.read_text())["payload"]
    except (OSError, ValueError, KeyError):
        return None


def kill(worker):
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its spawner; the row's process dies with them
    worker.wait()


def finish(grid):
    again = subprocess.run(worker_cmd(grid), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    (row,) = rows(grid).values()
    return row


@pytest.mark.parametrize("ignore_stop", [True, False], ids=["killed-in-its-grace-time", "killed-before-the-record"])
def test_regression_a_pruned_row_whose_worker_is_killed_stays_pruned_and_is_not_run_again(project, reaper,
                                                                                           ignore_stop):
    grid = steps_grid(project, prune="step >= 4 and loss > 0.3", fixed={"ignore_stop": ignore_stop})
    (row_id,) = rows(grid)
    worker = reaper(subprocess.Popen(worker_cmd(grid, "--grace", "60"), start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    if ignore_stop:  # the task runs on after the prune, in the worker's grace time, when the worker is killed
        assert wait_until(lambda: (kept(grid, row_id) or {}).get("pruned"), 60)
        kill(worker)
    else:  # the task stops at once; the shard's lock, held here, keeps the worker from recording it
        assert wait_until(lambda: events(project / "events")[("start@0", row_id)] == 1, 60)
        with ShardLock(str(grid / "shards" / "shard-000.csv") + ".lock"):
            assert wait_until(lambda: events(project / "events")[("interrupted@4", row_id)] == 1, 60)
            assert wait_until(lambda: "interrupted" in (kept(grid, row_id) or {}), 30)
            kill(worker)
    assert rows(grid)[row_id]["status"] == "running"
    row = finish(grid)
    assert (row["status"], row["error"]) == ("failed", "Pruned: step >= 4 and loss > 0.3 at step 4")
    assert events(project / "events")[("start@0", row_id)] == 1
    assert sum(n for (event, rid), n in events(project / "events").items() if event.startswith("start")) == 1
    assert not (grid / "rows" / row_id / OUTBOX_FILE).exists()
    assert leftovers(grid) == []


def test_regression_a_hung_row_whose_worker_is_killed_before_the_record_stays_hung(project, reaper):
    grid = steps_grid(project, hang_after_min=0.02, fixed={"hang_at": 5})
    (row_id,) = rows(grid)
    worker = reaper(subprocess.Popen(worker_cmd(grid), start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE))
    assert wait_until(lambda: events(project / "events")[("start@0", row_id)] == 1, 60)
    with ShardLock(str(grid / "shards" / "shard-000.csv") + ".lock"):
        assert wait_until(lambda: (kept(grid, row_id) or {}).get("ended"), 60)
        kill(worker)
    row = finish(grid)
    assert (row["status"], row["error"]) == ("failed", "Hung: no progress for 0.02 min (last step 5)")
    assert sum(n for (event, rid), n in events(project / "events").items() if event.startswith("start")) == 1
    assert not (grid / "rows" / row_id / OUTBOX_FILE).exists()
