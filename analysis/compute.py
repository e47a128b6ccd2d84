"""The compute-aware view: which rows no faster row beats (the Pareto front of metric against runtime),
and the best configuration within each runtime budget.

Over successful rows that have the metric and a runtime. A row is on the front when every row that
ran no longer than it has a worse metric (for ties in runtime, the better metric). Budgets are the
runtimes of the front's rows where there are few, else quantiles of the runtimes (10 %, 25 %, 50 %,
75 % and all rows), each rounded up to two significant digits; the best row within a budget is the
best row whose runtime is at most that budget. Rows are single runs: replicates of one configuration
are separate rows.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gridrunner.analysis.rows import BUDGET, STATE, WITHIN, ensure_labelled, params_of, resolve_goal, resolve_metric

BUDGET_QUANTILES = (0.1, 0.25, 0.5, 0.75, 1.0)


def _candidates(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    return df[df[STATE].eq("success") & df[metric].notna() & df["runtime_s"].notna()]


def pareto_front(df: pd.DataFrame, metric: str | None = None, goal: str | None = None, failure: str | None = None) -> pd.DataFrame:
    """Rows on the front, fastest first: ``runtime_s``, the metric, the parameters, ``row_id``."""
    df = ensure_labelled(df, failure)
    metric = resolve_metric(df, metric)
    goal = resolve_goal(df, metric, goal)
    rows = _candidates(df, metric)
    sign = 1.0 if goal == "max" else -1.0
    score = "(score)"  # not an identifier, so no parameter's or outcome's name
    ordered = rows.assign(**{score: sign * rows[metric]}).sort_values(["runtime_s", score], ascending=[True, False], kind="stable")
    best_before = ordered[score].cummax().shift(1, fill_value=-np.inf)
    front = ordered[ordered[score] > best_before]
    columns = ["runtime_s", metric] + params_of(df) + ["row_id"]
    return front[[c for c in dict.fromkeys(columns) if c in front.columns]].reset_index(drop=True)


def _round_up(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return value
    scale = 10 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / scale - 1e-9) * scale


def budget_table(df: pd.DataFrame, metric: str | None = None, goal: str | None = None, failure: str | None = None) -> pd.DataFrame:
    """Per runtime budget: ``budget_s, rows_within, best`` metric, ``runtime_s``, the parameters, ``row_id``."""
    df = ensure_labelled(df, failure)
    metric = resolve_metric(df, metric)
    goal = resolve_goal(df, metric, goal)
    rows = _candidates(df, metric)
    columns = [BUDGET, WITHIN, metric, "runtime_s"] + params_of(df) + ["row_id"]
    columns = list(dict.fromkeys(columns))
    if rows.empty:
        return pd.DataFrame(columns=columns)
    front = pareto_front(df, metric, goal)
    if len(front) <= len(BUDGET_QUANTILES):
        budgets = sorted(set(front["runtime_s"].astype(float)))
    else:
        budgets = sorted({_round_up(float(rows["runtime_s"].quantile(q))) for q in BUDGET_QUANTILES})
        budgets[-1] = max(budgets[-1], float(rows["runtime_s"].max()))
    runtime = rows["runtime_s"].to_numpy(float)
    out = []
    for budget in budgets:
        within = rows[runtime <= budget + 1e-12]
        if within.empty:
            continue
        best = within.loc[within[metric].idxmax() if goal == "max" else within[metric].idxmin()]
        record = {BUDGET: budget, WITHIN: len(within)}
        record.update({c: best[c] for c in columns if c in best.index and c not in record})
        out.append(record)
    return pd.DataFrame(out, columns=[c for c in columns if c in rows.columns or c in (BUDGET, WITHIN)])


def budget_sentence(table: pd.DataFrame, metric: str) -> str | None:
    """``"best m_ssim within a runtime budget: up to 30 s, 0.91 (12 rows); up to 2 min, 0.95 (40 rows)"``, or None."""
    if table.empty:
        return None
    parts = [f"up to {_seconds(r['budget_s'])}, {r[metric]:.4g} ({r['rows_within']} row{'s' * (r['rows_within'] != 1)})" for _, r in table.iterrows()]
    return f"best {metric} within a runtime budget: " + "; ".join(parts)


def _seconds(value: float) -> str:
    if value >= 7200:
        return f"{value / 3600:.3g} h"
    if value >= 120:
        return f"{value / 60:.3g} min"
    return f"{value:.3g} s"
