"""The outcome model recovers planted effects and explains what it leaves out."""
import numpy as np
import pytest

from gridrunner.analysis.outcome import outcome_model
from gridrunner.analysis.terms import choose_terms
from gridrunner.errors import GridError

from analysis_grids import make_frame, planted_grid

FORMULA = "score ~ x + I(x**2) + depth + C(loss) + z"


def coefficient(fit, term):
    return fit.table.set_index("term").loc[term]


def test_planted_effects_are_recovered_with_their_signs():
    fit = outcome_model(planted_grid(seed=1), formula=FORMULA)
    expected = {"x": 0.3, "I(x ** 2)": -0.2, "depth": 0.05, "C(loss)[T.l2]": -0.1, "C(loss)[T.ssim]": -0.2}
    for term, truth in expected.items():
        row = coefficient(fit, term)
        assert row["p_value"] < 0.001, term
        assert np.sign(row["estimate"]) == np.sign(truth), term
        assert abs(row["estimate"] - truth) < 4 * row["std_error"], term  # within a 99.99 % interval
    assert fit.method == "OLS with HC3 robust standard errors"


def test_a_parameter_without_effect_is_significant_no_more_often_than_the_level():
    p_values = [coefficient(outcome_model(planted_grid(seed=seed), formula=FORMULA), "z")["p_value"] for seed in range(20)]
    assert sum(p < 0.05 for p in p_values) <= 3  # binomial(20, 0.05): P(> 3) = 1.6 %; seeds are fixed


def test_default_terms_are_levels_for_text_linear_for_numbers_and_log_for_wide_ranges():
    frame = make_frame({"loss": ["a", "b"] * 4, "depth": [1, 2, 3, 4] * 2, "lr": [1e-4] * 4 + [1e-1] * 4, "seed": range(8)}, {"y": range(8)})
    terms = choose_terms(frame, "y")
    assert terms.formula == "y ~ C(loss) + depth + np.log10(lr)"
    assert any("seed" in note and "replicates" in note for note in terms.notes)


def test_anova_has_one_row_per_parameter():
    anova = outcome_model(planted_grid()).extra["anova"]
    assert sorted(anova["term"]) == sorted(["x", "depth", "C(loss)", "z", "Residual"])
    assert anova.set_index("term").loc["depth", "p_value"] < 0.001


def test_constant_parameter_is_dropped_with_a_note():
    frame = planted_grid()
    frame["arch"] = "dncnn"
    frame.attrs["params"] = frame.attrs["params"] + ["arch"]
    fit = outcome_model(frame)
    assert "arch" not in fit.formula
    assert any(note.startswith("dropped arch: constant") and "arch=dncnn" in note for note in fit.notes)


def test_collinear_parameter_is_flagged_not_fatal():
    frame = planted_grid()
    frame["width"] = frame["depth"] * 16  # fixed by depth: its effect cannot be told apart
    frame.attrs["params"] = frame.attrs["params"] + ["width"]
    fit = outcome_model(frame)
    assert "width" not in fit.formula and "depth" in fit.formula
    note = next(note for note in fit.notes if note.startswith("dropped width"))
    assert "collinear with depth" in note and "depth=2 has width=32" in note


def test_rows_used_and_dropped_are_counted_with_reasons():
    frame = make_frame(
        {"x": [0, 1, 2, 3, 4, 5, 6, 7]},
        {"y": [0.0, 1.1, 1.9, 3.2, "n/a", np.nan, np.nan, np.nan]},
        status=["done"] * 5 + ["failed", "running", "not_run"],
        error=[""] * 5 + ["RuntimeError: boom", "", ""],
    )
    fit = outcome_model(frame)
    assert fit.used == 4
    assert fit.dropped == {"failed": 1, "not finished": 2, "with no numeric y": 1}
    assert fit.usage == "Used 4 of 8 rows; dropped 1 failed, 2 not finished, 1 with no numeric y."


def test_a_level_seen_once_falls_back_to_hc1_and_says_so():
    frame = make_frame({"loss": ["a"] * 6 + ["b"], "x": [1, 2, 3, 4, 5, 6, 7]}, {"y": [1.0, 2.1, 2.9, 4.2, 5.0, 6.1, 9.0]})
    fit = outcome_model(frame)
    assert fit.method.startswith("OLS with HC1")
    assert any("HC3 is undefined" in note for note in fit.notes)


def test_a_bad_formula_is_a_user_error():
    with pytest.raises(GridError, match="does not fit the grid's columns"):
        outcome_model(planted_grid(), formula="score ~ C(nonexistent)")
    with pytest.raises(GridError, match="needs a response"):
        outcome_model(planted_grid(), formula="C(loss)")
