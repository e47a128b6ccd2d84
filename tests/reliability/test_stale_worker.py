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
