"""Prune rules through the real worker and spawner: a matching record stops the row, which ends failed with
`Pruned: <rule> at step <n>` and is never run again; the rule is checked at make; replay-prune on a finished grid."""
import json
import time

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridrunner.cli import main
from gridrunner.context import Context
from gridrunner.errors import ExprError, SpecError
from gridrunner.prune import PruneWatch, check_rule, message, parse_payload, replay
from gridrunner.spec import BOOK_COLUMNS, validate
from gridrunner.status import grid_status, stopped_counts
from gridrunner.worker import Worker
from gridtools import events, make_grid
from test_worker import rows_by

STEPS = "gridrunner.tasks.toy:steps"


def steps_grid(tmp_path, prune, grid=None, name="g", **fixed):
    spec = {"task": STEPS, "outcomes": ["final_step"],
            "grid": grid or {"plateau": [0.0, 0.5]},
            "fixed": {"steps": 20, "step_s": 0.01, "checkpoint_every": 5, "record_to": str(tmp_path / "events"),
                      **fixed}}
    if prune is not None:
        spec["prune"] = prune
    return make_grid(tmp_path, spec, name=name)


def history_of(grid, row_id):
    return [json.loads(line) for line in (grid / "rows" / row_id / "history.jsonl").read_text().splitlines()]


def by_plateau(grid):
    return {float(r["plateau"]): r for r in rows_by(grid).values()}


def test_a_matching_rule_stops_the_row_which_checkpoints_and_fails_with_the_rule_and_step(tmp_path):
    grid = steps_grid(tmp_path, "step >= 4 and loss > 0.3")
    summary = Worker(grid, handle_signals=False, grace_s=5).run()
    assert (summary.done, summary.failed, summary.given_back) == (1, 1, 0)
    rows = by_plateau(grid)
    assert rows[0.0]["status"] == "done" and rows[0.0]["error"] == ""
    assert rows[0.5]["status"] == "failed"
    assert rows[0.5]["error"] == "Pruned: step >= 4 and loss > 0.3 at step 4"
    pruned_id = rows[0.5]["row_id"]
    # It stopped as a worker stop stops a row: at the next should_stop(), after saving its checkpoint.
    assert events(tmp_path / "events")[(f"interrupted@4", pruned_id)] == 1
    assert (grid / "rows" / pruned_id / "checkpoint" / "step").read_text() == "4"
    history = history_of(grid, pruned_id)
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    # Not rerun: a second worker finds nothing to claim.
    again = Worker(grid, handle_signals=False).run()
    assert (again.done, again.failed, again.rows) == (0, 0, [])
    assert events(tmp_path / "events")[(f"start@0", pruned_id)] == 1


def test_a_task_that_ignores_the_stop_is_killed_after_the_grace_time_with_the_same_ending(tmp_path):
    grid = steps_grid(tmp_path, ["step >= 3 and loss > 0.3"], grid={"plateau": [0.5]}, steps=100000, step_s=0.01,
                      ignore_stop=True)
    started = time.monotonic()
    summary = Worker(grid, handle_signals=False, grace_s=0.5).run()
    took = time.monotonic() - started
    (row,) = rows_by(grid).values()
    assert (summary.failed, row["status"]) == (1, "failed")
    assert row["error"] == "Pruned: step >= 3 and loss > 0.3 at step 3"
    assert took < 20  # 100,000 steps would take over 1,000 s
    assert events(tmp_path / "events")[("finish", row["row_id"])] == 0


def test_a_task_that_ignores_the_stop_but_finishes_within_the_grace_is_still_pruned(tmp_path):
    grid = steps_grid(tmp_path, "step >= 3 and loss > 0.3", grid={"plateau": [0.5]}, ignore_stop=True)
    Worker(grid, handle_signals=False, grace_s=30).run()
    (row,) = rows_by(grid).values()
    assert row["status"] == "failed" and row["error"] == "Pruned: step >= 3 and loss > 0.3 at step 3"


def test_inline_rows_are_pruned_too(tmp_path):
    grid = steps_grid(tmp_path, "step >= 4 and loss > 0.3")
    Worker(grid, handle_signals=False, inline=True).run()
    rows = by_plateau(grid)
    assert rows[0.5]["error"] == "Pruned: step >= 4 and loss > 0.3 at step 4" and rows[0.0]["status"] == "done"


