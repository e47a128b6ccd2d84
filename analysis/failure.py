"""The failure model: which hyperparameters make training fail.

A logit of ``failed`` on the hyperparameters, over finished rows, with effects reported as average
marginal effects (AME: the mean change in failure probability, statsmodels ``get_margeff``). Grids
often separate: in the study every one of 79 failures used the SSIM loss, so the logit's estimate for
that level is infinite. :func:`separation` says so in words; the model then falls back to

* Firth's penalised logit (Firth 1993; the Jeffreys-prior penalty ½·log det I(β)), which gives finite
  estimates under separation. Its AMEs and their delta-method intervals use the covariance I(β̂)⁻¹;
* a linear probability model (OLS of ``failed``) with HC3 robust errors, whose coefficients are
  themselves changes in failure probability.

Per-level failure rates (Wilson intervals) and per-pair rates where an interaction stands out
complete the picture; they need no model.
"""
from __future__ import annotations

import itertools
import re
import warnings

import numpy as np
import pandas as pd
import patsy
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import special, stats

from gridrunner.analysis.fit import Fit, baselines_of, check_design, coefficient_table, result_table
from gridrunner.analysis.outcome import robust_cov_type
from gridrunner.analysis.rows import FAILED, REPLICATE_PARAMS, dropped_reasons, ensure_labelled, params_of
from gridrunner.analysis.tables import level_labels
from gridrunner.analysis.terms import choose_terms, describe_value, formula_notes, is_numeric
from gridrunner.errors import GridError

#: Symptoms of separation in an ordinary logit fit: any |log-odds| above this, or fitted probabilities this close to 0 or 1.
HUGE_LOG_ODDS = 15.0
EDGE_PROBABILITY = 1e-8


