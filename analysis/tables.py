"""Tables that need no model: the best configurations, and the metric, failures and runtime per level."""
from __future__ import annotations

import numpy as np
import pandas as pd

from gridrunner.analysis.rows import FAILED, RANK, STATE, ensure_labelled, outcomes_of, params_of, resolve_goal, resolve_metric

#: A numeric parameter with more distinct values than this is grouped into this many quantile bins.
MAX_LEVELS = 12


def level_labels(series: pd.Series, max_levels: int = MAX_LEVELS) -> pd.Series:
    """The levels a table or plot groups by: the values themselves, or quantile bins of a numeric column
    with more than ``max_levels`` distinct values (labelled ``"0.1–0.3"``, right edge included). Ordered, missing as ``"(missing)"``.
    """
    numeric = pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype)
    if numeric and series.nunique() > max_levels:
        binned = pd.qcut(series, max_levels, duplicates="drop")
        labels = [f"{iv.left:.3g}–{iv.right:.3g}" for iv in binned.cat.categories]
        return _with_missing(binned.cat.rename_categories(labels))
    if numeric:
        order = sorted(series.dropna().unique())
        levels = pd.Categorical(series, categories=order, ordered=True).rename_categories([_label(v) for v in order])
        return _with_missing(pd.Series(levels, index=series.index))
    if isinstance(series.dtype, pd.CategoricalDtype):
        names = [str(c) for c in series.cat.categories]
        if len(set(names)) == len(names):  # the usual case: relabel the codes, never the rows
            codes = series.cat.codes.to_numpy()
            present = np.unique(codes[codes >= 0])
            remap = np.full(len(names) + 1, -1, dtype=np.int64)
            remap[present] = np.arange(len(present))
            categorical = pd.Categorical.from_codes(remap[codes], categories=[names[i] for i in present], ordered=True)
            return _with_missing(pd.Series(categorical, index=series.index))
    values = series.astype(str).where(series.notna(), None)
    order = sorted(set(values.dropna()))
    return _with_missing(pd.Series(pd.Categorical(values, categories=order, ordered=True), index=series.index))


#: The level of a row that has no value of a parameter (its sub-grid lacks it).
MISSING_LEVEL = "(not set)"


def _with_missing(labels: pd.Series) -> pd.Series:
    """``labels`` with missing values as the last level, :data:`MISSING_LEVEL`, so every row has a level."""
    if labels.isna().any():
        if MISSING_LEVEL not in labels.cat.categories:
            labels = labels.cat.add_categories([MISSING_LEVEL])
        labels = labels.fillna(MISSING_LEVEL)
    return labels


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def top_configurations(df: pd.DataFrame, metric: str | None = None, k: int = 10, goal: str | None = None, failure: str | None = None) -> pd.DataFrame:
    """The ``k`` best successful rows by ``metric``: ``rank``, the parameters, every outcome, ``runtime_s``, ``row_id``."""
    df = ensure_labelled(df, failure)
    metric = resolve_metric(df, metric)
    goal = resolve_goal(df, metric, goal)
    success = df[df[STATE].eq("success") & df[metric].notna()]
    best = success.sort_values(metric, ascending=goal == "min", kind="stable").head(k)
    columns = params_of(df) + [o for o in outcomes_of(df)] + ["runtime_s", "row_id"]
    table = best[[c for c in columns if c in best.columns]].reset_index(drop=True)
    table.insert(0, RANK, np.arange(1, len(table) + 1))
    return table


def level_summary(df: pd.DataFrame, metric: str | None = None, failure: str | None = None) -> pd.DataFrame:
    """Per parameter and level: rows, finished, failures, failure rate, and the metric's mean, median and IQR
    over successful rows. Columns: ``param, level, rows, finished, failures, failure_rate, n_success,
    mean, median, q25, q75, iqr``.
    """
    df = ensure_labelled(df, failure)
    metric = resolve_metric(df, metric)
    value = df[metric].where(df[STATE].eq("success"))
    frames = []
    for param in params_of(df):
        groups = level_labels(df[param])
        by = pd.DataFrame({"level": groups, "failed": df[FAILED], "value": value}).groupby("level", observed=True)
        table = by.agg(
            rows=("failed", "size"),
            finished=("failed", "count"),
            failures=("failed", "sum"),
            n_success=("value", "count"),
            mean=("value", "mean"),
            median=("value", "median"),
            q25=("value", lambda v: v.quantile(0.25)),
            q75=("value", lambda v: v.quantile(0.75)),
        ).reset_index()
        table["failures"] = table["failures"].astype(int)
        table["failure_rate"] = table["failures"] / table["finished"].where(table["finished"] > 0)
        table["iqr"] = table["q75"] - table["q25"]
        table.insert(0, "param", param)
        table["level"] = table["level"].astype(str)
        frames.append(table)
    columns = ["param", "level", "rows", "finished", "failures", "failure_rate", "n_success", "mean", "median", "q25", "q75", "iqr"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def runtime_by_level(df: pd.DataFrame) -> pd.DataFrame:
    """Runtime per parameter level over rows that ran: ``param, level, runs, mean_s, median_s, max_s, total_h``."""
    ran = df[df["runtime_s"].notna()]
    frames = []
    for param in params_of(df):
        by = ran.groupby(level_labels(ran[param]), observed=True)["runtime_s"]
        table = by.agg(runs="size", mean_s="mean", median_s="median", max_s="max", total_s="sum").reset_index(names="level")
        table["total_h"] = table.pop("total_s") / 3600
        table.insert(0, "param", param)
        table["level"] = table["level"].astype(str)
        frames.append(table)
    columns = ["param", "level", "runs", "mean_s", "median_s", "max_s", "total_h"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
