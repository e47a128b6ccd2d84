"""The figures the study showed, each a function of the DataFrame that returns a matplotlib Figure.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), so they display in a notebook
and save without a display. Scatter plots draw at most :data:`MAX_POINTS` points (a random sample,
said in the title) and per-parameter panels at most :data:`MAX_PANELS` parameters.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gridrunner.analysis.failure import failure_rates
from gridrunner.analysis.fit import Fit, pretty_term
from gridrunner.analysis.history import curve_key, read_history
from gridrunner.analysis.rows import FAILED, STATE, ensure_labelled, params_of, resolve_goal, resolve_metric
from gridrunner.analysis.tables import level_labels

MAX_POINTS = 5_000
MAX_PANELS = 12
MAX_CURVES = 5
SUCCESS_COLOUR, FAILURE_COLOUR = "#1f77b4", "#d62728"


def _time_unit(seconds: pd.Series) -> tuple[float, str]:
    """A divisor and unit name so that typical runtimes read as small numbers."""
    typical = float(seconds.median()) if len(seconds) else 0.0
    if typical >= 2 * 3600:
        return 3600.0, "hours"
    if typical >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _figure(width: float = 7.0, height: float = 4.5) -> Figure:
    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def plain(text) -> str:
    """``text`` as matplotlib draws it literally: every ``$`` escaped, so a level such as ``$x^$`` is never
    parsed as mathtext (which fails on it, or draws something else). Every text a figure draws from the
    grid (levels, names, notes) passes through here; gridrunner's own texts use no mathtext."""
    return str(text).replace("$", r"\$")


def message_figure(title: str, message: str) -> Figure:
    """A figure that only says something (no data to draw, or data that cannot be drawn)."""
    return _empty(title, message)


def _empty(title: str, message: str) -> Figure:
    fig = _figure(6, 2.5)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(plain(title))
    ax.text(0.5, 0.5, plain(message), ha="center", va="center", wrap=True)
    return fig


def runtime_histogram(df: pd.DataFrame) -> Figure:
    """Histogram of the runtime of every row that ran."""
    runtime = df["runtime_s"].dropna()
    title = "Runtime per row"
    if runtime.empty:
        return _empty(title, "No row has a runtime yet.")
    scale, unit = _time_unit(runtime)
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(runtime / scale, bins=min(50, max(5, int(math.sqrt(len(runtime))))), color=SUCCESS_COLOUR, edgecolor="white")
    ax.set_xlabel(f"runtime ({unit})")
    ax.set_ylabel("rows")
    ax.set_title(f"{title}: {len(runtime):,} rows, median {runtime.median() / scale:.3g} {unit}, total {runtime.sum() / 3600:,.1f} h")
    return fig


def _sample(frame: pd.DataFrame, limit: int = MAX_POINTS, seed: int = 0) -> tuple[pd.DataFrame, str]:
    if len(frame) <= limit:
        return frame, ""
    return frame.sample(limit, random_state=seed), f" ({limit:,} of {len(frame):,} rows drawn at random)"


def metric_vs_runtime(df: pd.DataFrame, metric: str | None = None, failure: str | None = None, goal: str | None = None, budgets: pd.DataFrame | None = None) -> Figure:
    """The metric against runtime; rows that failed by the rule are marked, the Pareto front of metric
    against runtime is a step line, and the best row within each runtime budget (``budgets``, from
    :func:`analysis.compute.budget_table`) is circled."""
    from gridrunner.analysis.compute import pareto_front

    df = ensure_labelled(df, failure)
    metric = resolve_metric(df, metric)
    goal = resolve_goal(df, metric, goal)
    rows = df[df[metric].notna() & df["runtime_s"].notna()]
    title = f"{metric} vs runtime"
    if rows.empty:
        return _empty(title, f"No row has both {metric} and a runtime.")
    front = pareto_front(df, metric, goal)
    rows, sampled = _sample(rows)
    scale, unit = _time_unit(rows["runtime_s"])
    fig = _figure()
    ax = fig.add_subplot()
    for state, colour, marker, label in (("success", SUCCESS_COLOUR, "o", "succeeded"), ("failed_rule", FAILURE_COLOUR, "x", "failed by rule")):
        part = rows[rows[STATE].eq(state)]
        if len(part):
            ax.scatter(part["runtime_s"] / scale, part[metric], s=12, alpha=0.6, c=colour, marker=marker, label=f"{label} ({len(part):,})")
    if len(front):
        ax.step(front["runtime_s"] / scale, front[metric], where="post", color="black", linewidth=1, label=f"Pareto front ({len(front)} rows)")
        ax.scatter(front["runtime_s"] / scale, front[metric], s=22, c="black", marker="D", zorder=3)
    if budgets is not None and len(budgets):
        ax.scatter(budgets["runtime_s"] / scale, budgets[metric], s=120, facecolors="none", edgecolors="#ff7f0e", linewidths=1.5,
                   zorder=4, label="best within a budget")
    ax.set_xlabel(f"runtime ({unit})")
    ax.set_ylabel(plain(metric))
    ax.set_title(plain(title + sampled))
    ax.legend(loc="best", fontsize="small")
    return fig