def failure_model(df: pd.DataFrame, failure: str | None = None, formula: str | None = None) -> Fit:
    """Logit of failure on the hyperparameters over finished rows; Firth and LPM fallbacks under separation.

    ``table`` holds average marginal effects on the failure probability; ``extra`` holds the log-odds
    coefficients (``logit`` or ``firth_logit``), the linear probability model (``lpm``, under
    separation) and penalised or ordinary likelihood-ratio tests per term (``term_tests``).
    """
    df = ensure_labelled(df, failure)
    finished = df[FAILED].notna()
    data = df[finished]
    dropped = dropped_reasons(df, finished, {"not finished": df[FAILED].isna()})
    fit = Fit("Failure model", "logit; average marginal effects on the failure probability", formula, len(data), len(df), dropped)
    rule = df.attrs.get("failure")
    fit.notes.append(f"failed = raised, died{f', or matched {rule!r}' if rule else ''}")
    failures = int(data[FAILED].sum())
    if len(data) == 0:
        fit.reason = "no row has finished"
        fit.notes.append(f"{fit.reason}: nothing to model")
        return fit
    if failures == 0 or failures == len(data):
        fit.reason = f"{'no' if failures == 0 else 'every'} finished row failed"
        fit.notes.append(f"{fit.reason}: nothing to model")
        return fit
    display = lambda name: name  # noqa: E731
    if formula is None:
        terms = choose_terms(data, FAILED)
        fit.notes.extend(terms.notes)
        fit.formula = terms.formula
        params = terms.params
        display, model_formula, frame = terms.display, terms.internal_formula, terms.frame(data)
    else:
        params = [p for p in params_of(df) if re.search(rf"\b{re.escape(p)}\b", formula.split("~", 1)[-1])]
        model_formula, frame = formula, data
    try:
        with np.errstate(all="ignore"):  # np.log(0) and the like: check_design names the term
            y, x = patsy.dmatrices(model_formula, frame, return_type="dataframe", NA_action="drop")
    except (patsy.PatsyError, NameError, SyntaxError, TypeError, ValueError, KeyError, AttributeError) as err:
        raise GridError(f"the failure formula {fit.formula!r} does not fit the grid's columns: {err}") from None
    if formula is not None:
        check_design(formula, y, x, "failure formula")
    if len(y) <= x.shape[1]:
        fit.reason = f"{len(y)} finished rows for {x.shape[1]} coefficients"
        fit.notes.append(f"too few rows: {fit.reason}; no model fitted")
        return fit
    if failures < 10:
        fit.notes.append(f"only {failures} failures: effects are estimated imprecisely")
    sentences = separation(data, params)
    result = None if sentences else _logit(model_formula, frame, sentences)
    if result is not None:
        fit.result = result
        fit.notes.extend(formula_notes(result, display))
        fit.columns = [display(name) for name in result.model.exog_names]
        fit.baselines = baselines_of(result, display)
        fit.table = margeff_table(result, display=display)
        fit.extra["logit"] = result_table(result, display)
        tests = term_tests(lambda cols: _loglik_logit(y, x, cols), x)
        tests["term"] = tests["term"].map(display)
        fit.extra["term_tests"] = tests
        return fit
    fit.notes.extend(sentences)
    fit.method = "Firth penalised logit (separation); average marginal effects on the failure probability"
    beta, cov, converged, _ = firth_logit(x.to_numpy(float), y.to_numpy(float).ravel())
    if not converged:
        fit.notes.append("Firth's logit did not converge in 100 iterations: read its estimates with care")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logit_model = smf.logit(model_formula, frame)
        firth = logit_model.fit(start_params=beta, method="newton", maxiter=0, disp=0, warn_convergence=False)
    fit.result = firth
    fit.columns = [display(name) for name in firth.model.exog_names]
    fit.baselines = baselines_of(firth, display)
    fit.table = margeff_table(firth, cov, display=display)
    fit.extra["firth_logit"] = coefficient_table(beta, np.sqrt(np.diag(cov)), [display(c) for c in x.columns])
    tests = term_tests(lambda cols: _loglik_firth(y, x, cols), x)
    tests["term"] = tests["term"].map(display)
    fit.extra["term_tests"] = tests
    lpm = smf.ols(model_formula, frame)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lpm_result = lpm.fit(cov_type=robust_cov_type(lpm, fit.notes))
    fit.extra["lpm"] = result_table(lpm_result, display)
    fit.notes.append(
        "fell back to Firth's penalised logit (Jeffreys-prior penalty ½·log det I(β), Wald intervals) and a "
        "linear probability model with HC3 errors (failure_lpm.csv)"
    )
    return fit


def _logit(formula: str, data: pd.DataFrame, sentences: list[str]):
    """An ordinary logit fit, or None (with a sentence appended) where it shows signs of separation."""
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationError, PerfectSeparationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            result = smf.logit(formula, data).fit(disp=0, maxiter=100)
        except (PerfectSeparationError, PerfectSeparationWarning, np.linalg.LinAlgError):
            sentences.append("the logit's fitted probabilities reach 0 or 1: the parameters jointly separate failures from successes")
            return None
    fitted = result.predict()
    converged = result.mle_retvals.get("converged", True)
    if not converged or np.abs(result.params).max() > HUGE_LOG_ODDS or ((fitted < EDGE_PROBABILITY) | (fitted > 1 - EDGE_PROBABILITY)).any():
        sentences.append(
            "the logit did not settle (log-odds estimates grow without bound): the parameters jointly separate "
            "failures from successes"
        )
        return None
    return result


