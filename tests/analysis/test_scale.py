"""100,000 rows analyse well under a minute (the target of the performance issue is 30 s)."""
import time

from gridrunner.analysis.report import build_report

from analysis_grids import large_grid


def test_report_on_100k_rows_is_fast(tmp_path):
    frame = large_grid(100_000)
    start = time.perf_counter()
    report = build_report(frame, tmp_path / "report")
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"build_report took {elapsed:.1f} s on 100,000 rows"
    assert report.outcome.used > 90_000 and report.failure_fit.fitted
