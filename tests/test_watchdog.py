"""Hung and runaway rows through the real worker: `hang_after_min` kills a row that stopped logging (the clock
starts at its first ctx.log), `row_time_limit_min` stops a row that runs too long, keeps its checkpoint, and a
`reset` resumes it there."""
import time

import pytest
from click.testing import CliRunner

from gridrunner.cli import main
from gridrunner.errors import SpecError
from gridrunner.spec import validate
from gridrunner.status import grid_status, stopped_counts
from gridrunner.watchdog import RowWatchdog, last_step
from gridrunner.worker import Worker
from gridtools import events, make_grid
from test_worker import rows_by

STEPS = "gridrunner.tasks.toy:steps"


def grid_of(tmp_path, grid, name="g", **keys):
    fixed = {"steps": 20, "step_s": 0.01, "checkpoint_every": 5, "record_to": str(tmp_path / "events")}
    fixed.update(keys.pop("fixed", {}))
    return make_grid(tmp_path, {"task": STEPS, "outcomes": ["final_step"], "grid": grid, "fixed": fixed, **keys},
                     name=name)


def test_a_row_that_stops_logging_is_killed_and_fails_as_hung_with_its_last_step(tmp_path):
    # 0.01 min = 0.6 s without a log.
    grid = grid_of(tmp_path, {"hang_at": [3, None]}, hang_after_min=0.01)
    started = time.monotonic()
    summary = Worker(grid, handle_signals=False).run()
    assert time.monotonic() - started < 30
    rows = {r["hang_at"]: r for r in rows_by(grid).values()}
    assert (summary.done, summary.failed) == (1, 1)
    assert rows["3"]["status"] == "failed"
    assert rows["3"]["error"] == "Hung: no progress for 0.01 min (last step 3)"
    assert 0.6 <= float(rows["3"]["runtime_s"]) < 10
    assert rows["null"]["status"] == "done"
    assert stopped_counts(grid_status(grid))["hung"] == 1


def test_regression_a_row_that_logs_at_once_and_then_hangs_is_killed_too(tmp_path, monkeypatch):
    """The hang clock's first look at history.jsonl came after the row's process started; a row that logged
    before that look never changed the file again, so its clock never started (3 of 6 such rows ran on)."""
    (tmp_path / "logs_at_once.py").write_text(
        "import time\n"
        "def run(params, ctx):\n"
        "    ctx.log(0, val=1.0)  # the first thing the row does\n"
        "    time.sleep(30)\n"
        "    return {'final_step': 0.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    grid = make_grid(tmp_path, {"task": "logs_at_once:run", "outcomes": ["final_step"],
                                "grid": {"copy": list(range(6))}, "hang_after_min": 0.01})
    summary = Worker(grid, handle_signals=False).run()
    rows = list(rows_by(grid).values())
    assert summary.failed == 6
    assert {r["error"] for r in rows} == {"Hung: no progress for 0.01 min (last step 0)"}
    assert all(float(r["runtime_s"]) < 10 for r in rows)


def test_a_slow_start_up_is_never_a_hang(tmp_path):
    # 3 s before the first log, against a hang time of 1.2 s: the clock only starts at the first ctx.log.
    grid = grid_of(tmp_path, {"startup_s": [3.0]}, hang_after_min=0.02)
    Worker(grid, handle_signals=False).run()
    (row,) = rows_by(grid).values()
    assert row["status"] == "done", row["error"]


def test_a_row_resumed_with_an_old_history_gets_no_hang_until_it_logs_again(tmp_path):
    grid = grid_of(tmp_path, {"startup_s": [3.0]}, hang_after_min=0.02)
    (row,) = rows_by(grid).values()
    history = grid / "rows" / row["row_id"] / "history.jsonl"
    history.parent.mkdir(parents=True)
    history.write_text('{"step": 1, "time": 0}\n')  # from an earlier attempt, long ago
    Worker(grid, handle_signals=False).run()
    assert rows_by(grid)[row["row_id"]]["status"] == "done"


