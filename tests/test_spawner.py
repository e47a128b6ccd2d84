"""The row spawner with real processes: a fresh process per row, forked by the spawner, never the worker;
heavy task modules stay out of it; a spawner that dies costs the running row and nothing else."""
import json
import os
import signal
import sys
import threading

import pytest

from gridrunner.errors import GridError
from gridrunner.spawner import Spawner, SpawnerDied
from gridrunner.store import GridStore, pid_alive
from gridrunner.worker import Worker
from gridtools import events, make_grid, wait_until


def request(tmp_path, row_id: str, **params) -> dict:
    return {"task": "gridrunner.tasks.toy:sleep", "params": params, "row_dir": str(tmp_path / "rows" / row_id),
            "row_id": row_id, "seed": 1, "grid_dir": str(tmp_path), "stopped": False}


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[1])


def test_every_row_runs_in_a_new_process_forked_by_the_spawner_not_the_worker(tmp_path):
    side = tmp_path / "executions.log"
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "grid": {"i": list(range(20))},
                                "fixed": {"record_to": str(side)}})
    worker = Worker(grid, handle_signals=False)
    parents = set()
    original = Spawner.begin

    def begin(self, req):
        pid = original(self, req)
        try:
            parents.add((parent_of(pid), self.proc.pid))
        except FileNotFoundError:
            pass  # the no-op row has ended already
        return pid

    Spawner.begin = begin
    try:
        summary = worker.run()
    finally:
        Spawner.begin = original
    assert summary.done == 20
    pids = [int(line.split()[2]) for line in side.read_text().splitlines() if line.startswith("start ")]
    assert len(pids) == 20 and len(set(pids)) == 20 and os.getpid() not in pids
    assert parents and all(parent == spawner for parent, spawner in parents)
    assert worker._spawner is None  # closed and reaped when the worker ended


def test_a_light_task_module_is_imported_once_in_the_spawner_a_heavy_one_in_every_row(tmp_path, monkeypatch):
    # Each module writes the pid of every process that imports it. The heavy one imports a stand-in for
    # TensorFlow (a package named like one of HEAVY_MODULES). Both are found through the worker's sys.path
    # only: the spawner gets that path from the worker, not from the environment.
    log = tmp_path / "imports.log"
    record = f"import os\nwith open({str(log)!r}, 'a') as fh:\n    fh.write(f'{{__name__}} {{os.getpid()}}\\n')\n"
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "lighttask.py").write_text(record + "def run(params, ctx):\n    return {'value': 1.0}\n")
    (tmp_path / "heavytask.py").write_text("import torch\n" + record + "def run(params, ctx):\n    return {'value': 2.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imports = {}
    for task in ("lighttask:run", "heavytask:run"):
        spawner = Spawner(task)
        try:
            spawner.start()
            rows = []
            for k in range(2):
                rows.append(spawner.begin({**request(tmp_path, f"{task}-{k}"), "task": task}))
                assert json.loads(spawner.end()["payload"])["metrics"]["value"] in (1.0, 2.0)
            imports[task] = (spawner.preloaded, spawner.proc.pid, rows)
        finally:
            spawner.close()
    by_module = {}
    for line in log.read_text().splitlines():
        module, pid = line.split()
        by_module.setdefault(module, []).append(int(pid))
    preloaded, spawner_pid, rows = imports["lighttask:run"]
    assert preloaded and spawner_pid in by_module["lighttask"] and not set(rows) & set(by_module["lighttask"])
    assert len(by_module["lighttask"]) == 2  # the throwaway process that looked at it, then the spawner
    preloaded, spawner_pid, rows = imports["heavytask:run"]
    assert not preloaded and spawner_pid not in by_module["heavytask"] and set(rows) <= set(by_module["heavytask"])


def test_a_spawner_killed_while_a_row_runs_costs_that_row_and_the_worker_goes_on(tmp_path):
    side = tmp_path / "executions.log"
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "max_len": 10,
                                "grid": {"duration": [30.0, 0.0]}, "fixed": {"record_to": str(side)}})
    worker = Worker(grid, handle_signals=False, steal=False)
    summary = {}
    thread = threading.Thread(target=lambda: summary.update(s=worker.run()))
    thread.start()
    try:
        assert wait_until(lambda: any(e == "start" for e, _ in events(side)), 30)
        row_pid = int(side.read_text().split()[2])
        os.kill(worker._spawner.proc.pid, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(row_pid), 10), "the row's process outlived its spawner"
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        worker.request_stop()
        thread.join(timeout=60)
    assert (summary["s"].done, summary["s"].failed) == (1, 1)
    store = GridStore(grid)
    (shard,) = [store.read(p) for p in store.shard_paths()]
    rows = [dict(zip(shard.header, shard.records[i])) for i in shard.valid()]
    by_duration = {float(r["duration"]): r for r in rows}
    assert by_duration[30.0]["status"] == "failed"
    assert by_duration[30.0]["error"] == ("TaskDied: the process that forks the rows died (killed by SIGKILL) while "
                                          "the row ran (its process dies with it)")
    assert by_duration[0.0]["status"] == "done"  # a new spawner ran the next row