def separation(data: pd.DataFrame, params: list[str]) -> list[str]:
    """Sentences for every parameter that (quasi-)separates failures from successes; empty when none does.

    A level with no failure, or with nothing but failures, makes the logit's estimate for that level
    infinite when the parameter is a grid level (``C(loss)``); a threshold on a numeric parameter that
    splits failures from successes does the same for a linear term.
    """
    failed = data[FAILED].eq(1.0)
    sentences = []
    for param in params:
        column = data[param]
        if is_numeric(column) and column.nunique() > 2:
            low, high = column[failed], column[~failed]
            if low.min() > high.max():
                sentences.append(f"every failure has {param} > {describe_value(high.max())}, and no success does")
            elif low.max() < high.min():
                sentences.append(f"every failure has {param} < {describe_value(high.min())}, and no success does")
            continue
        counts = pd.DataFrame({"level": column, "failed": failed}).groupby("level", observed=True)["failed"].agg(["sum", "size"])
        with_failures = counts.index[counts["sum"] > 0]
        if len(with_failures) == 1:
            level = describe_value(with_failures[0])
            total = int(counts["sum"].sum())
            sentence = f"every failure has {param}={level} ({total} of {total})"
            if counts.loc[with_failures[0], "sum"] == counts.loc[with_failures[0], "size"]:
                sentence += f", and every row with {param}={level} failed"
            sentences.append(sentence)
            continue
        none = [describe_value(v) for v in counts.index[counts["sum"] == 0]]
        every = [describe_value(v) for v in counts.index[counts["sum"] == counts["size"]]]
        if none:
            sentences.append(f"no row with {param}={' or '.join(none)} failed")
        if every:
            sentences.append(f"every row with {param}={' or '.join(every)} failed")
    return sentences


def firth_logit(x: np.ndarray, y: np.ndarray, fixed: np.ndarray | None = None, maxiter: int = 100, tol: float = 1e-8):
    """Firth's bias-reduced logit by Newton steps with step halving: ``(beta, covariance, converged, penalised_loglik)``.

    Maximises ℓ(β) + ½·log det(XᵀWX). The modified score is Xᵀ(y − p + h·(½ − p)) with h the hat
    values (Heinze and Schemper 2002); the covariance is (XᵀWX)⁻¹ at the estimate. Columns in the
    boolean mask ``fixed`` stay at 0 while the penalty still uses every column (the constrained fit of
    a penalised likelihood-ratio test).
    """
    free = np.ones(x.shape[1], bool) if fixed is None else ~np.asarray(fixed, bool)
    beta = np.zeros(x.shape[1])

    def penalised(b):
        eta = x @ b
        p = special.expit(eta)
        info = (x * (p * (1 - p))[:, None]).T @ x
        sign, logdet = np.linalg.slogdet(info)
        loglik = np.sum(y * eta - np.logaddexp(0, eta))
        return (loglik + 0.5 * logdet if sign > 0 else -np.inf), p, info

    current, p, info = penalised(beta)
    converged = False
    for _ in range(maxiter):
        cov = np.linalg.pinv(info)
        weighted = x * np.sqrt(p * (1 - p))[:, None]
        hat = np.einsum("ij,jk,ik->i", weighted, cov, weighted)
        score = x[:, free].T @ (y - p + hat * (0.5 - p))
        step = np.zeros_like(beta)
        step[free] = np.linalg.pinv(info[np.ix_(free, free)]) @ score
        step *= min(1.0, 5.0 / max(np.abs(step).max(), 1e-300))  # at most 5 log-odds per step
        for _halving in range(30):
            candidate, p_new, info_new = penalised(beta + step)
            if candidate >= current - 1e-12:
                break
            step /= 2
        beta, current, p, info = beta + step, candidate, p_new, info_new
        if np.abs(step).max() < tol:
            converged = True
            break
    return beta, np.linalg.pinv(info), converged, current


def _loglik_logit(y, x, columns) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sm.Logit(y.to_numpy(float).ravel(), x.iloc[:, columns].to_numpy(float)).fit(disp=0, maxiter=100).llf)


def _loglik_firth(y, x, columns) -> float:
    fixed = np.ones(x.shape[1], bool)
    fixed[columns] = False
    return float(firth_logit(x.to_numpy(float), y.to_numpy(float).ravel(), fixed=fixed)[3])