def test_a_row_past_its_time_limit_stops_with_its_checkpoint_and_a_reset_resumes_it(tmp_path):
    # 0.02 min = 1.2 s; 400 steps of 10 ms need 4 s or more.
    grid = grid_of(tmp_path, {"depth": [1]}, row_time_limit_min="0.02 * depth",
                   fixed={"steps": 400, "step_s": 0.01, "checkpoint_every": 1000})
    summary = Worker(grid, handle_signals=False, grace_s=5).run()
    (row,) = rows_by(grid).values()
    assert summary.failed == 1 and summary.given_back == 0
    assert row["status"] == "failed" and row["error"].startswith("TimeLimit: ran past its limit of 0.02 min (last step ")
    assert row["error"].endswith("); checkpoint kept")
    saved = int((grid / "rows" / row["row_id"] / "checkpoint" / "step").read_text())
    logged = int(row["error"].split("(last step ")[1].split(")")[0])  # when the limit ran out
    assert 0 < logged <= saved < 400  # it saved at its next look at should_stop()
    assert 1.2 <= float(row["runtime_s"]) < 10
    assert stopped_counts(grid_status(grid))["time_limit"] == 1

    result = CliRunner().invoke(main, ["reset", "--grid", str(grid)])
    assert result.exit_code == 0 and "reset 1 row(s)" in result.output
    Worker(grid, handle_signals=False, grace_s=5).run()
    assert events(tmp_path / "events")[(f"start@{saved}", row["row_id"])] == 1  # resumed from its checkpoint


def test_a_row_that_ignores_the_time_limit_stop_is_killed_after_the_grace_time(tmp_path):
    grid = grid_of(tmp_path, {"ignore_stop": [True]}, row_time_limit_min=0.01,
                   fixed={"steps": 100000, "step_s": 0.01})
    started = time.monotonic()
    Worker(grid, handle_signals=False, grace_s=0.5).run()
    assert time.monotonic() - started < 30
    (row,) = rows_by(grid).values()
    assert row["status"] == "failed" and row["error"].startswith("TimeLimit: ran past its limit of 0.01 min")


def test_a_row_that_finishes_within_its_limit_is_done_and_a_missing_parameter_means_no_limit(tmp_path):
    grid = grid_of(tmp_path, [{"depth": [100]}, {"other": [1]}], row_time_limit_min="depth")
    summary = Worker(grid, handle_signals=False).run()
    assert (summary.done, summary.failed) == (2, 0)


def test_a_time_limit_that_is_not_a_positive_number_for_a_row_fails_that_row_before_it_runs(tmp_path):
    grid = grid_of(tmp_path, {"depth": [1, 0]}, row_time_limit_min="depth - 0.5")
    Worker(grid, handle_signals=False).run()
    rows = {r["depth"]: r for r in rows_by(grid).values()}
    assert rows["1"]["status"] == "done"
    assert rows["0"]["status"] == "failed"
    assert rows["0"]["error"] == ("RuleError: row_time_limit_min 'depth - 0.5' is -0.5 for this row; expected a "
                                  "positive number of minutes")
    assert events(tmp_path / "events")[("start@0", rows["0"]["row_id"])] == 0


BASE = {"task": STEPS, "outcomes": ["final_step"], "grid": {"depth": [1]}, "fixed": {"steps": 5}}


@pytest.mark.parametrize("key, value, words", [
    ("hang_after_min", 0, "expected a positive number of minutes"),
    ("hang_after_min", "soon", "expected a positive number of minutes"),
    ("hang_after_min", True, "expected a positive number of minutes"),
    ("row_time_limit_min", -1, "expected a positive number of minutes or a rule"),
    ("row_time_limit_min", [3], "expected a positive number of minutes or a rule"),
    ("row_time_limit_min", "2 * dpeth", "unknown parameter 'dpeth'"),
    ("row_time_limit_min", "2 *", "expected a number"),
])
def test_make_refuses_bad_hang_and_time_limit_settings(key, value, words):
    with pytest.raises(SpecError, match=f"at key {key}") as err:
        validate({**BASE, key: value}, check_task=False)
    assert words in str(err.value)


def test_the_settings_are_saved_with_the_grid_and_read_back(tmp_path):
    grid = grid_of(tmp_path, {"depth": [1]}, hang_after_min=30, row_time_limit_min="2 * depth + steps",
                   prune="step > 3 and loss > 1")
    spec = Worker(grid, handle_signals=False).spec
    assert (spec.hang_after_min, spec.row_time_limit_min, spec.prune) == (30.0, "2 * depth + steps",
                                                                         ["step > 3 and loss > 1"])
    assert spec.time_limit()({"depth": 1, "steps": 5}) == (7.0, None)


def test_the_watchdog_fires_the_time_limit_once_and_nothing_after_clear(tmp_path):
    fired = []
    dog = RowWatchdog(on_hang=lambda: fired.append("hang"), on_limit=lambda: fired.append("limit"))
    dog.watch(tmp_path / "history.jsonl", hang_s=None, limit_s=0.1)
    time.sleep(0.5)
    assert fired == ["limit"]
    dog.watch(tmp_path / "history.jsonl", hang_s=0.2, limit_s=None)
    dog.clear()
    (tmp_path / "history.jsonl").write_text('{"step": 1}\n')
    time.sleep(0.5)
    dog.close()
    assert fired == ["limit"]
    assert last_step(tmp_path / "history.jsonl") == 1 and last_step(tmp_path / "none") is None
