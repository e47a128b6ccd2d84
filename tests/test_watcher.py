"""The watcher without Slurm: the local supervisor's duty, the state that workers read, the fallback
when compute nodes cannot submit, and the scan that decides how many workers to launch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gridrunner import watcher as watching
from gridrunner.store import HOST, GridStore, mark_changed, now_iso
from gridrunner.submit import submissions, submit, wait
from gridrunner.worker import Worker
from gridtools import events, make_grid, start_worker, wait_until
from test_worker import rows_by


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    return tmp_path


def worker_pids(grid) -> set[int]:
    """Pids of the `gridrunner work` processes of this grid that run now."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if b"work" in argv and str(grid).encode() in argv:
            pids.add(int(entry))
    return pids


@pytest.mark.timeout(120)
def test_local_gpu_workers_exit_when_done_and_the_supervisor_replaces_a_killed_one(project):
    side = project / "side.log"
    # resources.gpus: the workers do not linger and the local supervisor keeps the watcher's duty.
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "max_len": 4,
                               "cost": "duration", "resources": {"gpus": 1}, "lease_s": 600,
                               "grid": [{"i": [0], "duration": [8]}, {"i": list(range(1, 8)), "duration": [0.1]}],
                               "fixed": {"record_to": str(side)}})
    long_id = next(row_id for row_id, row in rows_by(grid).items() if row["duration"] == "8")
    submit(grid, 2, executor="local")
    (entry,) = submissions(grid)
    assert entry["watch"] is True

    # The short rows end; their worker exits while the long row still runs.
    assert wait_until(lambda: sum(r["status"] == "done" for r in rows_by(grid).values()) == 7, 60, interval_s=0.1)
    assert wait_until(lambda: len(worker_pids(grid)) == 1, 10, interval_s=0.1), worker_pids(grid)
    assert watching.on_duty(grid)
    holder = rows_by(grid)[long_id]["worker"]
    assert rows_by(grid)[long_id]["status"] == "running"

    os.kill(int(holder.split(":")[1]), signal.SIGKILL)  # the row's worker dies; its pid is gone at once

    assert wait_until(lambda: rows_by(grid)[long_id]["worker"] not in ("", holder), 30, interval_s=0.1)
    assert rows_by(grid)[long_id]["attempts"] == "2"
    assert wait(grid, poll_s=0.2)  # the supervisor ends once the grid is finished
    row = rows_by(grid)[long_id]
    assert row["status"] == "done", row
    assert events(side)[("start", long_id)] == 2 and events(side)[("finish", long_id)] == 1
    state = watching.read_state(grid)
    assert (state["state"], state["launched"]) == ("finished", 1)
    assert not worker_pids(grid)


def test_workers_linger_while_no_watcher_is_on_duty_and_exit_when_one_is(project):
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"],
                               "grid": {"i": [0, 1], "duration": [8]}})
    holder = start_worker(grid, "--max-rows", "1")
    assert wait_until(lambda: "running" in [r["status"] for r in rows_by(grid).values()], 30)
    watched = Worker(grid, linger="watched", handle_signals=False, max_rows=1)
    assert watched._lingers()  # no watcher ever ran
    watching.write_state(grid, state="watching", job="1", host=HOST, pid=os.getpid())
    assert not watched._lingers()
    os.utime(watching.state_path(grid), (time.time() - watching.STALE_S - 1,) * 2)
    assert watched._lingers()  # its watcher was killed without a word
    watching.write_state(grid, state="no-sbatch", reason="sbatch is not on this node's PATH")
    assert watched._lingers()
    assert watching.summary(grid)["state"] == "no-sbatch"
    holder.kill()
    holder.wait()


def test_a_node_that_cannot_run_sbatch_leaves_the_workers_lingering_with_a_warning(project, tmp_path):
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "grid": {"i": [0]}})
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Submissions from "
                                 "compute nodes are not allowed' >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    code = ("import sys; from gridrunner.watcher import WatcherJob; "
            f"print(WatcherJob({str(grid)!r}, 2, {{'partition': 'gpu'}})())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert "this node cannot submit jobs (sbatch --test-only exited 1: sbatch: error: Batch job submission failed: " \
           "Submissions from compute nodes are not allowed): no watcher; workers linger" in done.stderr
    state = watching.read_state(grid)
    assert state["state"] == "no-sbatch" and not watching.on_duty(grid)
    assert Worker(grid, linger="watched", handle_signals=False)._lingers()


# --------------------------------------------------------------------------- the scan, on generated grids

class Counting:
    """A launcher that launches nothing and counts: what the watcher would have started."""

    def __init__(self, coming: int = 0, live: int | None = None):
        self.n_coming = coming
        self.n_live = live
        self.launches = []

    def queue(self):
        return None

    def refresh(self):
        pass

    def live(self, queue):
        return self.n_live  # None: unknown, every change is looked at

    def coming(self, holders, queue):
        return self.n_coming

    def launch(self, n, homes):
        self.launches.append((n, list(homes)))
        return [f"w{i}" for i in range(n)]

    def cancel(self, ids):
        pass