def term_tests(loglik, x: pd.DataFrame) -> pd.DataFrame:
    """A likelihood-ratio test per term: refit with the term's coefficients at 0 (``term, df, lr_stat, p_value``).

    ``loglik(columns)`` is the maximised (penalised) log-likelihood with only ``columns`` free.
    """
    info = x.design_info
    everything = list(range(x.shape[1]))
    full = loglik(everything)
    rows = []
    for name, columns in info.term_name_slices.items():
        if name == "Intercept":
            continue
        reduced = loglik([c for c in everything if not columns.start <= c < columns.stop])
        statistic = max(2 * (full - reduced), 0.0)
        df = columns.stop - columns.start
        rows.append({"term": name, "df": df, "lr_stat": statistic, "p_value": float(stats.chi2.sf(statistic, df))})
    return pd.DataFrame(rows, columns=["term", "df", "lr_stat", "p_value"])


def margeff_table(result, cov: np.ndarray | None = None, display=lambda name: name) -> pd.DataFrame:
    """Average marginal effects on the failure probability, one row per non-intercept column.

    0/1 columns (grid levels) get the discrete change from the reference level; numeric ones the mean
    derivative. ``cov`` replaces the fit's own covariance (used for Firth's estimate).
    """
    if cov is not None:
        result.normalized_cov_params = cov  # Logit's scale is 1, so this is the covariance itself
        for cached in ("cov_params_default", "bse"):
            result._cache.pop(cached, None)
    if all(name == "Intercept" for name in result.model.exog_names):  # nothing varies: no effect to state
        return pd.DataFrame(columns=["term", "estimate", "ci_low", "ci_high", "p_value", "std_error"])
    margeff = result.get_margeff(at="overall", method="dydx", dummy=True)
    frame = margeff.summary_frame()
    return pd.DataFrame(
        {
            "term": [display(name) for name in frame.index],
            "estimate": frame["dy/dx"].to_numpy(),
            "ci_low": frame["Conf. Int. Low"].to_numpy(),
            "ci_high": frame["Cont. Int. Hi."].to_numpy(),
            "p_value": frame["Pr(>|z|)"].to_numpy(),
            "std_error": frame["Std. Err."].to_numpy(),
        }
    )


