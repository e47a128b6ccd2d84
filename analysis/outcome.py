"""The outcome model: OLS of the metric on the hyperparameters, over successful rows.

One formula (:mod:`analysis.terms` chooses it, ``formula`` overrides it), HC3 robust standard errors
(MacKinnon and White 1985), and a type-II ANOVA table per term with the same robust covariance.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import patsy
import statsmodels.formula.api as smf
from statsmodels.stats.anova import anova_lm

from gridrunner.analysis.fit import Fit, baselines_of, check_design, result_table
from gridrunner.analysis.rows import FAILED, STATE, dropped_reasons, ensure_labelled, resolve_metric
from gridrunner.analysis.terms import MAX_LINEAR, choose_terms, formula_notes, unit_columns
from gridrunner.errors import GridError


def outcome_model(df: pd.DataFrame, metric: str | None = None, failure: str | None = None, formula: str | None = None) -> Fit:
    """OLS of ``metric`` (or of ``formula``'s left-hand side) on the hyperparameters, over successful rows."""
    df = ensure_labelled(df, failure)
    metric = response_of(formula) if formula else resolve_metric(df, metric)
    has_metric = df[metric].notna() if metric in df.columns else pd.Series(True, index=df.index)
    success = df[STATE].eq("success")
    keep = success & has_metric
    dropped = dropped_reasons(
        df,
        keep,
        {
            "failed": df[FAILED].eq(1.0),
            "not finished": df[FAILED].isna(),
            f"with no numeric {metric}": ~has_metric,
        },
    )
    data = df[keep]
    fit = Fit(f"Outcome model: {metric}", "OLS with HC3 robust standard errors", formula, len(data), len(df), dropped)
    if len(data) == 0:
        fit.reason = "no successful row has a value of the metric"
        fit.notes.append(f"{fit.reason}: nothing to model")
        return fit
    if metric in data.columns:
        largest = float(np.abs(data[metric].to_numpy(float)).max())
        if largest >= MAX_LINEAR:
            fit.reason = (f"{metric} reaches {largest:.3g}, too large for least squares (its squares overflow the "
                          f"largest float); fit a rescaled metric with --formula, such as 'I({metric} / 1e{math.floor(math.log10(largest))}) ~ ...'")
            fit.notes.append(f"not fitted: {fit.reason}")
            return fit
    display = lambda name: name  # noqa: E731
    if formula is None:
        terms = choose_terms(data, metric)
        fit.notes.extend(terms.notes)
        fit.formula = terms.formula
        display = terms.display
        model = smf.ols(terms.internal_formula, terms.frame(data))
    else:
        model = user_model(fit.formula, data)
    missing = len(data) - int(model.nobs)
    if missing:
        fit.used -= missing
        fit.dropped["with missing values in the formula's columns"] = missing
    n_coef = model.exog.shape[1]
    if model.nobs <= n_coef:
        fit.reason = f"{int(model.nobs)} successful rows for {n_coef} coefficients"
        fit.notes.append(f"too few rows: {fit.reason}; no model fitted")
        return fit
    cov_type = robust_cov_type(model, fit.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = model.fit(cov_type=cov_type)
    fit.method = f"OLS with {cov_type} robust standard errors"
    fit.notes.extend(formula_notes(result, display))
    fit.result = result
    fit.columns = [display(name) for name in model.exog_names]
    fit.baselines = baselines_of(result, display)
    fit.table = result_table(result, display)
    try:
        anova = anova_table(result, cov_type)
        anova["term"] = anova["term"].map(display)
        fit.extra["anova"] = anova
    except (ValueError, np.linalg.LinAlgError) as err:
        fit.notes.append(f"no ANOVA table: {err}")
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a constant metric has no R²
        rsquared, adjusted = result.rsquared, result.rsquared_adj
    if np.isfinite(rsquared):
        fit.notes.append(f"R² = {rsquared:.3f} (adjusted {adjusted:.3f})")
    return fit


def user_model(formula: str, data: pd.DataFrame):
    """The OLS model of a user's ``formula`` over ``data``, or a GridError that names the formula and why
    it cannot be fitted: a name or a function it does not know, or a design :func:`check_design` refuses."""
    with np.errstate(all="ignore"):  # np.log(0) and the like warn; check_design says which term it was
        try:
            y, x = patsy.dmatrices(formula, data, return_type="dataframe", NA_action="drop")
            check_design(formula, y, x)
            return smf.ols(formula, data)
        except (patsy.PatsyError, NameError, SyntaxError, TypeError, ValueError, KeyError, AttributeError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__  # patsy adds lines with a caret
            raise GridError(f"the formula {formula!r} does not fit the grid's columns: {why}") from None


def response_of(formula: str) -> str:
    """The left-hand side of a formula (``m_ssim`` in ``m_ssim ~ C(loss)``)."""
    if "~" not in formula:
        raise GridError(f"a formula needs a response and '~', as in 'm_ssim ~ C(loss) + depth'; got {formula!r}")
    response = formula.split("~", 1)[0].strip()
    if not response:
        raise GridError(f"the formula {formula!r} has no response: name the outcome to model left of '~', as in "
                        f"'m_ssim ~ C(loss) + depth'")
    return response


def robust_cov_type(model, notes: list[str]) -> str:
    """HC3, unless some row has leverage 1 (a level seen once), where HC3 divides by zero: then HC1."""
    q, _ = np.linalg.qr(unit_columns(model.exog))
    leverage = np.einsum("ij,ij->i", q, q)
    if leverage.max() > 1 - 1e-8:
        notes.append(
            f"{int((leverage > 1 - 1e-8).sum())} row(s) determine their own fit (a level or combination seen once): "
            "HC3 is undefined there, so HC1 robust standard errors are used"
        )
        return "HC1"
    return "HC3"


def anova_table(result, cov_type: str = "HC3") -> pd.DataFrame:
    """Type-II ANOVA: one row per term (``term, df, sum_sq, F, p_value``), Wald tests with the robust covariance."""
    table = anova_lm(result, typ=2, robust=cov_type.lower())
    table = table.rename(columns={"PR(>F)": "p_value"}).reset_index(names="term")
    return table[["term", "df", "sum_sq", "F", "p_value"]]
