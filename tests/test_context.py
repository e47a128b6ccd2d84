"""ctx.log: what a task may pass as a step and as metrics, and what the learning curve then holds."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from gridrunner.context import Context


def records(ctx):
    return [json.loads(line) for line in (ctx.row_dir / "history.jsonl").read_text().splitlines()]


whole_steps = st.one_of(
    st.integers(min_value=-(2**62), max_value=2**62),
    st.integers(min_value=-(2**31), max_value=2**31).map(np.int64),
    st.integers(min_value=-(2**31), max_value=2**31).map(np.int32),
    st.integers(min_value=-(2**52), max_value=2**52).map(float),
    st.integers(min_value=0, max_value=2**20).map(np.float32),
)


@given(step=whole_steps)
def test_a_whole_step_of_any_numeric_kind_is_logged_as_that_int(tmp_path_factory, step):
    ctx = Context(tmp_path_factory.mktemp("row"))
    ctx.log(step, loss=0.5)
    (record,) = records(ctx)
    assert record["step"] == int(step) and type(record["step"]) is int


not_whole = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not math.isfinite(x) or x != int(x)),
    st.text(max_size=5), st.none(), st.booleans(), st.just([1]), st.just(np.float64(2.5)),
)


@given(step=not_whole)
def test_regression_a_step_that_is_not_a_whole_number_is_refused_and_nothing_is_logged(tmp_path_factory, step):
    # ctx.log(2.7) used to log step 2, and a string step raised a bare ValueError from int().
    ctx = Context(tmp_path_factory.mktemp("row"))
    with pytest.raises(TypeError, match="step must be a whole number"):
        ctx.log(step, loss=0.5)
    assert not (ctx.row_dir / "history.jsonl").exists()


def test_regression_a_metric_named_time_is_refused_instead_of_overwriting_the_records_clock(tmp_path):
    # The record's time is what replay-prune's saving and the hang clock read; `time=` used to replace it.
    ctx = Context(tmp_path / "row")
    with pytest.raises(ValueError, match="'time' is the record's own clock"):
        ctx.log(10, time=3.0)
    ctx.log(10, elapsed_s=3.0)
    (record,) = records(ctx)
    assert record["elapsed_s"] == 3.0 and record["time"] > 1e9