def test_a_row_whose_directories_cannot_be_made_fails_with_the_reason_and_the_spawner_goes_on(tmp_path):
    (tmp_path / "a-file").write_text("")
    spawner = Spawner("gridrunner.tasks.toy:steps")
    try:
        bad = {**request(tmp_path, "r1", steps=2, step_s=0.0), "task": "gridrunner.tasks.toy:steps",
               "row_dir": str(tmp_path / "a-file" / "r1")}
        assert spawner.begin(bad) > 0
        payload = json.loads(spawner.end()["payload"])
        assert payload["error"].startswith("NotADirectoryError: [Errno 20] Not a directory:")
        assert spawner.begin({**request(tmp_path, "r2", steps=2, step_s=0.0), "task": "gridrunner.tasks.toy:steps"}) > 0
        ended = spawner.end()
        assert ended["code"] == 0 and ended["signal"] is None
        assert json.loads(ended["payload"])["metrics"]["final_step"] == 2.0
    finally:
        spawner.close()


def test_a_row_that_writes_nothing_leaves_no_directory(tmp_path):
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "grid": {"i": [1, 2]}})
    assert Worker(grid, handle_signals=False).run().done == 2
    assert not (grid / "rows").exists() or not list((grid / "rows").iterdir())


def test_a_spawner_that_cannot_start_is_one_clear_error_before_any_row_is_claimed(tmp_path, monkeypatch):
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "grid": {"i": [1, 2]}})
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(GridError, match=r"cannot start the process that forks the rows .*no-such-python.*"
                                        r"`gridrunner work --inline` runs rows without it"):
        Worker(grid, handle_signals=False).run()
    store = GridStore(grid)
    (shard,) = [store.read(p) for p in store.shard_paths()]
    assert [shard.records[i][shard.header.index("status")] for i in shard.valid()] == ["not_run", "not_run"]


def test_a_closed_spawner_is_reported_as_died():
    spawner = Spawner("gridrunner.tasks.toy:noop")
    with pytest.raises(SpawnerDied):
        spawner.end()


def test_a_stop_signal_that_reaches_a_row_as_its_process_starts_is_never_lost(tmp_path):
    # The handlers are the spawner's, inherited at the fork, and the row's context is set before it: a
    # SIGUSR1 sent the moment the pid is known makes should_stop() true instead of killing the process.
    spawner = Spawner("gridrunner.tasks.toy:steps")
    try:
        for k in range(30):
            req = {**request(tmp_path, f"r{k}", steps=100, step_s=0.01), "task": "gridrunner.tasks.toy:steps"}
            os.kill(spawner.begin(req), signal.SIGUSR1)
            ended = spawner.end()
            assert json.loads(ended["payload"]) == {"interrupted": True}, (k, ended)
            assert int((tmp_path / "rows" / f"r{k}" / "checkpoint" / "step").read_text()) < 100
    finally:
        spawner.close()


LINGERING = '''
import os, subprocess, sys, time
def run(params, ctx):
    pids = ctx.row_dir / "children"
    if params["how"] == "fork":
        pid = os.fork()
        if pid == 0:  # a child that inherits the row's pipe to the spawner, and outlives the task
            time.sleep(60)
            os._exit(0)
    else:
        pid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid
    pids.write_text(str(pid))
    return {"value": 1.0}
'''


@pytest.mark.parametrize("how", ["fork", "popen"])
def test_regression_a_child_the_task_leaves_running_neither_holds_the_row_nor_outlives_it(tmp_path, monkeypatch,
                                                                                          how):
    """A forked child holds the write end of the row's result pipe: the worker waited for it to exit (60 s
    here) before it recorded the row. Now the row ends when its process does, and what is left of the row's
    process group is killed then."""
    (tmp_path / "lingering.py").write_text(LINGERING)
    monkeypatch.syspath_prepend(str(tmp_path))
    grid = make_grid(tmp_path, {"task": "lingering:run", "outcomes": ["value"], "grid": {"how": [how]}})
    worker = Worker(grid, handle_signals=False)
    summary = worker.run()
    assert summary.done == 1
    (row_id,) = summary.rows
    child = int((grid / "rows" / row_id / "children").read_text())
    assert summary.elapsed_s < 30
    assert wait_until(lambda: not pid_alive(child), 10)
