"""Never silently dropped: every way a row can fail ends in a ``failed`` row that says why.

A task that raises, dies, returns a bad outcome or matches the failure rule, a failure rule that
cannot be evaluated on the row, and a row whose workers keep dying: each becomes ``failed`` with its
reason in the ``error`` cell (one line, never a formula), and ``gridrunner status`` counts it by kind.
A stopped row (SIGTERM, a time limit) is not a failure: it goes back to ``not_run`` and is finished
later (tests/test_worker.py::test_sigterm_gives_the_row_back_with_its_checkpoint_and_the_next_worker_resumes).
"""
import signal
import subprocess

from gridrunner.store import HOST
from gridrunner.worker import Worker
from gridtools import make_grid, wait_until, worker_cmd
from reliability_tools import cli, executions, rows

RULE = "mark == 'fires' or (mark == 'breaks' and log(value - 1) < 0)"


def test_every_way_a_task_can_fail_is_recorded_with_its_reason(project):
    grid = make_grid(project, {"task": "reliability_tasks:fail", "outcomes": ["value"], "failure": RULE, "grid": {
        "case": [{"kind": "metric", "message": "value", "mark": "ok"},
                 {"kind": "metric", "message": "value", "mark": "fires"},
                 {"kind": "metric", "message": "value", "mark": "breaks"},
                 {"kind": "metric", "message": "other", "mark": "ok"},
                 {"kind": "RuntimeError", "message": "=cmd|' /C calc'!A0", "mark": "ok"},
                 {"kind": "Bad Type", "message": "first line\nsecond line", "mark": "ok"},
                 {"kind": "=Evil", "message": "", "mark": "ok"}]}})
    crashes = make_grid(project, {"task": "gridrunner.tasks.toy:crash", "outcomes": ["value"],
                                  "grid": {"mode": ["segfault", "exit", "nan", "none"]}}, name="crashes")
    for path in (grid, crashes):
        summary = Worker(path, handle_signals=False).run()
        assert summary.error is None and summary.done + summary.failed == len(rows(path))

    ended = {(r["kind"], r["message"], r["mark"]): (r["status"], r["error"]) for r in rows(grid).values()}
    assert ended == {
        ("metric", "value", "ok"): ("done", ""),
        ("metric", "value", "fires"): ("failed", f"rule: {RULE}"),
        ("metric", "value", "breaks"): ("failed", f"RuleError: log() failed: math domain error in {RULE!r}"),
        ("metric", "other", "ok"): ("failed", "MissingMetric: the task returned no 'value' (it returned other)"),
        ("RuntimeError", '"=cmd|\' /C calc\'!A0"', "ok"): ("failed", "RuntimeError: =cmd|' /C calc'!A0"),
        ("Bad Type", '"first line\\nsecond line"', "ok"): ("failed", "Bad Type: first line"),
        ('"=Evil"', '""', "ok"): ("failed", "'=Evil"),
    }
    assert {r["mode"]: (r["status"], r["error"]) for r in rows(crashes).values()} == {
        "segfault": ("failed", "TaskDied: the task process was killed by SIGSEGV"),
        "exit": ("failed", "TaskDied: the task process exited with code 3 without a result"),
        "nan": ("failed", "NonFiniteMetric: value is nan"),
        "none": ("failed", "TypeError: the task must return a dict of metrics, got NoneType"),
    }
    # An exception leaves its traceback beside the row.
    raised = [r for r in rows(grid).values() if r["kind"] == "RuntimeError"][0]
    assert "RuntimeError: =cmd|' /C calc'!A0" in (grid / "rows" / raised["row_id"] / "traceback.txt").read_text()
    result = cli("status", "--grid", str(grid))
    assert result.returncode == 0
    assert "failures by kind: rule 1, RuleError 1, MissingMetric 1, RuntimeError 1, Bad Type 1, '=Evil 1" \
        in result.stdout.replace("\n", " ")


def test_a_row_whose_workers_keep_dying_fails_with_the_reason(project, reaper):
    side = project / "executions.log"
    grid = make_grid(project, {"task": "reliability_tasks:run", "outcomes": ["token", "value"], "max_attempts": 2,
                               "grid": {"i": [0]}, "fixed": {"record_to": str(side), "duration": 60}})
    killed = []
    for attempt in (1, 2):
        worker = reaper(subprocess.Popen(worker_cmd(grid), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert wait_until(lambda: len(executions(side)) == attempt, 30)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        killed.append(worker.pid)
    result = cli("work", "--grid", str(grid), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "shard-000.csv: 1 row(s) failed after their workers died 2 times" in result.stderr
    (row,) = rows(grid).values()
    assert (row["status"], row["attempts"], row["error"]) == (
        "failed", "2", f"WorkerDied: the worker died 2 times running this row (last: {HOST}:{killed[-1]}); "
                       f"max_attempts is 2")