def test_the_first_rule_of_a_list_that_matches_names_the_prune_and_parameters_can_join_a_rule(tmp_path):
    grid = steps_grid(tmp_path, ["step >= 6 and loss > 0.3", "plateau > 0 and step >= 2"])
    Worker(grid, handle_signals=False).run()
    assert by_plateau(grid)[0.5]["error"] == "Pruned: plateau > 0 and step >= 2 at step 2"


def test_a_rule_that_cannot_be_evaluated_or_lacks_its_metric_never_prunes_and_crashes_nothing(tmp_path):
    grid = steps_grid(tmp_path, ["log(loss - 1) > 0", "val_ssim < 0.3", "len(loss) > 0"])
    summary = Worker(grid, handle_signals=False).run()
    assert (summary.done, summary.failed) == (2, 0)
    assert all(r["status"] == "done" for r in rows_by(grid).values())


def test_status_counts_pruned_hung_and_time_limited_rows(tmp_path):
    grid = steps_grid(tmp_path, "step >= 4 and loss > 0.3")
    Worker(grid, handle_signals=False).run()
    status = grid_status(grid)
    assert stopped_counts(status) == {"pruned": 1, "hung": 0, "time_limit": 0}
    result = CliRunner().invoke(main, ["status", "--grid", str(grid)])
    assert result.exit_code == 0 and "1 pruned, 0 hung, 0 past their time limit" in result.output
    result = CliRunner().invoke(main, ["status", "--grid", str(grid), "--json"])
    assert json.loads(result.output)["failures"]["stopped"] == {"pruned": 1, "hung": 0, "time_limit": 0}


# ---------------------------------------------------------------- make checks the rule

BASE = {"task": STEPS, "outcomes": ["final_step"], "grid": {"plateau": [0.0]}, "fixed": {"steps": 5}}


@pytest.mark.parametrize("prune, words", [
    ("step >=", "expected a number"),
    ("val_ssim", "must be a condition"),
    ("plateau > 0", "reads only parameters"),
    ("steps > 3 and plateau < 1", "reads only parameters"),
    ("runtime_s > 10", "'runtime_s' is a bookkeeping column"),
    ([3], "expected a rule string"),
    (3, "expected a rule such as"),
    ({"a": 1}, "expected a rule such as"),
])
def test_make_refuses_a_prune_rule_it_cannot_use_and_says_why(prune, words):
    with pytest.raises(SpecError, match="at key prune") as err:
        validate({**BASE, "prune": prune}, check_task=False)
    assert words in str(err.value)


def test_a_list_entry_that_is_bad_is_named_by_its_index():
    with pytest.raises(SpecError, match=r"at key prune\[1\]"):
        validate({**BASE, "prune": ["step > 3", "status == 'done'"]}, check_task=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="steplosval_ <>=!()+-*/.0123456789andornt'[],", max_size=40))
def test_any_prune_text_is_either_accepted_or_refused_with_a_spec_error(text):
    try:
        spec = validate({**BASE, "prune": text}, check_task=False)
    except SpecError as err:
        assert "at key prune" in str(err)
        return
    # An accepted rule evaluates on any record without raising anything but ExprError (which never prunes).
    watch = PruneWatch(spec.prune, {"plateau": 0.0})
    for record in ({"step": 1, "time": 0.0, "loss": 0.5}, {"step": 2}, {"step": 3, "loss": "nan"}, {}):
        assert watch.check(record) in (None, message(text, record.get("step")))


def test_check_rule_accepts_metrics_that_no_parameter_names():
    assert check_rule("step >= 200 and val_ssim < 0.3", ["depth", "loss"], BOOK_COLUMNS).names == {"step", "val_ssim"}
    with pytest.raises(ExprError):
        check_rule("depth > 3", ["depth"], BOOK_COLUMNS)


def test_a_payload_with_a_prune_notice_and_a_result_is_read_whole():
    assert parse_payload(b'{"pruned": "Pruned: x at step 3"}\n{"interrupted": true}') == {
        "pruned": "Pruned: x at step 3", "interrupted": True}
    assert parse_payload(b'{"metrics": {"a": 1.0}}') == {"metrics": {"a": 1.0}}
    assert parse_payload(b'{"pruned": "P"}\n{"metr') == {"pruned": "P"}  # a result cut off by a kill
    assert parse_payload(b"garbage") is None


