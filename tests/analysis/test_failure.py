"""The failure model: planted effects, separation and its fallbacks, rates and interactions."""
import numpy as np
import pandas as pd
import pytest

from gridrunner.analysis.failure import failure_interactions, failure_model, failure_rates, firth_logit, pair_rates, separation, wilson
from gridrunner.analysis.rows import label_rows

from analysis_grids import make_frame, planted_grid, study_grid


def row(table, term):
    return table.set_index("term").loc[term]


def test_planted_failure_effects_are_recovered_as_marginal_effects():
    fit = failure_model(planted_grid(seed=3, repeats=6))
    assert fit.method.startswith("logit")
    assert "logit" in fit.extra and "lpm" not in fit.extra
    ssim, depth = row(fit.table, "C(loss)[T.ssim]"), row(fit.table, "depth")
    assert ssim["p_value"] < 0.001 and 0.3 < ssim["estimate"] < 0.8  # truth: about +0.5
    assert depth["p_value"] < 0.01 and depth["estimate"] > 0
    for null in ("x", "z", "C(loss)[T.l2]"):
        assert row(fit.table, null)["p_value"] > 0.01, null
    assert list(fit.table.columns[:5]) == ["term", "estimate", "ci_low", "ci_high", "p_value"]


def test_null_parameter_is_rarely_significant_for_failure():
    p_values = [row(failure_model(planted_grid(seed=seed, repeats=4)).table, "z")["p_value"] for seed in range(10)]
    assert sum(p < 0.05 for p in p_values) <= 2  # binomial(10, 0.05): P(> 2) = 1.2 %; seeds are fixed


def test_separation_is_said_in_words_and_falls_back_without_an_exception():
    fit = failure_model(study_grid())
    failures = int(label_rows(study_grid())["failed"].sum())
    assert f"every failure has loss=ssim ({failures} of {failures})" in fit.notes
    assert fit.method.startswith("Firth penalised logit")
    assert {"firth_logit", "lpm", "term_tests"} <= set(fit.extra)
    assert np.isfinite(fit.table[["estimate", "ci_low", "ci_high", "p_value"]].to_numpy()).all()
    lpm = row(fit.extra["lpm"], "C(loss)[T.ssim]")
    assert lpm["p_value"] < 1e-6 and lpm["estimate"] > 0.2
    assert row(fit.extra["term_tests"], "C(loss)")["p_value"] < 1e-6
    assert any("Firth" in note and "linear probability model" in note for note in fit.notes)


def test_separation_sentences():
    data = label_rows(
        make_frame(
            {"loss": ["a", "a", "b", "b", "c", "c"], "size": [1, 2, 3, 4, 5, 6]},
            {"y": [1.0] * 6},
            status=["done", "done", "failed", "done", "failed", "failed"],
            error=["", "", "E: x", "", "E: x", "E: x"],
        )
    )
    assert separation(data, ["loss"]) == ["no row with loss=a failed", "every row with loss=c failed"]
    assert separation(data, ["size"]) == []
    data["failed"] = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert separation(data, ["size"]) == ["every failure has size > 3, and no success does"]


def test_firth_matches_the_closed_form_of_a_two_by_two_table():
    # In a saturated 2×2 model Firth's estimate is the log odds ratio with ½ added to each cell.
    x = np.array([0] * 10 + [1] * 10, float)
    y = np.array([0] * 10 + [1] * 7 + [0] * 3, float)  # separated: no failure where x = 0
    beta, cov, converged, _ = firth_logit(np.column_stack([np.ones(20), x]), y)
    assert converged
    assert beta[0] == pytest.approx(np.log(0.5 / 10.5), abs=1e-6)
    assert beta[1] == pytest.approx(np.log((7.5 * 10.5) / (3.5 * 0.5)), abs=1e-6)