def wilson(failures, rows, level: float = 0.95):
    """Wilson score interval for a proportion (arrays in, ``(low, high)`` out; NaN where ``rows`` is 0)."""
    failures, rows = np.asarray(failures, float), np.asarray(rows, float)
    z = stats.norm.ppf(0.5 + level / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = failures / rows
        centre = (rate + z * z / (2 * rows)) / (1 + z * z / rows)
        half = z * np.sqrt(rate * (1 - rate) / rows + z * z / (4 * rows * rows)) / (1 + z * z / rows)
    return centre - half, centre + half


def failure_rates(df: pd.DataFrame, failure: str | None = None, params: list[str] | None = None) -> pd.DataFrame:
    """Failure rate per level of each parameter over finished rows.

    Columns: ``param, level, finished, failures, failure_rate, ci_low, ci_high`` (95 % Wilson interval).
    Numeric parameters with many values are binned (see :func:`analysis.tables.level_labels`).
    """
    df = ensure_labelled(df, failure)
    data = df[df[FAILED].notna()]
    frames = []
    for param in params if params is not None else params_of(df):
        grouped = data.groupby(level_labels(data[param]), observed=True)[FAILED].agg(["size", "sum"])
        low, high = wilson(grouped["sum"], grouped["size"])
        frames.append(
            pd.DataFrame(
                {
                    "param": param,
                    "level": grouped.index.astype(str),
                    "finished": grouped["size"].to_numpy(),
                    "failures": grouped["sum"].to_numpy().astype(int),
                    "failure_rate": (grouped["sum"] / grouped["size"]).to_numpy(),
                    "ci_low": low,
                    "ci_high": high,
                }
            )
        )
    columns = ["param", "level", "finished", "failures", "failure_rate", "ci_low", "ci_high"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def failure_interactions(df: pd.DataFrame, failure: str | None = None, alpha: float = 0.01) -> pd.DataFrame:
    """Which pairs of parameters interact on the failure rate.

    For each pair, an F-test of the linear probability model on the pair's cells against the additive
    model on its two parameters (ordinary least squares; it needs no logit, so separation cannot break
    it). ``stands_out`` is p < ``alpha`` / number of pairs (Bonferroni). Columns:
    ``param_a, param_b, F, df, p_value, stands_out``, strongest first.
    """
    df = ensure_labelled(df, failure)
    data = df[df[FAILED].notna()]
    params = [p for p in params_of(df) if p.lower() not in REPLICATE_PARAMS and data[p].nunique() > 1] if len(data) else []
    y = data[FAILED].to_numpy(float)
    codes = {p: level_labels(data[p]).cat.codes.to_numpy() for p in params}
    rows = []
    pairs = list(itertools.combinations(params, 2))
    for a, b in pairs:
        additive_rss, additive_rank = _additive_rss(y, codes[a], codes[b])
        cells = codes[a].astype(np.int64) * (int(codes[b].max()) + 1) + codes[b]
        cells_rss, n_cells = _within_rss(y, cells)
        df_num = n_cells - additive_rank
        df_den = len(y) - n_cells
        if df_num <= 0 or df_den <= 0:
            continue
        numerator = max(additive_rss - cells_rss, 0.0) / df_num
        if cells_rss <= 1e-12:
            f_stat, p_value = (np.inf, 0.0) if numerator > 1e-12 else (0.0, 1.0)
        else:
            f_stat = numerator / (cells_rss / df_den)
            p_value = float(stats.f.sf(f_stat, df_num, df_den))
        rows.append({"param_a": a, "param_b": b, "F": f_stat, "df": df_num, "p_value": p_value})
    table = pd.DataFrame(rows, columns=["param_a", "param_b", "F", "df", "p_value"])
    table["stands_out"] = table["p_value"] < alpha / max(len(pairs), 1)
    return table.sort_values("p_value", kind="stable").reset_index(drop=True)


def _within_rss(y: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Residual sum of squares of ``y`` around its group means, and the number of groups."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=y)
    return float(y @ y - np.sum(sums**2 / counts)), len(counts)


def _additive_rss(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Residual sum of squares and rank of OLS of ``y`` on intercept + dummies of ``a`` + dummies of ``b``.

    Solved on the cell table (counts and sums per cell), which has the same normal equations as the rows.
    """
    na, nb = int(a.max()) + 1, int(b.max()) + 1  # Python ints: category codes may be int8
    cell = a.astype(np.int64) * nb + b
    counts = np.bincount(cell, minlength=na * nb).astype(float)
    sums = np.bincount(cell, weights=y, minlength=na * nb)
    present = counts > 0
    ia, ib = np.divmod(np.arange(na * nb), nb)
    design = np.zeros((na * nb, na + nb - 1))
    design[:, 0] = 1.0
    design[ia > 0, ia[ia > 0]] = 1.0
    design[ib > 0, na - 1 + ib[ib > 0]] = 1.0
    design, counts, sums = design[present], counts[present], sums[present]
    weight = np.sqrt(counts)
    coef, _, rank, _ = np.linalg.lstsq(design * weight[:, None], sums / weight, rcond=None)
    fitted = design @ coef
    # Σ (y − ŷ_cell)² = Σ y² − 2 Σ ŷ_cell · sum_cell + Σ count · ŷ_cell²
    return float(y @ y - 2 * fitted @ sums + counts @ fitted**2), int(rank)


def pair_rates(df: pd.DataFrame, a: str, b: str, failure: str | None = None) -> pd.DataFrame:
    """Failure rate in each cell of ``a`` × ``b``: ``a, b, finished, failures, failure_rate``."""
    df = ensure_labelled(df, failure)
    data = df[df[FAILED].notna()]
    grouped = data.groupby([level_labels(data[a]).rename(a), level_labels(data[b]).rename(b)], observed=True)[FAILED]
    table = grouped.agg(finished="size", failures="sum").reset_index()
    table["failures"] = table["failures"].astype(int)
    table["failure_rate"] = table["failures"] / table["finished"]
    return table
