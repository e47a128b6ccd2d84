"""Chaos: kill -9 random workers while they share a grid, and check that nothing was lost or run twice.

What "exactly once" means here, precisely. An *execution* is one run of the task function
(``reliability_tasks:run`` logs its start and finish, with a unique token, its pid and its worker's
pid). A row is *finished* when a transaction writes ``done`` (or ``failed``) into its shard row; the
shard's ``token`` cell then names the execution whose result was recorded. A worker killed while it
runs a row leaves an execution that started (and maybe finished) but was never recorded; its row is
claimed again and run again. So:

* every row is finished exactly once, with the result of an execution of that row that finished,
  by the worker named in its ``worker`` cell, and no finished row ever changes afterwards (a reader
  checks that at every read);
* every other execution of a row ran under a worker that was killed, and each killed worker accounts
  for at most one of them (it runs one row at a time);
* ``attempts`` counts the claims of the row that were not given back: at least its executions, and
  ``attempts - 1`` summed over the grid (the claims that kills orphaned) is at most the number of kills.
"""
import os
import random
import signal
import subprocess
import time

import pytest

from gridrunner.store import HOST, pid_alive
from gridrunner.worker import heartbeat_path
from gridtools import make_grid, wait_until, worker_cmd
from reliability_tools import by_row, executions, leftovers, rows, start_reader, stop_reader

N_ROWS = 2000
N_WORKERS = 8
N_KILLS = 20
MAX_LEN = 100
# Long enough that the grid (N_ROWS * ROW_S / N_WORKERS = 20 s of sleeping alone) outlasts the ~10 s of kills,
# short enough that most kills land in the middle of a row.
ROW_S = 0.08


@pytest.mark.slow
def test_kill_9_random_workers_every_half_second_and_nothing_is_lost_or_run_twice(project, reaper):
    side = project / "executions.log"
    grid = make_grid(project, {
        "task": "reliability_tasks:run", "outcomes": ["token", "value"], "grid": {"i": list(range(N_ROWS))},
        "fixed": {"record_to": str(side), "duration": ROW_S}, "max_len": MAX_LEN,
        "lease_s": 5, "max_attempts": 50,  # a row may be hit by several kills; it must still finish
    })
    n_shards = N_ROWS // MAX_LEN
    reader, stop, summary_file = start_reader(grid, project)
    reaper(reader)
    logs = project / "worker logs"
    logs.mkdir()
    workers: list[subprocess.Popen] = []

    def start_worker(home: int) -> None:
        with open(logs / f"{len(workers)}.err", "w") as err:
            workers.append(reaper(subprocess.Popen(worker_cmd(grid, "--shard", str(home)),
                                                   stdout=subprocess.DEVNULL, stderr=err)))

    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    for i in range(N_WORKERS):
        start_worker(i * n_shards // N_WORKERS)
    assert wait_until(lambda: len(executions(side)) >= N_WORKERS, 60)

    killed: list[int] = []
    mid_run = 0
    for _ in range(N_KILLS):
        time.sleep(rng.uniform(0.25, 0.75))
        live = [w for w in workers if w.poll() is None]
        assert live, "the grid finished before the chaos did; make it bigger"
        victim = rng.choice(live)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed.append(victim.pid)
        started = {run.token for run in executions(side).values() if run.worker_pid == victim.pid}
        mid_run += any(not run.finished for run in executions(side).values() if run.token in started)
        start_worker(rng.randrange(n_shards))
        assert workers[-1].pid not in killed, "a pid was reused during the test; run it again"

    for worker in workers:
        if worker.pid not in killed:
            assert worker.wait(timeout=300) == 0, (logs / f"{workers.index(worker)}.err").read_text()
    summary = stop_reader(reader, stop, summary_file)

    # Every read of every shard, at every instant, was a whole valid shard, and no finished row changed.
    assert summary["failures"] == []
    assert summary["reads"] > 100 and set(summary["statuses_seen"]) >= {"not_run", "running", "done"}

    # Every row finished exactly once, with the result of one of its own executions.
    final = rows(grid)
    assert len(final) == N_ROWS and {r["status"] for r in final.values()} == {"done"}
    runs = executions(side)
    per_row = by_row(runs)
    recorded = {}
    for row_id, row in final.items():
        token = int(float(row["token"]))
        run = runs.get(token)
        assert run is not None and run.row_id == row_id and run.finished, row
        assert row["worker"] == f"{HOST}:{run.worker_pid}"
        recorded[row_id] = token

    # Every other execution ran under a killed worker, at most one per kill.
    unrecorded = [run for run in runs.values() if recorded[run.row_id] != run.token]
    assert {run.worker_pid for run in unrecorded} <= set(killed)
    assert len(unrecorded) == len({run.worker_pid for run in unrecorded}) <= N_KILLS

    # attempts: the claims not given back; the extra ones are the claims that kills orphaned.
    orphaned = 0
    for row_id, row in final.items():
        attempts = int(row["attempts"])
        assert attempts >= len(per_row[row_id]) >= 1, row
        orphaned += attempts - 1
    assert len(unrecorded) <= orphaned <= N_KILLS

    # A killed worker's spawner and row process died with it.
    assert not [run.pid for run in runs.values() if run.worker_pid in killed and pid_alive(run.pid)]
    assert not [run.spawner_pid for run in runs.values() if run.worker_pid in killed and pid_alive(run.spawner_pid)]
    # No temporary file, lock, or lock being broken is left beside the shards.
    assert leftovers(grid) == []
    # Only killed workers leave a heartbeat file behind.
    beats = {p.name for p in (grid / "workers").glob("*.hb")}
    assert beats <= {heartbeat_path(grid, f"{HOST}:{pid}").name for pid in killed}
    print(f"chaos: {len(killed)} kills ({mid_run} while a row ran), {len(runs)} executions for {N_ROWS} rows, "
          f"{len(unrecorded)} started again after a kill, {orphaned} orphaned claims, "
          f"{summary['reads']} shard reads all valid")