def test_firth_agrees_with_the_ordinary_logit_on_large_unseparated_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-(-1 + 0.8 * x)))).astype(float)
    beta, _, _, _ = firth_logit(np.column_stack([np.ones_like(x), x]), y)
    assert beta == pytest.approx([-1, 0.8], abs=0.05)


def test_failure_rates_per_level_have_wilson_intervals():
    rates = failure_rates(study_grid())
    loss = rates[rates["param"] == "loss"].set_index("level")
    assert loss.loc["l1", "failures"] == 0 and loss.loc["l1", "ci_low"] == pytest.approx(0, abs=1e-12)
    assert loss.loc["ssim", "failure_rate"] > 0.2
    low, high = wilson([0, 5], [10, 10])
    assert low[0] == pytest.approx(0, abs=1e-12) and high[0] == pytest.approx(0.2775, abs=1e-3)
    assert low[1] == pytest.approx(0.2366, abs=1e-3)


def test_the_skip_by_loss_interaction_stands_out():
    table = failure_interactions(study_grid())
    top = table.iloc[0]
    assert {top["param_a"], top["param_b"]} == {"loss", "skip"} and top["stands_out"]
    assert table["stands_out"].sum() == 1
    cells = pair_rates(study_grid(), "loss", "skip")
    ssim = cells[cells["loss"] == "ssim"].set_index("skip")["failure_rate"]
    assert ssim["resnet"] > ssim["dncnn"]
    assert (cells.loc[cells["loss"] != "ssim", "failures"] == 0).all()


@pytest.mark.parametrize("status, word", [(["done"] * 6, "no"), (["failed"] * 6, "every")])
def test_nothing_to_model_when_no_row_or_every_row_failed(status, word):
    frame = make_frame({"loss": list("aabbcc")}, {"y": [1.0] * 6}, status=status, error=["E: x" if s == "failed" else "" for s in status])
    fit = failure_model(frame)
    assert not fit.fitted
    assert f"{word} finished row failed: nothing to model" in fit.notes


def test_joint_separation_without_a_single_culprit_still_falls_back():
    # Failures exactly where a + b > 2: no single parameter separates, together they do.
    a, b = np.meshgrid(np.arange(4), np.arange(4))
    a, b = np.repeat(a.ravel(), 3), np.repeat(b.ravel(), 3)
    failed = a + b > 2
    frame = make_frame({"a": a, "b": b}, {"y": np.ones(len(a))}, status=np.where(failed, "failed", "done"), error=np.where(failed, "E: x", ""))
    fit = failure_model(frame)
    assert fit.method.startswith("Firth")
    assert any("jointly separate" in note for note in fit.notes)
    assert np.isfinite(fit.table["estimate"]).all()
    assert isinstance(fit.extra["lpm"], pd.DataFrame)


def test_interactions_of_parameters_with_many_levels():
    # 20 x 20 levels: the cell index no longer fits the int8 category codes pandas uses
    p, q, _ = np.meshgrid([f"p{i}" for i in range(20)], [f"q{j}" for j in range(20)], [0, 1], indexing="ij")
    rng = np.random.default_rng(0)
    status = np.where(rng.random(p.size) < 0.3, "failed", "done")
    table = failure_interactions(make_frame({"p": p.ravel(), "q": q.ravel()}, status=status))
    assert len(table) == 1 and np.isfinite(table["p_value"]).all()


@pytest.mark.parametrize("formula, message", [
    ("failed ~ np.log(x)", "the failure formula 'failed ~ np.log(x)' cannot be fitted: np.log(x) is infinite in "),
    ("failed ~ 0", "the failure formula 'failed ~ 0' has no terms to fit"),
])
def test_regression_a_failure_formula_that_cannot_be_fitted_is_a_user_error(formula, message):
    # was: "ValueError: array must not contain infs or NaNs" (np.log of x = 0), "IndexError: index 0 is out of
    # bounds" (no terms)
    from gridrunner.errors import GridError

    with pytest.raises(GridError) as info:
        failure_model(planted_grid(), formula=formula)
    assert str(info.value).startswith(message)
