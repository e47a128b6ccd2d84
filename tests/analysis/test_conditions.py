"""Failure conditions in words: the smallest conditions on parameter levels that cover the failures."""
import itertools

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from gridrunner.analysis.conditions import failure_conditions
from gridrunner.analysis.rows import label_rows

from analysis_grids import make_frame, study_grid


def frame_failing_where(params: dict, failed) -> pd.DataFrame:
    failed = np.asarray(failed, bool)
    return make_frame(params, {"y": np.where(failed, np.nan, 1.0)}, status=np.where(failed, "failed", "done"),
                      error=np.where(failed, "RuntimeError: boom", ""))


def test_the_study_grid_reads_like_the_studys_finding():
    frame = study_grid()
    labelled = label_rows(frame)
    ssim = labelled["loss"] == "ssim"
    k, n, m = int(labelled["failed"].sum()), int(ssim.sum()), int((~ssim).sum())
    assert failure_conditions(frame).sentence == f"loss=ssim: {k} of {n} failed; every other loss: 0 of {m}"


def test_one_conjunction_that_holds_exactly_the_failures_is_stated_with_counts():
    params = {"act": ["relu", "tanh"] * 18, "lr": [0.1] * 12 + [0.01] * 12 + [0.001] * 12}
    failed = (np.array(params["act"]) == "tanh") & (np.array(params["lr"]) == 0.1)
    conditions = failure_conditions(frame_failing_where(params, failed))
    assert conditions.kind == "exact"
    assert conditions.sentence == "failed: 6 of 6 rows with act=tanh and lr=0.1; 0 of 30 elsewhere"
    assert conditions.table[["condition", "failed", "rows"]].values.tolist() == [
        ["act=tanh and lr=0.1", 6, 6], ["elsewhere", 0, 30], ["every finished row", 6, 36]]


def test_two_separate_causes_are_a_cover_of_two_conditions():
    combos = list(itertools.product(["a", "b", "c"], [1, 2, 3], ["x", "y"]))
    p, q, r = (list(c) for c in zip(*combos))
    failed = [(pi == "a" and qi == 1) or (ri == "y" and qi == 3) for pi, qi, ri in combos]
    conditions = failure_conditions(frame_failing_where({"p": p, "q": q, "r": r}, failed))
    assert conditions.kind == "cover", conditions.sentence
    assert conditions.sentence == "failed: 3 of 3 rows with q=3 and r=y; 2 of 2 rows with p=a and q=1; 0 of 13 elsewhere"


def test_no_failure_and_every_failure_are_said_so():
    assert failure_conditions(frame_failing_where({"a": [1, 2]}, [False, False])).sentence == "no finished row failed (0 of 2)"
    assert failure_conditions(frame_failing_where({"a": [1, 2]}, [True, True])).sentence == "every finished row failed (2 of 2)"


@settings(max_examples=60, derandomize=True, deadline=None, database=None)
@given(st.data())
def test_every_stated_condition_is_true_of_the_rows(data):
    levels = [data.draw(st.integers(1, 4)) for _ in range(data.draw(st.integers(1, 4)))]
    n = data.draw(st.integers(2, 40))
    params = {f"p{i}": [data.draw(st.integers(0, size - 1)) for _ in range(n)] for i, size in enumerate(levels)}
    failed = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    frame = frame_failing_where(params, failed)
    conditions = failure_conditions(frame)
    table = conditions.table
    total = table[table["condition"] == "every finished row"].iloc[0]
    assert (total["failed"], total["rows"]) == (sum(failed), n)
    failed = np.asarray(failed)
    inside = np.zeros(n, bool)
    for row in table[~table["condition"].isin(["elsewhere", "every finished row"])].itertuples():
        mask = np.ones(n, bool)
        for literal in row.condition.split(" and "):
            name, value = literal.split("=")
            mask &= np.asarray(params[name]) == int(value)
        assert (row.failed, row.rows) == (int(failed[mask].sum()), int(mask.sum()))
        inside |= mask
        if conditions.kind in ("exact", "cover"):
            assert failed[mask].all()
    if conditions.simple:
        assert failed[inside].sum() == failed.sum()  # every failure is covered
        rest = table[table["condition"] == "elsewhere"].iloc[0]
        assert (rest["failed"], rest["rows"]) == (0, int((~inside).sum()))