ROW = st.sampled_from(["not_run", "done", "failed", "running-alive", "running-dead"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shards=st.lists(st.lists(ROW, min_size=1, max_size=6), min_size=1, max_size=5),
       array_size=st.integers(1, 6), coming=st.integers(0, 3))
def test_the_scan_counts_claimable_rows_and_launches_for_them_up_to_the_array_size(tmp_path_factory, shards,
                                                                                    array_size, coming):
    project = tmp_path_factory.mktemp("scan")
    flat = [state for shard in shards for state in shard]
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "max_len": 6,
                               "grid": {"i": list(range(len(flat)))}})
    store = GridStore(grid)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        # Deal the generated states into the made rows, shard by shard, as hand edits would.
        states = iter(flat)
        expected_homes = []
        layout = []
        for path in store.shard_paths():
            with store.transaction(path) as shard:
                p = shard.n_params
                open_rows = 0
                for fields in shard.records:
                    state = next(states)
                    if state.startswith("running"):
                        pid = alive.pid if state == "running-alive" else dead.pid
                        fields[p + 1], fields[p + 3], fields[p + 4] = "running", f"{HOST}:{pid}", now_iso()
                        fields[p + 2] = "1"
                    else:
                        fields[p + 1] = state
                    open_rows += state in ("not_run", "running-dead")
                shard.dirty = True
            layout.append(open_rows)
            if open_rows:
                expected_homes.append((open_rows, int(path.stem.split("-")[1])))
        launcher = Counting(coming)
        watcher = watching.Watcher(grid, array_size, launcher, lease_s=600)
        scan = watcher.scan()
        n_open = flat.count("not_run") + flat.count("running-dead")
        assert (scan.not_run, scan.reclaimable, scan.running) == (flat.count("not_run"), flat.count("running-dead"),
                                                                  flat.count("running-alive"))
        assert scan.finished == (n_open == 0 and "running-alive" not in flat)
        assert sorted(scan.homes) == sorted(index for _, index in expected_homes)
        assert [layout[i] for i in scan.homes] == sorted((n for n, _ in expected_homes), reverse=True)
        assert watcher._launch(scan) is None
        busy = 1 if "running-alive" in flat else 0
        want = min(n_open, array_size - busy) - coming
        assert launcher.launches == ([(want, scan.homes)] if want > 0 else [])
    finally:
        alive.kill()
        alive.wait()


def test_an_idle_watcher_reads_no_shard_until_the_change_file_is_touched(project):
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "max_len": 1,
                               "grid": {"i": list(range(6))}})
    store = GridStore(grid)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for path in store.shard_paths():  # every row runs in a live worker: nothing to claim, nothing finished
            with store.transaction(path) as shard:
                p = shard.n_params
                shard.records[0][p + 1], shard.records[0][p + 3] = "running", f"{HOST}:{alive.pid}"
                shard.records[0][p + 4] = now_iso()
                shard.dirty = True
        launcher = Counting()
        watcher = watching.Watcher(grid, 2, launcher, lease_s=600, tick_s=0.05)
        import threading

        thread = threading.Thread(target=watcher.run)
        thread.start()
        assert wait_until(lambda: watcher.scans == 1, 10)
        time.sleep(1.0)  # 20 ticks
        assert watcher.scans == 1 and not launcher.launches
        mark_changed(grid)
        assert wait_until(lambda: watcher.scans == 2, 5)
        alive.kill()
        alive.wait()  # the holders' pid is gone: their rows are claimable, without any shard changing
        assert wait_until(lambda: launcher.launches, 5)
        assert launcher.launches == [(2, [0, 1, 2, 3, 4, 5])]
        watcher.request_stop()
        thread.join(timeout=10)
        assert watching.read_state(grid)["state"] == "ended"
    finally:
        alive.kill()
        alive.wait()


def test_a_watcher_reads_no_shard_while_the_whole_array_runs_and_scans_when_a_task_leaves(project):
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "max_len": 1,
                               "grid": {"i": list(range(4))}})
    import threading

    launcher = Counting(coming=2, live=2)  # both tasks of a 2-task array pending or running
    watcher = watching.Watcher(grid, 2, launcher, lease_s=600, tick_s=0.05)
    thread = threading.Thread(target=watcher.run)
    thread.start()
    try:
        assert wait_until(lambda: watcher.scans == 1, 10)
        for _ in range(5):  # a busy grid: its change file changes with every row
            mark_changed(grid)
            time.sleep(0.1)
        assert watcher.scans == 1 and not launcher.launches
        launcher.n_live, launcher.n_coming = 1, 1  # one task ended: the rows may need a replacement
        assert wait_until(lambda: watcher.scans == 2, 5)
        assert launcher.launches == [(1, [0, 1, 2, 3])]
    finally:
        watcher.request_stop()
        thread.join(timeout=10)