def test_a_context_without_a_worker_prunes_on_its_own_log(tmp_path):
    ctx = Context(tmp_path / "rows" / "r")
    ctx.watch_prune(["step >= 2 and loss > 0.3"], {})
    ctx.log(1, loss=0.9)
    assert not ctx.should_stop() and ctx.pruned is None
    ctx.log(2, loss=0.9)
    assert ctx.should_stop() and ctx.pruned == "Pruned: step >= 2 and loss > 0.3 at step 2"


# ---------------------------------------------------------------- replay

def test_regression_a_rule_with_not_never_prunes_a_row_that_lacks_its_metric(tmp_path):
    """`not (val_ssim > 0.3)` on records without val_ssim is unknown, not true: the rows run to the end."""
    rule = "step >= 2 and not (val_ssim > 0.3)"
    grid = steps_grid(tmp_path, rule)
    summary = Worker(grid, handle_signals=False).run()
    assert (summary.done, summary.failed) == (2, 0)
    result = replay(grid, [rule])
    assert result.pruned == 0 and result.missing_names == {"val_ssim"}


def test_regression_replay_counts_rows_a_prune_already_stopped_apart_from_the_failed_ones(tmp_path):
    """On a grid run with a prune rule, the rows it stopped are not among "the N that failed": the summary
    said "2 of the 0 that failed"."""
    grid = steps_grid(tmp_path, "step >= 4 and loss > 0.3", grid={"plateau": [0.0, 0.5, 0.6]})
    Worker(grid, handle_signals=False, grace_s=5).run()
    result = replay(grid, ["step >= 4 and loss > 0.3"])
    assert (result.pruned, result.failed_rows) == (2, 0)
    out = CliRunner().invoke(main, ["replay-prune", "--grid", str(grid), "step >= 4 and loss > 0.3"])
    assert out.exit_code == 0, out.output
    assert ("It would prune 2 row(s): 0 of the 0 that failed, 2 that a prune already stopped, and 0 that "
            "finished done.") in out.output


def test_replay_reports_prunes_steps_saved_compute_and_names_the_false_prunes(tmp_path):
    grid = steps_grid(tmp_path, None, grid={"plateau": [0.0, 0.3, 0.5]},
                      record_to=str(tmp_path / "events"))
    # The failure rule of a pilot, by hand: the plateau 0.5 row "failed" (set here as a finished failure).
    Worker(grid, handle_signals=False).run()
    rows = by_plateau(grid)
    from gridrunner.store import GridStore

    store = GridStore(grid)
    path = store.shard_paths()[0]
    text = path.read_text().replace(f"{rows[0.5]['row_id']},done,", f"{rows[0.5]['row_id']},failed,")
    path.write_text(text)

    result = replay(grid, ["step >= 5 and loss > 0.25"])
    assert result.rows == 3 and result.pruned == 2 and result.failed_rows == 1
    assert [hit.row_id for hit in result.false_prunes] == [rows[0.3]["row_id"]]
    assert result.steps() == [(5, 2)]
    # Saved: from the record at step 5 to the row's end, read off the logged times; never more than the
    # row took, never less than its training after step 5, and the start-up before step 1 is not counted.
    for hit in result.hits:
        row = next(r for r in rows.values() if r["row_id"] == hit.row_id)
        times = {r["step"]: r["time"] for r in history_of(grid, hit.row_id)}
        assert hit.by_time
        assert times[20] - times[5] <= hit.saved_s <= float(row["runtime_s"])
        assert hit.saved_s <= float(row["runtime_s"]) - (times[5] - times[1])
    assert result.saved_s == pytest.approx(sum(hit.saved_s for hit in result.hits))
    out = CliRunner().invoke(main, ["replay-prune", "--grid", str(grid), "step >= 5 and loss > 0.25"])
    assert out.exit_code == 0, out.output
    assert "It would prune 2 row(s): 1 of the 1 that failed, and 1 that finished done." in out.output
    assert f"  {rows[0.3]['row_id']} at step 5 of 20 by step >= 5 and loss > 0.25" in out.output
    assert "At steps: 5 (2 rows)" in out.output
    assert "the time from the record it would be pruned at to the row's end" in out.output
    clean = replay(grid, ["step >= 5 and loss > 0.4"])
    assert clean.pruned == 1 and not clean.false_prunes


