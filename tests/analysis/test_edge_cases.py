"""Odd grids give a clear message or a result, never a traceback: all through ``build_report``."""
import numpy as np
import pytest

from gridrunner.analysis.report import build_report

from analysis_grids import make_frame, planted_grid


def report_of(frame, tmp_path, **options):
    report = build_report(frame, tmp_path / "report", **options)
    text = report.summary_text()
    assert report.html_path.exists() and report.markdown_path.exists()
    return report, text


def test_all_failed(tmp_path):
    frame = make_frame({"loss": list("aabbcc")}, {"y": [np.nan] * 6}, status=["failed"] * 6, error=["RuntimeError: boom"] * 6)
    report, text = report_of(frame, tmp_path)
    assert "6 failed by exception" in text
    assert "every finished row failed: nothing to model" in report.failure_fit.notes
    assert "no successful row has a value of the metric: nothing to model" in report.outcome.notes
    assert "no successful row yet" in text


def test_none_failed(tmp_path):
    report, text = report_of(planted_grid().assign(status="done", error="", score=lambda f: f["score"].fillna(0.5)), tmp_path)
    assert "no finished row failed: nothing to model" in report.failure_fit.notes


def test_one_row(tmp_path):
    frame = make_frame({"loss": ["a"], "x": [1]}, {"y": [0.5]})
    report, text = report_of(frame, tmp_path)
    assert "1 rows: 1 done" in text
    assert any("dropped loss: constant" in note for note in report.outcome.notes)
    assert report.top["y"].tolist() == [0.5]


def test_one_level_only(tmp_path):
    frame = make_frame({"loss": ["l1"] * 8, "x": [1, 2, 3, 4] * 2}, {"y": [1.0, 2.1, 2.9, 4.2, 1.1, 1.9, 3.0, 4.0]})
    report, _ = report_of(frame, tmp_path)
    assert report.outcome.formula == "y ~ x"
    assert report.outcome.table.set_index("term").loc["x", "p_value"] < 0.001


def test_non_numeric_outcome_cells_are_dropped_and_counted(tmp_path):
    frame = planted_grid()
    values = frame["score"].astype(object)
    values.iloc[:10] = "nan-ish"
    frame["score"] = values.map(lambda v: v if isinstance(v, float) else np.nan).astype(float)
    report, _ = report_of(frame, tmp_path)
    assert report.outcome.dropped.get("with no numeric score", 0) >= 1


def test_a_grid_still_running(tmp_path):
    frame = planted_grid()
    status = frame["status"].astype(str).to_numpy().copy()
    status[::3] = "not_run"
    status[1::7] = "running"
    frame["status"] = status
    frame.loc[frame["status"].isin(["not_run", "running"]), ["score", "runtime_s"]] = np.nan
    report, text = report_of(frame, tmp_path)
    assert "running" in text and "not run" in text
    assert "not finished" in report.outcome.dropped and "not finished" in report.failure_fit.dropped


def test_no_rows_at_all(tmp_path):
    frame = make_frame({"x": []}, {"y": []})
    report, text = report_of(frame, tmp_path)
    assert text.splitlines()[1].startswith("0 rows")


def test_unknown_metric_is_a_user_error(tmp_path):
    from gridrunner.errors import GridError

    with pytest.raises(GridError, match="unknown metric"):
        build_report(planted_grid(), tmp_path / "report", metric="psnr")


def test_own_formula_with_a_transformed_response(tmp_path):
    report, text = report_of(planted_grid(), tmp_path, formula="np.log(score + 2) ~ x + I(x**2) + C(loss)")
    assert report.outcome.formula == "np.log(score + 2) ~ x + I(x**2) + C(loss)"
    assert report.metric == "score" and report.outcome.fitted
    assert "I(x ** 2)" in set(report.outcome.table["term"])
