import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridrunner.errors import ExprError
from gridrunner.expr import Expr, parse


@pytest.mark.parametrize("text, values, expected", [
    ("m_ssim < 0.5 or m_mae > 1", {"m_ssim": 0.4, "m_mae": 0.1}, True),
    ("m_ssim < 0.5 or m_mae > 1", {"m_ssim": 0.6, "m_mae": 0.1}, False),
    ("not (a >= 2 and b != 'x')", {"a": 3, "b": "y"}, False),
    ("loss == \"ssim\"", {"loss": "ssim"}, True),
    ("loss in ['ssim', 'ms_ssim']", {"loss": "ms_ssim"}, True),
    ("loss not in ['ssim']", {"loss": "l1"}, True),
    ("depth * filters * kernel ** 2", {"depth": 3, "filters": 8, "kernel": 3}, 216),
    ("-x + 2 * (y - 1) / 4", {"x": 1, "y": 3}, 0.0),
    ("log2(filters) + len(reps) + sum(reps)", {"filters": 8, "reps": [2, 2]}, 9.0),
    ("max(a, b) - min(a, b)", {"a": 2, "b": 5}, 3),
    ("flag == true", {"flag": True}, True),
    ("1e-3 < lr", {"lr": 0.01}, True),
])
def test_evaluates_rules_and_costs(text, values, expected):
    assert parse(text).evaluate(values) == expected


def test_missing_or_nan_values_never_fire_a_rule():
    rule = parse("m_ssim < 0.5")
    assert rule.evaluate({}) is False
    assert rule.evaluate({"m_ssim": None}) is False
    assert rule.evaluate({"m_ssim": float("nan")}) is False
    assert parse("not m_ssim < 0.5").evaluate({}) is True
    assert parse("depth * 2").evaluate({}) is None


def test_names_and_unknown_names():
    rule = parse("m_ssim < 0.5 or depth > 3")
    assert rule.names == {"m_ssim", "depth"}
    with pytest.raises(ExprError, match=r"unknown outcome 'depth' \(valid: m_mae, m_ssim\)"):
        rule.check_names(["m_ssim", "m_mae"], "outcome")


@pytest.mark.parametrize("text, message", [
    ("", "empty expression in ''"),
    ("a <", "expected a number, string, name or '(', found the end at column 4 in 'a <'"),
    ("a < 1 )", "unexpected ')' at column 7 in 'a < 1 )'"),
    ("__import__('os')", "unknown function '__import__' (known: abs, exp, len, log, log10, log2, max, min, sqrt, sum) at column 1 in \"__import__('os')\""),
    ("a.b > 1", "unexpected character '.' at column 2 in 'a.b > 1'"),
    ("(a > 1", "expected ')', found the end at column 7 in '(a > 1'"),
    ("a ; b", "unexpected character ';' at column 3 in 'a ; b'"),
])
def test_syntax_errors_say_where(text, message):
    with pytest.raises(ExprError) as info:
        parse(text)
    assert str(info.value) == message


def test_evaluate_frame_matches_row_by_row():
    frame = pd.DataFrame({"m_ssim": [0.1, 0.9, math.nan, 0.7], "m_mae": [0.1, 2.0, 0.5, 0.2],
                          "loss": ["ssim", "l1", "l1", "ssim"]})
    for text in ("m_ssim < 0.5 or m_mae > 1", "not m_ssim >= 0.5", "loss == 'ssim' and m_mae < 0.15",
                 "loss in ['l1']"):
        rule = parse(text)
        vector = list(rule.evaluate_frame(frame))
        rows = [rule.evaluate({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))})
                for row in frame.to_dict("records")]
        assert vector == rows, text


_ALPHABET = st.sampled_from(list("abxyz0123456789 .,()[]<>=!+-*/%'\"_") + ["and", "or", "not", "in", "import",
                                                                              "lambda", "__class__", "log("])


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=20).map("".join))
def test_fuzz_only_parses_or_raises_expr_error(text):
    """Any text either parses into the small language or raises ExprError; nothing else can happen."""
    try:
        expr = Expr(text)
    except ExprError:
        return
    values = {name: 1 for name in expr.names}
    try:
        expr.evaluate(values)
    except ExprError:
        pass
    except (OverflowError, ZeroDivisionError):
        pass
