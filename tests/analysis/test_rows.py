"""Row states: what failed, why, and the counts every model reports."""
import numpy as np
import pandas as pd
import pytest

from gridrunner.analysis.rows import benchmark_value, counts_sentence, label_rows, resolve_goal, resolve_metric, rule_thresholds, state_counts
from gridrunner.errors import ExprError, GridError

from analysis_grids import make_frame


def mixed():
    return make_frame(
        {"loss": ["l1", "l2", "ssim", "ssim", "l1", "l2"]},
        {"m_ssim": [0.8, 0.4, 0.3, np.nan, np.nan, np.nan], "m_mae": [0.1, 0.1, 0.1, np.nan, np.nan, np.nan]},
        status=["done", "done", "failed", "failed", "running", "not_run"],
        error=["", "", "rule: m_ssim < 0.5", "MemoryError: out of memory", "", ""],
        failure="m_ssim < 0.5",
    )


def test_states_separate_exceptions_rule_failures_and_unfinished_rows():
    labelled = label_rows(mixed())
    assert list(labelled["state"]) == ["success", "failed_rule", "failed_rule", "failed_exception", "running", "not_run"]
    assert list(labelled["failed"].fillna(-1)) == [0, 1, 1, 1, -1, -1]
    assert counts_sentence(mixed()) == "6 rows: 1 done, 1 failed by exception, 2 failed by rule, 1 running, 1 not run."


def test_a_failure_rule_given_by_the_user_replaces_the_specs():
    labelled = label_rows(mixed(), failure="m_ssim < 0.35")
    assert list(labelled["state"][:3]) == ["success", "success", "failed_rule"]
    assert labelled.attrs["failure"] == "m_ssim < 0.35"


def test_without_a_rule_the_workers_verdict_stands():
    frame = mixed()
    frame.attrs["failure"] = None
    assert list(label_rows(frame)["state"][:3]) == ["success", "success", "failed_rule"]


def test_a_rule_naming_an_unknown_column_says_which_names_are_valid():
    with pytest.raises(ExprError, match="unknown column 'm_psnr'.*m_ssim"):
        label_rows(mixed(), failure="m_psnr < 20")


def test_counts_table_has_every_state_even_when_empty():
    table = state_counts(make_frame({"x": [1, 2]}, {"y": [1.0, 2.0]}))
    assert list(table["rows"]) == [2, 0, 0, 0, 0]


def test_metric_and_goal_resolution():
    frame = mixed()
    assert resolve_metric(frame) == "m_ssim"
    assert resolve_goal(frame, "m_ssim") == "max"
    assert resolve_goal(frame, "m_mae") == "min"
    assert resolve_goal(frame, "val_loss") == "min"
    with pytest.raises(GridError, match="unknown metric 'psnr' \\(outcomes: m_ssim, m_mae\\)"):
        resolve_metric(frame, "psnr")


def test_rule_thresholds_find_the_constant_a_metric_is_compared_with():
    assert rule_thresholds("m_ssim < 0.5 or m_mae > 1", "m_ssim") == [0.5]
    assert rule_thresholds("0.5 > m_ssim", "m_ssim") == [0.5]
    assert rule_thresholds("m_mae > 1", "m_ssim") == []
    assert rule_thresholds(None, "m_ssim") == []


def test_the_benchmark_of_a_metric_is_the_median_of_its_bench_column():
    df = pd.DataFrame({"m_ssim": [0.8, 0.9, 0.4], "bench_ssim": [0.6, 0.7, None], "score": [1, 2, 3]})
    assert benchmark_value(df, "m_ssim") == pytest.approx(0.65)
    assert benchmark_value(df, "score") is None
    assert benchmark_value(df.assign(bench_score=[2.0, 2.0, 5.0]), "score") == 2.0


def test_regression_minus_zero_and_zero_with_null_are_three_levels():
    # found by the seeded property run: -0.0 and 0.0 are distinct spec values (distinct row ids) that
    # numpy's unique merged, so one row's level was missing from the categories and became missing
    import warnings

    from gridrunner.analysis.rows import model_ready

    column = pd.Series([-0.0, 0.0, None, 2.5], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        levels = model_ready(column, pd.Series(True, index=column.index))
    assert list(levels.astype(str)) == ["-0", "0", "null", "2.5"]
    assert list(levels.cat.categories) == ["null", "-0", "0", "2.5"]
