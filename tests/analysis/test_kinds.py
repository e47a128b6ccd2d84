"""Failure kinds, and the rows a worker pruned, found hung or stopped at their time limit."""
from gridrunner.analysis.kinds import failure_kinds, pruning_table, stopped_sentences
from gridrunner.analysis.report import build_report
from gridrunner.analysis.rows import label_rows

from analysis_grids import make_frame

ERRORS = ["", "Pruned: step >= 200 and val_ssim < 0.3 at step 200", "Pruned: step >= 200 and val_ssim < 0.3 at step 400",
          "Pruned: plateau > 5 at step 300", "Hung: no progress for 10 min (last step 7)",
          "TimeLimit: ran past its limit of 30 min (last step 90)", "FloatingPointError: loss became NaN", "", "rule: y < 0"]


def stopped_frame():
    status = ["done" if not e else "failed" for e in ERRORS]
    return make_frame({"lr": [0.1, 0.2, 0.3] * 3}, {"y": [1.0, None, None, None, None, None, None, 2.0, -1.0]},
                      status=status, error=ERRORS, failure="y < 0")


def test_pruned_hung_and_timed_out_rows_count_as_failed():
    labelled = label_rows(stopped_frame())
    assert list(labelled["failed"]) == [0, 1, 1, 1, 1, 1, 1, 0, 1]


def test_pruning_says_how_many_at_which_steps_and_by_which_rule():
    table = pruning_table(stopped_frame())
    assert table.values.tolist() == [["step >= 200 and val_ssim < 0.3", 2, 200, 300, 400], ["plateau > 5", 1, 300, 300, 300]]
    assert stopped_sentences(stopped_frame()) == [
        "3 rows were pruned (counted as failed): 2 by `step >= 200 and val_ssim < 0.3` at steps 200–400 (median 300); "
        "1 by `plateau > 5` at step 300",
        "1 row hung (no progress) (`Hung: ...`), counted as failed",
        "1 row ran past its time limit (`TimeLimit: ...`), counted as failed",
    ]


def test_failure_kinds_count_each_kind(tmp_path):
    kinds = failure_kinds(stopped_frame())
    assert dict(zip(kinds["kind"], kinds["rows"])) == {"Pruned": 3, "FloatingPointError": 1, "Hung": 1, "TimeLimit": 1, "failure rule": 1}
    report = build_report(stopped_frame(), tmp_path / "report")
    assert "3 rows were pruned" in report.summary_text(width=400)
    assert (tmp_path / "report" / "pruning.csv").exists() and (tmp_path / "report" / "failure_kinds.csv").exists()


def test_rows_the_worker_pruned_are_reported_with_their_rule_and_step(tmp_path):
    from cli_runs import analyse, check_contract, make_and_run

    spec = {"name": "pruned", "task": "gridrunner.tasks.toy:steps", "outcomes": ["final_step"],
            "grid": {"plateau": [0.0, 0.5], "width": [1, 2, 3]}, "prune": "step >= 4 and loss > 0.3",
            "fixed": {"steps": 12, "step_s": 0.005, "checkpoint_every": 4}}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    assert "3 rows were pruned (counted as failed): 3 by `step >= 4 and loss > 0.3` at step 4" in analysed.output
    assert "Failure conditions: failed: 3 of 3 rows with plateau=0.5; 0 of 3 elsewhere" in analysed.output