def test_replay_without_logged_times_counts_the_share_of_steps_after_the_prune(tmp_path):
    grid = steps_grid(tmp_path, None, grid={"plateau": [0.5]})
    Worker(grid, handle_signals=False).run()
    (row,) = rows_by(grid).values()
    path = grid / "rows" / row["row_id"] / "history.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "time"}) + "\n"
                            for r in history_of(grid, row["row_id"])))
    result = replay(grid, ["step >= 5 and loss > 0.25"])
    (hit,) = result.hits
    assert not hit.by_time
    assert result.saved_s == pytest.approx(float(row["runtime_s"]) * (1 - 5 / 20))
    assert "runtime_s × (1 − prune step / last logged step) per pruned row (no logged times)" in "\n".join(result.lines())


def test_replay_of_a_prune_in_an_earlier_run_of_a_resumed_row_counts_the_share_of_steps(tmp_path):
    """A row whose record at step 5 was logged before its last claim started (it was stopped and resumed):
    the times of one run do not show what a prune in the earlier one would have saved."""
    grid = steps_grid(tmp_path, None, grid={"plateau": [0.5]})
    Worker(grid, handle_signals=False).run()
    (row,) = rows_by(grid).values()
    path = grid / "rows" / row["row_id"] / "history.jsonl"
    records = history_of(grid, row["row_id"])
    for r in records:
        if r["step"] <= 10:
            r["time"] -= 3600.0  # the first run, an hour before the last claim
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (hit,) = replay(grid, ["step >= 5 and loss > 0.25"]).hits
    assert not hit.by_time and hit.saved_s == pytest.approx(float(row["runtime_s"]) * (1 - 5 / 20))


finite = st.floats(min_value=-1e9, max_value=1e10, allow_nan=False, allow_infinity=False)


@given(runtime=st.floats(min_value=0, max_value=1e6, allow_nan=False), step=finite, last_step=st.none() | finite,
       prune_time=st.none() | finite, last_time=st.none() | finite, started=st.none() | finite)
def test_a_replayed_saving_is_never_negative_nor_more_than_the_row_took(runtime, step, last_step, prune_time,
                                                                         last_time, started):
    from gridrunner.prune import ReplayRow

    row = ReplayRow("r", "failed", "", runtime, step=step, last_step=last_step, prune_time=prune_time,
                    last_time=last_time, started=started)
    assert 0.0 <= row.saved_s <= runtime


def test_regression_a_prune_at_a_negative_step_saves_no_more_than_the_row_took():
    """Found by the property above: a task that logs negative steps made the share of steps after the prune
    more than 1, and the saving twice the row's runtime."""
    from gridrunner.prune import ReplayRow

    assert ReplayRow("r", "failed", "", 1.0, step=-1.0, last_step=1.0).saved_s == 1.0


@pytest.mark.parametrize("cell", ["inf", "nan", "-inf"])
def test_regression_a_hand_edited_runtime_that_is_not_a_number_counts_as_nothing_saved(tmp_path, cell):
    grid = steps_grid(tmp_path, None, grid={"plateau": [0.5]})
    Worker(grid, handle_signals=False).run()
    (row,) = rows_by(grid).values()
    path = next((grid / "shards").glob("*.csv"))
    path.write_text(path.read_text().replace(f",{row['runtime_s']},", f",{cell},"))
    result = replay(grid, ["step >= 5 and loss > 0.25"])
    assert result.pruned == 1 and result.saved_s == 0.0 and result.total_s == 0.0


def test_replay_of_a_bad_rule_is_one_error_line(tmp_path):
    grid = steps_grid(tmp_path, None)
    out = CliRunner().invoke(main, ["replay-prune", "--grid", str(grid), "plateau >"])
    assert out.exit_code == 1 and out.output.startswith("Error: expected a number") and "in 'plateau >'" in out.output and out.output.count("\n") == 1
