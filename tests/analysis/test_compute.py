"""The compute-aware view: the Pareto front of metric against runtime and the best row per runtime budget."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gridrunner.analysis.compute import budget_table, pareto_front

from analysis_grids import make_frame, study_grid


@settings(max_examples=80, derandomize=True, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 10)), min_size=1, max_size=30), st.sampled_from(["max", "min"]))
def test_the_front_holds_exactly_the_rows_no_faster_row_beats(points, goal):
    runtime, metric = (np.array(c, float) for c in zip(*points))
    frame = make_frame({"i": list(range(len(points)))}, {"m": metric}, runtime_s=runtime)
    front = pareto_front(frame, "m", goal)
    better = (lambda a, b: a > b) if goal == "max" else (lambda a, b: a < b)
    # brute force: a row is on the front when no row with runtime <= its own is at least as good and either faster or better
    expected = set()
    best_values = {}
    for i in range(len(points)):
        dominated = any((runtime[j] <= runtime[i]) and (better(metric[j], metric[i]) or (metric[j] == metric[i] and (runtime[j] < runtime[i] or j < i)))
                        for j in range(len(points)) if j != i)
        if not dominated:
            best_values[(runtime[i], metric[i])] = i
    expected = {(r, m) for r, m in best_values}
    assert set(zip(front["runtime_s"], front["m"])) == expected
    assert list(front["runtime_s"]) == sorted(front["runtime_s"])


def test_the_best_row_within_each_budget_is_the_best_that_ran_no_longer():
    frame = study_grid()
    table = budget_table(frame, "m_ssim")
    assert len(table) >= 3 and table["budget_s"].is_monotonic_increasing
    success = frame[(frame["status"] == "done")]
    for row in table.itertuples():
        within = success[success["runtime_s"] <= row.budget_s]
        assert row.rows_within == len(within)
        assert row.m_ssim == within["m_ssim"].max()
    assert table["m_ssim"].is_monotonic_increasing
