"""A stale worker comes back: it must not overwrite what happened while it was frozen.

The decided behaviour: a worker owns a ``running`` row only while the row's ``worker`` and ``attempts``
cells are still its own claim. A worker frozen past its lease (a stopped VM, a swapped-out node) loses
the row to whoever reclaims it; when it thaws, its result is refused by the store (``record`` checks the
claim under the shard's lock), kept as ``rows/<id>/stale-result-<worker>.json`` and reported, and the
newer result stands byte for byte. One level down, a process frozen while it holds a shard's lock past
the lock's stale time finds its lock broken when it thaws, and abandons its write.
"""
import json
import os
import signal
import subprocess
import time

from gridrunner.errors import GridError
from gridrunner.store import HOST, GridStore
from gridtools import make_grid, wait_until, worker_cmd
from reliability_tools import executions, fork, leftovers, rows

LEASE_S = 1.0
ROW_S = 1.0


def test_a_worker_frozen_past_its_lease_never_overwrites_the_newer_result(project, reaper):
    side = project / "executions.log"
    grid = make_grid(project, {"task": "reliability_tasks:run", "outcomes": ["token", "value"], "lease_s": LEASE_S,
                               "grid": {"i": [0]}, "fixed": {"record_to": str(side), "duration": ROW_S}})
    # Its own session, so that the worker and its row's process freeze and thaw together, like a node.
    stale = reaper(subprocess.Popen(worker_cmd(grid), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True))
    assert wait_until(lambda: len(executions(side)) == 1, 30)
    os.killpg(stale.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()

    rescuer = reaper(subprocess.Popen(worker_cmd(grid), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    _, err = rescuer.communicate(timeout=120)
    assert rescuer.returncode == 0, err
    assert time.monotonic() - frozen_at > LEASE_S  # the row was reclaimed only once the lease ran out
    (row,) = rows(grid).values()
    assert (row["status"], row["attempts"], row["worker"]) == ("done", "2", f"{HOST}:{rescuer.pid}")
    shard = grid / "shards" / "shard-000.csv"
    newer = shard.read_bytes()

    os.killpg(stale.pid, signal.SIGCONT)
    _, err = stale.communicate(timeout=120)
    assert stale.returncode == 0, err
    assert "was reclaimed or reset while this worker ran it" in err and "1 stale result(s) kept aside" in err

    # The newer result stands, byte for byte; the stale one is kept beside the row, not lost.
    assert shard.read_bytes() == newer
    runs = executions(side)
    assert len(runs) == 2 and all(run.finished for run in runs.values())
    by_worker = {run.worker_pid: run.token for run in runs.values()}
    assert int(float(row["token"])) == by_worker[rescuer.pid]
    (aside,) = (grid / "rows" / row["row_id"]).glob("stale-result-*.json")
    kept = json.loads(aside.read_text())
    assert (kept["status"], kept["attempt"], kept["worker"]) == ("done", 1, f"{HOST}:{stale.pid}")
    assert int(kept["metrics"]["token"]) == by_worker[stale.pid]
    assert leftovers(grid) == []


def _freeze_inside_a_transaction(grid, path, outcome_file) -> None:
    """Change a cell under the lock, stop this process before the commit, and say how the commit went."""
    store = GridStore(grid, lock_stale_s=1.0)
    try:
        with store.transaction(path) as shard:
            shard.records[0][shard.n_params + 8] = "stale write"  # the error cell of the first row
            shard.dirty = True
            os.kill(os.getpid(), signal.SIGSTOP)
    except GridError as err:
        outcome_file.write_text(str(err))
    else:
        outcome_file.write_text("committed")


def test_a_lock_holder_frozen_past_the_locks_stale_time_abandons_its_write(project, reaper):
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "grid": {"i": [0, 1]}})
    path = grid / "shards" / "shard-000.csv"
    outcome = project / "outcome.txt"
    holder = reaper(fork(_freeze_inside_a_transaction, grid, path, outcome))
    _, status = os.waitpid(holder, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    created = (path.parent / "shard-000.csv.lock").stat().st_mtime

    # Its pid is alive, so the lock counts as stale only lock_stale_s after it was taken (measured from the
    # lock file's time: the holder took it before it stopped); then this process breaks it.
    with GridStore(grid, lock_stale_s=1.0).transaction(path) as shard:
        shard.records[1][shard.n_params + 7] = "newer write"
        shard.dirty = True
    assert time.time() - created >= 1.0
    newer = path.read_bytes()

    os.kill(holder, signal.SIGCONT)
    _, status = os.waitpid(holder, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert outcome.read_text() == (f"{path}: the lock was broken while this process held it (stalled for over 1 s); "
                                   f"the write was abandoned and the shard is unchanged")
    assert path.read_bytes() == newer and b"stale write" not in newer and b"newer write" in newer
    assert leftovers(grid) == []


def killed_before_recording(project, reaper, levels: list):
    """A grid of ``i`` in ``levels`` whose first worker is SIGKILLed after its first row ended and before it
    recorded the result (the shard's lock, held here, keeps it from the record): (grid, the executions
    log, that row's execution, its outbox file)."""
    from gridrunner.lock import ShardLock
    from gridrunner.outbox import OUTBOX_FILE

    side = project / "executions.log"
    grid = make_grid(project, {"task": "reliability_tasks:run", "outcomes": ["token", "value"],
                               "grid": {"i": levels}, "fixed": {"record_to": str(side), "duration": 1.2}})
    first = reaper(subprocess.Popen(worker_cmd(grid), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True))
    assert wait_until(lambda: len(executions(side)) == 1, 60)
    (run,) = executions(side).values()
    outbox = grid / "rows" / run.row_id / OUTBOX_FILE
    with ShardLock(str(grid / "shards" / "shard-000.csv") + ".lock"):
        assert wait_until(lambda: executions(side)[run.token].finished and outbox.exists(), 60)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert rows(grid)[run.row_id]["status"] == "running"  # the result never reached the shard
    return grid, side, run, outbox


def test_a_worker_killed_between_its_rows_end_and_the_record_leaves_a_result_that_is_not_run_again(project, reaper):
    """A Slurm job's SIGKILL (``KillWait`` after its SIGTERM) can land after a row has ended and before the
    transaction that records it: the result kept in the row's outbox is recorded by the next worker."""
    from gridrunner.outbox import OUTBOX_FILE

    grid, side, run, _ = killed_before_recording(project, reaper, [0, 1])

    second = reaper(subprocess.Popen([c for c in worker_cmd(grid) if c != "--quiet"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "was gone before recording the result; recording that result (the row is not run again)" in err
    got = rows(grid)
    assert {r["status"] for r in got.values()} == {"done"}
    runs = executions(side)
    assert len(runs) == 2 and sorted(r.row_id for r in runs.values()) == sorted(got)  # each row ran once
    assert int(float(got[run.row_id]["token"])) == run.token  # the killed worker's result, as it returned it
    assert not any((grid / "rows").glob(f"*/{OUTBOX_FILE}"))
    assert leftovers(grid) == []


#: A second worker that reclaims the row, takes the first one's kept result (the real Worker.execute) and
#: is gone before recording it: the process ends between the two, as a SIGKILL would end it.
TAKE_AND_DIE = """
import os, sys
from pathlib import Path
from gridrunner.worker import Worker
grid = Path(sys.argv[1])
worker = Worker(grid, linger=False, handle_signals=False)
shard = grid / "shards" / "shard-000.csv"
_, scan = worker.store.claim(shard, worker.worker_id, worker.liveness, worker.spec.max_attempts)
result = worker.execute(scan.claim)
print(scan.claim.row_id, scan.claim.previous[0], result.status, flush=True)
os._exit(0)
"""


def test_a_kept_result_outlives_a_second_worker_gone_before_recording_it_too(project, reaper):
    """A kept result is kept again by the worker that takes it: the third worker records it, and the row ran
    once in all (it ran twice before that)."""
    import sys

    grid, side, run, outbox = killed_before_recording(project, reaper, [0])
    first_holder = json.loads(outbox.read_text())["worker"]

    second = subprocess.run([sys.executable, "-c", TAKE_AND_DIE, str(grid)], capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == [run.row_id, first_holder, "done"]  # took the first worker's result
    assert rows(grid)[run.row_id]["status"] == "running"  # and never recorded it
    assert json.loads(outbox.read_text())["worker"] != first_holder  # kept again, under its own claim

    third = subprocess.run(worker_cmd(grid), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    got = rows(grid)[run.row_id]
    assert got["status"] == "done" and int(float(got["token"])) == run.token
    assert len(executions(side)) == 1  # the row ran once, for three workers
    assert not outbox.exists()
    assert leftovers(grid) == []


def test_a_kept_result_never_stands_in_for_a_run_the_user_asked_for(project):
    """A result left in a row's outbox belongs to one claim: a row that is not running (reset, or never
    claimed) runs, and a claim of another holder does not take it."""
    from gridrunner.outbox import OUTBOX_FILE, keep, take

    side = project / "executions.log"
    grid = make_grid(project, {"task": "reliability_tasks:run", "outcomes": ["token", "value"],
                               "grid": {"i": [0]}, "fixed": {"record_to": str(side), "duration": 0.0}})
    store = GridStore(grid)
    (row_id,) = rows(grid)
    claim = {"worker": f"{HOST}:1", "started_at": "2026-01-01T00:00:00", "attempt": 1}
    payload = {"metrics": {"token": 7.0, "value": 1.0}}
    assert keep(store.row_dir(row_id), claim, payload, 5.0)
    assert take(store.row_dir(row_id), (f"{HOST}:1", "2026-01-01T00:00:00", 1)) == (payload, 5.0)
    assert take(store.row_dir(row_id), (f"{HOST}:2", "2026-01-01T00:00:00", 1)) is None
    assert take(store.row_dir(row_id), (f"{HOST}:1", "2026-01-01T00:00:00", 2)) is None
    result = subprocess.run(worker_cmd(grid), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (run,) = executions(side).values()
    assert int(float(rows(grid)[row_id]["token"])) == run.token != 7
    assert (store.row_dir(row_id) / OUTBOX_FILE).exists()  # never taken: the row was not running
