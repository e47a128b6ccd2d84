"""gridrunner's guarantees on a shared filesystem with two NFS-like clients (nfsmodel.py).

Workers, readers, ``status`` and ``analyze`` run on two mounts of one server directory; each mount keeps
its own cache of names (``entry_ttl``) and attributes (``attr_ttl``) of 1-3 s, with close-to-open
consistency and ``ESTALE`` for handles whose file the other client replaced. The workloads are small
because every file operation goes through a FUSE process written in Python.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from gridrunner.store import HOST, pid_alive
from gridtools import events, make_grid, wait_until, worker_cmd
from reliability_tools import by_row, executions, leftovers, rows, start_reader, stop_reader

CACHES = [dict(entry_ttl=2.0, attr_ttl=1.0), dict(entry_ttl=1.0, attr_ttl=3.0)]


def _two_clients(nfs):
    return [nfs.mount(name, **caches) for name, caches in zip("ab", CACHES)]


def _spawn(reaper, command, log_path, **kwargs):
    with open(log_path, "w") as log_fh:
        return reaper(subprocess.Popen(command, stdout=log_fh, stderr=log_fh, **kwargs))


@pytest.mark.slow
def test_sixteen_workers_on_two_clients_run_every_row_exactly_once(nfs, project, reaper):
    a, b = _two_clients(nfs)
    side = project / "executions.log"
    n_rows = 300
    grid_a = make_grid(a, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "max_len": n_rows,
                           "grid": {"i": list(range(n_rows))}, "fixed": {"record_to": str(side)}})
    grid_b = b / grid_a.relative_to(a)
    procs = [_spawn(reaper, worker_cmd(grid_a if k % 2 else grid_b), project / f"worker-{k}.log")
             for k in range(16)]
    for k, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, (project / f"worker-{k}.log").read_text()[-3000:]
    final = rows(grid_a)
    assert sorted(r["status"] for r in final.values()) == ["done"] * n_rows
    counts = events(side)
    starts = [n for (event, _), n in counts.items() if event == "start"]
    assert len(starts) == n_rows and set(starts) == {1}
    assert leftovers(grid_a) == []
    assert len({r["worker"] for r in final.values()}) > 1


@pytest.mark.slow
def test_kill_9_workers_on_two_clients_and_nothing_is_lost_or_run_twice(nfs, project, reaper):
    a, b = _two_clients(nfs)
    side = project / "executions.log"
    n_rows, max_len, n_kills = 240, 40, 8
    grid_a = make_grid(a, {"task": "reliability_tasks:run", "outcomes": ["token", "value"],
                           "grid": {"i": list(range(n_rows))}, "max_len": max_len, "lease_s": 5, "max_attempts": 50,
                           "fixed": {"record_to": str(side), "duration": 0.25}})
    grid_b = b / grid_a.relative_to(a)
    reader, stop, summary_file = start_reader(grid_b, project)
    reaper(reader)
    workers: list[subprocess.Popen] = []

    def start_worker(home: int) -> None:
        grid = (grid_a, grid_b)[len(workers) % 2]
        workers.append(_spawn(reaper, worker_cmd(grid, "--shard", str(home)), project / f"worker-{len(workers)}.log"))

    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    print(f"two-client chaos seed {seed}")
    n_shards = n_rows // max_len
    for i in range(6):
        start_worker(i % n_shards)
    assert wait_until(lambda: len(executions(side)) >= 6, 120)
    killed = []
    for _ in range(n_kills):
        time.sleep(rng.uniform(0.3, 0.9))
        live = [w for w in workers if w.poll() is None]
        assert live, "the grid finished before the chaos did; make it bigger"
        victim = rng.choice(live)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed.append(victim.pid)
        start_worker(rng.randrange(n_shards))
    for k, worker in enumerate(workers):
        if worker.pid not in killed:
            assert worker.wait(timeout=600) == 0, (project / f"worker-{k}.log").read_text()[-3000:]
    summary = stop_reader(reader, stop, summary_file)
    assert summary["failures"] == []
    assert summary["reads"] > 20

    final = rows(grid_a)
    assert len(final) == n_rows and {r["status"] for r in final.values()} == {"done"}
    runs = executions(side)
    recorded = {}
    for row_id, row in final.items():
        run = runs.get(int(float(row["token"])))
        assert run is not None and run.row_id == row_id and run.finished, row
        assert row["worker"] == f"{HOST}:{run.worker_pid}"
        recorded[row_id] = run.token
    unrecorded = [run for run in runs.values() if recorded[run.row_id] != run.token]
    assert {run.worker_pid for run in unrecorded} <= set(killed)
    assert len(unrecorded) == len({run.worker_pid for run in unrecorded}) <= n_kills
    per_row = by_row(runs)
    assert all(int(row["attempts"]) >= len(per_row[rid]) for rid, row in final.items())
    assert leftovers(grid_a) == []
    print(f"two-client chaos: {len(killed)} kills, {len(runs)} executions for {n_rows} rows, "
          f"{summary['reads']} shard reads on the other client all valid")


def _watch(grid: str, stop_file: str, out_file: str) -> None:
    """Run ``status`` and ``load`` (what ``analyze`` reads) on ``grid`` until ``stop_file`` exists."""
    from gridrunner.frame import load
    from gridrunner.status import grid_status

    rounds, problems = 0, []
    grid_status(grid), load(grid)  # the imports take seconds; the workers start once this is done
    open(out_file + ".ready", "w").close()
    while not os.path.exists(stop_file):
        try:
            status = grid_status(grid)
            frame = load(grid)
        except Exception as err:  # noqa: BLE001 - any exception is the finding
            problems.append(f"{type(err).__name__}: {err}")
            continue
        rounds += 1
        problems += [f"status: {s.path.name}: {s.error}" for s in status.shards if s.error]
        problems += [f"load: {bad}" for bad in frame.attrs["bad_rows"]]
        if len(frame) != 160:
            problems.append(f"load: {len(frame)} rows")
    with open(out_file, "w") as fh:
        json.dump({"rounds": rounds, "problems": problems[:20]}, fh)


@pytest.mark.slow
def test_status_and_analyze_on_one_client_read_every_shard_while_the_other_client_replaces_them(nfs, project,
                                                                                                 reaper):
    a, b = _two_clients(nfs)
    grid_a = make_grid(a, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "max_len": 40,
                           "grid": {"i": list(range(160))}, "fixed": {"duration": 0.03}})
    grid_b = b / grid_a.relative_to(a)
    stop, out = project / "watch.stop", project / "watch.json"
    code = f"import test_two_clients as t; t._watch({str(grid_b)!r}, {str(stop)!r}, {str(out)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__),
                                                           os.path.dirname(os.path.dirname(__file__)),
                                                           os.environ["PYTHONPATH"]])}
    watcher = _spawn(reaper, [sys.executable, "-c", code], project / "watch.log", env=env)
    assert wait_until(lambda: os.path.exists(str(out) + ".ready") or watcher.poll() is not None, 120)
    workers = [_spawn(reaper, worker_cmd(grid_a, "--shard", str(k)), project / f"worker-{k}.log") for k in range(4)]
    for k, worker in enumerate(workers):
        assert worker.wait(timeout=600) == 0, (project / f"worker-{k}.log").read_text()[-3000:]
    stop.write_text("stop")
    assert watcher.wait(timeout=120) == 0, (project / "watch.log").read_text()[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == [] and result["rounds"] > 3, result


def _in_another_host(hostname: str, command: list[str]) -> list[str]:
    """``command`` in its own UTS namespace, so that gridrunner sees another host name (needs root)."""
    return ["unshare", "--uts", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh", *command]


@pytest.mark.slow
def test_a_live_workers_row_on_another_host_is_never_reclaimed_through_a_stale_cached_mtime(nfs, project, reaper):
    # Client b caches attributes for 10 s (acregmax); the lease is 2 s. Once anything on b has looked at
    # the owner's heartbeat, a `stat` there answers with that mtime until the cache expires, so a worker
    # on b that judged the heartbeat by `stat` would find it older than the lease and steal the row from
    # its live owner. Judged by open + fstat (close-to-open fetches the attributes), it never does.
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare, to run a worker under another host name")
    a = nfs.mount("a", entry_ttl=1.0, attr_ttl=1.0)
    b = nfs.mount("b", entry_ttl=10.0, attr_ttl=10.0)
    side = project / "executions.log"
    grid_a = make_grid(a, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "lease_s": 2,
                           "grid": {"duration": [10.0, 0.0]}, "fixed": {"record_to": str(side)}})
    grid_b = b / grid_a.relative_to(a)
    owner = _spawn(reaper, _in_another_host("othernode", worker_cmd(grid_a, "--no-steal", "--max-rows", "1")),
                   project / "owner.log")
    assert wait_until(lambda: any(event == "start" for event, _ in events(side)), 60)
    (beat,) = (grid_b / "workers").glob("othernode*.hb")  # client b now caches its attributes
    looked = os.stat(beat).st_mtime
    time.sleep(2.5)
    assert os.stat(beat).st_mtime == looked, "client b should still answer stat from its attribute cache"
    thief = _spawn(reaper, worker_cmd(grid_b), project / "thief.log")
    assert thief.wait(timeout=120) == 0, (project / "thief.log").read_text()[-3000:]
    assert owner.wait(timeout=120) == 0, (project / "owner.log").read_text()[-3000:]
    starts = [n for (event, _), n in events(side).items() if event == "start"]
    assert sorted(starts) == [1, 1], f"a row ran twice: {events(side)}"
    final = rows(grid_a)
    assert {r["status"] for r in final.values()} == {"done"}
    assert sorted(r["worker"].split(":")[0] for r in final.values()) == sorted(["othernode", HOST])