def _panels(count: int, width_each: float = 4.2, height_each: float = 3.3):
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    fig = _figure(width_each * ncols, height_each * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.axis("off")
    return fig, axes[:count]


def _varying(df: pd.DataFrame, params: list[str] | None) -> list[str]:
    params = params_of(df) if params is None else params
    return [p for p in params if df[p].nunique() > 1][:MAX_PANELS]


def _tick_labels(ax, labels, counts=None):
    """Level names under the ticks, with ``n=`` counts where they fit; long or many names are slanted."""
    rotate = max((len(str(label)) for label in labels), default=0) * len(labels) > 40
    text = [plain(label) if counts is None or rotate else f"{plain(label)}\nn={n:,}" for label, n in zip(labels, counts if counts is not None else labels)]
    ax.set_xticks(range(1, len(labels) + 1) if counts is not None else range(len(labels)))
    ax.set_xticklabels(text, rotation=30 if rotate else 0, ha="right" if rotate else "center", fontsize="small")


def metric_by_parameter(df: pd.DataFrame, metric: str | None = None, failure: str | None = None, params: list[str] | None = None) -> Figure:
    """Box plots of the metric per level of each parameter, over successful rows (one panel per parameter)."""
    df = ensure_labelled(df, failure)
    metric = resolve_metric(df, metric)
    rows = df[df[STATE].eq("success") & df[metric].notna()]
    params = _varying(rows, params)
    title = f"{metric} by parameter (successful rows)"
    if rows.empty or not params:
        return _empty(title, "No successful row, or no parameter varies among them.")
    fig, axes = _panels(len(params))
    for ax, param in zip(axes, params):
        levels = level_labels(rows[param])
        groups = [rows.loc[levels == level, metric].to_numpy() for level in levels.cat.categories]
        keep = [i for i, g in enumerate(groups) if len(g)]
        ax.boxplot([groups[i] for i in keep], widths=0.6, showfliers=len(rows) <= 20_000, flierprops={"markersize": 2})
        _tick_labels(ax, [levels.cat.categories[i] for i in keep], [len(groups[i]) for i in keep])
        ax.set_xlabel(plain(param))
        ax.set_ylabel(plain(metric))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(plain(title))
    return fig


def failure_rate_by_parameter(df: pd.DataFrame, failure: str | None = None, params: list[str] | None = None) -> Figure:
    """Failure rate per level of each parameter with 95 % Wilson intervals, over finished rows."""
    df = ensure_labelled(df, failure)
    finished = df[df[FAILED].notna()]
    params = _varying(finished, params)
    title = "Failure rate by parameter (finished rows, 95% Wilson intervals)"
    if finished.empty or not params:
        return _empty(title, "No finished row, or no parameter varies among them.")
    rates = failure_rates(df, params=params)
    fig, axes = _panels(len(params))
    for ax, param in zip(axes, params):
        part = rates[rates["param"] == param]
        position = np.arange(len(part))
        rate = part["failure_rate"].to_numpy()
        error = np.clip(np.vstack([rate - part["ci_low"].to_numpy(), part["ci_high"].to_numpy() - rate]), 0, None)
        ax.bar(position, 100 * rate, color=FAILURE_COLOUR, alpha=0.75, yerr=100 * error, capsize=3, ecolor="#444")
        for x, k, n in zip(position, part["failures"], part["finished"]):
            ax.text(x, 1, f"{k}/{n}", ha="center", va="bottom", fontsize="x-small", color="white" if k else "#444")
        _tick_labels(ax, list(part["level"]))
        ax.set_ylim(0, min(100, max(5, 100 * part["ci_high"].max() * 1.1)))
        ax.set_xlabel(plain(param))
        ax.set_ylabel("failed (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return fig


def metric_histogram(df: pd.DataFrame, metric: str | None = None, by: str | None = None, failure: str | None = None, thresholds=(), benchmark: float | None = None) -> Figure:
    """Histogram of the metric over every row that has it (failed by rule included), one panel per level
    of ``by``, with the failure rule's thresholds as dashed lines and the ``benchmark`` (the score of
    the undersampled input, :func:`analysis.rows.benchmark_value`) as a dotted one."""
    df = ensure_labelled(df, failure)
    metric = resolve_metric(df, metric)
    rows = df[df[metric].notna()]
    title = f"{metric} of every finished row" + (f", by {by}" if by else "")
    if rows.empty:
        return _empty(title, f"No row has a value of {metric}.")
    levels = level_labels(rows[by]) if by else pd.Series(pd.Categorical(["all"] * len(rows)), index=rows.index)
    categories = [c for c in levels.cat.categories if (levels == c).any()][:MAX_PANELS]
    fig, axes = _panels(len(categories), 4.2, 3.0)
    bins = np.histogram_bin_edges(rows[metric], bins=40)
    for ax, level in zip(axes, categories):
        part = rows[levels == level]
        ok = part.loc[part[STATE].eq("success"), metric]
        bad = part.loc[~part[STATE].eq("success"), metric]
        ax.hist([ok, bad], bins=bins, stacked=True, color=[SUCCESS_COLOUR, FAILURE_COLOUR], label=["succeeded", "failed by rule"])
        for threshold in thresholds:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        if benchmark is not None:
            ax.axvline(benchmark, color="grey", linestyle=":", linewidth=1.5)
        share = f"{len(ok) / len(part):.0%} succeeded" if len(part) else ""
        ax.set_title(plain(f"{by}={level}: {share}" if by else share), fontsize="medium")
        ax.set_xlabel(plain(metric))
        ax.set_ylabel("rows")
    axes[0].legend(fontsize="small", loc="best")
    lines = [f"dashed: failure threshold {', '.join(f'{t:g}' for t in thresholds)}"] if thresholds else []
    if benchmark is not None:
        lines.append(f"dotted: benchmark {benchmark:.3g}")
    line = f" ({'; '.join(lines)})" if lines else ""
    fig.suptitle(plain(title + line))
    return fig


#: Validation metrics that every row logs on one scale whatever its training loss (the MRI tasks log them
#: every ``eval_every`` steps); preferred, in this order, over the training ``loss``.
SHARED_CURVES = ("val_ssim", "val_mae")


def curve_panels(df: pd.DataFrame) -> str | None:
    """The parameter whose levels put the training loss on different scales (``loss``), if the grid has one."""
    params = [p for p in params_of(df) if df[p].nunique() > 1]
    for param in params:
        if param.lower() == "loss":
            return param
    for param in params:
        if "loss" in param.lower():
            return param
    return None


def learning_curves(df: pd.DataFrame, metric: str | None = None, failure: str | None = None, n: int = MAX_CURVES, goal: str | None = None) -> Figure:
    """Logged curves of the ``n`` best runs against ``n`` failed runs, on one scale.

    Where the rows log a validation metric they all share (:data:`SHARED_CURVES`), that metric is drawn,
    on one axis. Otherwise the training ``loss`` (else the first logged metric) is drawn in one panel per
    level of the parameter that sets the loss (:func:`curve_panels`), so that an SSIM loss near 0.5 and an
    L1 loss near 0.01 are never read on one axis; the best and failed runs are chosen per panel.
    """
    df = ensure_labelled(df, failure)
    metric = resolve_metric(df, metric)
    goal = resolve_goal(df, metric, goal)
    grid_dir = df.attrs.get("grid_dir")
    success_all = df[df[STATE].eq("success") & df[metric].notna()].sort_values(metric, ascending=goal == "min", kind="stable")
    failed_all = df[df[FAILED].eq(1.0)].sort_values("finished_at", ascending=False, kind="stable")

    def histories(rows):
        out = []
        for row_id in rows["row_id"]:
            history = read_history(grid_dir, row_id) if grid_dir else pd.DataFrame()
            if "step" in history.columns and len(history):
                out.append(history)
            else:
                out.append(None)
        return out

    best, bad = success_all.head(n), failed_all.head(n)
    first = [h for h in histories(best) + histories(bad) if h is not None]
    shared = _shared_key(first, metric)
    by = None if shared else curve_panels(df)
    groups = [(None, best, bad)]
    if by is not None:
        levels = level_labels(df[by])
        groups = [(level, success_all[levels.loc[success_all.index] == level].head(n), failed_all[levels.loc[failed_all.index] == level].head(n))
                  for level in levels.cat.categories if (levels == level).any()][:MAX_PANELS]
    title = f"Learning curves: the {n} best runs by {metric} vs {n} failed runs" + (f", per {by}" if by else "")
    panels = []
    for level, good, failed in groups:
        curves = []
        for rows, colour, label in ((good, SUCCESS_COLOUR, "best"), (failed, FAILURE_COLOUR, "failed")):
            for history in histories(rows):
                if history is None:
                    continue
                key = shared if shared in history.columns else (None if shared else curve_key(history))
                if key is None:
                    continue
                points = history[["step", key]].apply(pd.to_numeric, errors="coerce").dropna()
                if len(points):
                    curves.append((points["step"], points[key], colour, label, key))
        if curves:
            panels.append((level, curves))
    if not panels:
        return _empty(title, "No row of these has a logged history (rows/<row_id>/history.jsonl).")
    fig, axes = _panels(len(panels), 5.0, 3.6) if by else _panels(1, 7.0, 4.5)
    for ax, (level, curves) in zip(axes, panels):
        seen = set()
        for step, value, colour, label, key in curves:
            ax.plot(step, value, color=colour, alpha=0.8, linewidth=1.2, label=None if label in seen else label)
            seen.add(label)
        values = pd.concat([c[1] for c in curves]).astype(float)
        if (values > 0).all() and values.max() / values.min() > 100:
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(plain(", ".join(sorted({c[4] for c in curves}))))
        if by:
            ax.set_title(plain(f"{by}={level}"), fontsize="medium")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    if shared:
        title += f" ({shared}, which every row logs on one scale)"
    fig.suptitle(plain(title))
    return fig


def _shared_key(histories: list[pd.DataFrame], metric: str) -> str | None:
    """The validation metric that every one of ``histories`` logs, preferring the one that matches ``metric``."""
    if not histories:
        return None
    common = [key for key in SHARED_CURVES if all(key in h.columns and h[key].notna().any() for h in histories)]
    if not common:
        return None
    matching = [key for key in common if key.removeprefix("val_") in metric]
    return (matching or common)[0]


def coefficient_plot(fit: Fit, xlabel: str | None = None) -> Figure:
    """Estimates with 95 % intervals, one line per term (intercept left out); significant terms are dark.

    A numeric term is drawn as its effect over its whole range (``filters 16→128``), so that every
    line is on the scale of the outcome and the lines can be compared.
    """
    title = f"{fit.title}: {fit.method}"
    table = fit.table[fit.table["term"] != "Intercept"].reset_index(drop=True)
    if table.empty:
        return _empty(fit.title, "; ".join(fit.notes[-2:]) or "No model was fitted.")
    baselines = fit.baselines
    labels, spans = [], []
    for term in table["term"]:
        low, high = _column_range(fit, term)
        binary = low is None or {low, high} <= {0.0, 1.0}
        spans.append(1.0 if binary else high - low)
        labels.append(pretty_term(term, baselines) + ("" if binary else f" {low:g}→{high:g}"))
    span = np.asarray(spans)
    estimate, low, high = (table[c].to_numpy() * span for c in ("estimate", "ci_low", "ci_high"))
    fig = _figure(7.5, 1.4 + 0.38 * len(table))
    ax = fig.add_subplot()
    position = np.arange(len(table))[::-1]
    significant = (table["p_value"] < 0.05).to_numpy()
    for mask, colour in ((significant, "#222"), (~significant, "#aaa")):
        if mask.any():
            ax.errorbar(estimate[mask], position[mask], xerr=np.vstack([estimate[mask] - low[mask], high[mask] - estimate[mask]]), fmt="o", color=colour, capsize=3)
    ax.axvline(0, color=FAILURE_COLOUR, linewidth=0.8)
    ax.set_yticks(position)
    ax.set_yticklabels([plain(label) for label in labels], fontsize="small")
    xlabel = xlabel or "estimate (95% interval; dark: p < 0.05)"
    if (span != 1.0).any():
        xlabel += "\nnumeric terms: the effect of moving from their lowest to their highest value"
    ax.set_xlabel(plain(xlabel))
    ax.set_title(plain(title), fontsize="medium", wrap=True)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _column_range(fit: Fit, term: str):
    """The smallest and largest value of a term's design column, or (None, None) where it is unknown."""
    names = fit.columns or (list(fit.result.model.exog_names) if fit.result is not None else [])
    if fit.result is None or term not in names:
        return None, None
    column = fit.result.model.exog[:, names.index(term)]
    return float(np.min(column)), float(np.max(column))
