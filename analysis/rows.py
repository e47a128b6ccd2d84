"""Which rows a grid has, which of them failed and why, and which ones a model may use.

A row's *state* is one of:

* ``success``: it finished and its outcomes do not match the failure rule;
* ``failed_exception``: it raised or its worker died (``status == failed`` with an ``error`` that is not
  ``rule: ...``); it has no outcomes;
* ``failed_rule``: it finished and its outcomes match the failure rule;
* ``running`` and ``not_run``: it has no result yet.

The failure rule is the spec's (``df.attrs["failure"]``) unless the caller gives another; rows the worker
already marked ``rule: ...`` are judged again under the rule in force, since their outcomes are kept.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from gridrunner.errors import GridError

STATES = ["success", "failed_exception", "failed_rule", "running", "not_run"]
STATE_WORDS = {
    "success": "done",
    "failed_exception": "failed by exception",
    "failed_rule": "failed by rule",
    "running": "running",
    "not_run": "not run",
}
#: Columns :func:`label_rows` adds. ``failed`` is 1.0/0.0 for finished rows and NaN for unfinished ones;
#: ``subgrid`` (unions of sub-grids with different parameters only) names each row's sub-grid group.
STATE, FAILED, SUBGRID = "state", "failed", "subgrid"
#: The column ``top_configurations`` numbers its rows with; ``budget_table``'s budget and row count;
#: ``pair_rates``' counts.
RANK, BUDGET, WITHIN, FINISHED, FAILURES, FAILURE_RATE = "rank", "budget_s", "rows_within", "finished", "failures", "failure_rate"
#: Every column the analysis adds to a frame or puts in a table beside parameters and outcomes. A parameter
#: or outcome with one of these names is shown as ``param_<name>`` or ``outcome_<name>`` (:func:`label_rows`),
#: so no table has two columns of one name.
RESERVED = (STATE, FAILED, SUBGRID, RANK, BUDGET, WITHIN, FINISHED, FAILURES, FAILURE_RATE)
#: The level of a ``null`` value that the spec lists (``dropout: [null, 0.1]``).
NULL_LEVEL = "null"
#: Parameters that number replicates rather than choose a configuration; no model uses them as a term.
REPLICATE_PARAMS = ("seed", "repeat", "replicate")

_MINIMISE_HINTS = ("mae", "mse", "rmse", "loss", "error", "err", "nll", "time", "runtime", "cost", "perplexity")


def params_of(df: pd.DataFrame) -> list[str]:
    """The parameter columns (``df.attrs["params"]``)."""
    params = df.attrs.get("params")
    if params is None:
        raise GridError("the DataFrame has no attrs['params']: load it with gridrunner.load(grid_dir)")
    return [p for p in params if p in df.columns]


def outcomes_of(df: pd.DataFrame) -> list[str]:
    """The outcome columns (``df.attrs["outcomes"]``)."""
    return [o for o in df.attrs.get("outcomes", []) if o in df.columns]


def resolve_metric(df: pd.DataFrame, metric: str | None = None) -> str:
    """The metric to analyse: ``metric``, else the spec's ``metric``, else ``attrs["metric"]``, else the first outcome.

    It must be one of the outcomes; a GridError says so otherwise."""
    outcomes = outcomes_of(df)
    spec = df.attrs.get("spec") or {}
    spec_metric = spec.get("metric") if isinstance(spec, dict) else None
    if isinstance(spec_metric, dict):
        spec_metric = spec_metric.get("name")
    metric = metric or spec_metric or df.attrs.get("metric") or (outcomes[0] if outcomes else None)
    metric = (df.attrs.get("renamed_outcomes") or {}).get(metric, metric)  # the spec's name for it
    if metric is None:
        raise GridError("the grid has no outcome columns yet, so there is no metric to analyse")
    if metric not in outcomes:  # only outcomes are metrics: a parameter or a bookkeeping column is no result to model
        if metric in df.attrs.get("params", []):
            what = f"{metric!r} is a parameter, not an outcome"
        elif metric in df.columns:
            what = f"{metric!r} is not an outcome"
        else:
            what = f"unknown metric {metric!r}"
        raise GridError(f"{what} (outcomes: {', '.join(outcomes) or 'none'})")
    return metric


def resolve_goal(df: pd.DataFrame, metric: str, goal: str | None = None) -> str:
    """``"max"`` or ``"min"``: the spec's ``goal`` (or ``mode``), else a guess from the metric's name."""
    spec = df.attrs.get("spec") or {}
    spec_metric = spec.get("metric") if isinstance(spec, dict) else None
    goal = goal or (spec.get("goal") if isinstance(spec, dict) else None)
    if goal is None and isinstance(spec_metric, dict):
        goal = spec_metric.get("goal") or spec_metric.get("mode")
    if goal is None:
        words = re.split(r"[^a-z0-9]+", metric.lower())
        goal = "min" if any(word in _MINIMISE_HINTS for word in words) else "max"
    goal = {"maximize": "max", "maximise": "max", "minimize": "min", "minimise": "min"}.get(str(goal), str(goal))
    if goal not in ("max", "min"):
        raise GridError(f"goal must be 'max' or 'min', got {goal!r}")
    return goal


def resolve_failure(df: pd.DataFrame, failure: str | None = None) -> str | None:
    """The failure rule in force: ``failure``, else the spec's, else None."""
    return failure if failure is not None else df.attrs.get("failure")


def rule_mask(df: pd.DataFrame, rule: str) -> pd.Series:
    """True where ``rule`` (gridrunner's expression language) fires, judged as the worker judges it.

    Row by row, with :meth:`gridrunner.expr.Expr.evaluate` on the values the worker's rule saw: the row's
    parameters decoded from its shard cells (``attrs["row_params"]``, under the spec's names) and its
    outcomes as Python floats. Unknown (a missing, None or NaN value, text against a number) never fires;
    nor does a row where the rule cannot be evaluated (``log(0)``): the worker records that row as a
    ``RuleError``. :func:`rule_errors` counts those rows.
    """
    return _judge(df, rule)[0]


def rule_errors(df: pd.DataFrame, rule: str) -> tuple[int, str | None]:
    """How many rows ``rule`` cannot be evaluated on (``log()`` of 0), and the first message."""
    _, errors, first = _judge(df, rule)
    return errors, first


def _judge(df: pd.DataFrame, rule: str) -> tuple[pd.Series, int, str | None]:
    from gridrunner.errors import ExprError
    from gridrunner.expr import parse

    expr = parse(rule)
    params = {p: (df.attrs.get("renamed") or {}).get(p, p) for p in _spec_params(df)}  # spec name -> column
    outcomes = {o: (df.attrs.get("renamed_outcomes") or {}).get(o, o) for o in _spec_outcomes(df)}
    expr.check_names(list(params) + list(outcomes), "column")
    expr.check_condition()
    used = expr.names
    decoded = df.attrs.get("row_params")
    ids = df["row_id"].astype(str).tolist() if "row_id" in df.columns else [None] * len(df)
    typed = {name: _python_values(df[column]) for name, column in params.items() if name in used}
    numbers = {name: _python_values(df[column]) for name, column in outcomes.items() if name in used}
    fired, errors, first = [], 0, None
    for i, row_id in enumerate(ids):
        if decoded is not None and row_id in decoded:
            values = decoded[row_id]
        else:  # a frame not from gridrunner.load: its typed values
            values = {name: column[i] for name, column in typed.items() if column[i] is not _ABSENT}
        values.update({name: column[i] for name, column in numbers.items() if column[i] is not _ABSENT})
        try:
            fired.append(expr.evaluate(values) is True)
        except ExprError as err:
            fired.append(False)
            errors += 1
            first = first or str(err)
    return pd.Series(fired, index=df.index, dtype=bool), errors, first


_ABSENT = object()


def _spec_params(df: pd.DataFrame) -> list[str]:
    back = {new: old for old, new in (df.attrs.get("renamed") or {}).items()}
    return [back.get(p, p) for p in params_of(df)]


def _spec_outcomes(df: pd.DataFrame) -> list[str]:
    back = {new: old for old, new in (df.attrs.get("renamed_outcomes") or {}).items()}
    return [back.get(o, o) for o in outcomes_of(df)]


def _python_values(column: pd.Series) -> list:
    """A column as plain Python values (``_ABSENT`` where missing), as a rule reads them: numpy's
    float64 divides by zero into inf, where Python's division gives the rule's NaN."""
    values = column.astype(object).tolist()
    return [_ABSENT if v is None or v is pd.NA or (isinstance(v, float) and v != v) else
            (v.item() if hasattr(v, "item") else v) for v in values]


def label_rows(df: pd.DataFrame, failure: str | None = None) -> pd.DataFrame:
    """A copy of ``df`` with a ``state`` column (see :data:`STATES`) and ``failed`` (1.0, 0.0 or NaN).

    ``failure`` overrides the spec's failure rule. The copy keeps ``df.attrs`` and records the rule in
    force as ``attrs["failure"]``.
    """
    rule = resolve_failure(df, failure)
    matches, errors, first_error = _judge(df, rule) if rule else (None, 0, None)  # as the worker judged it
    df = _rename_reserved(df)
    status = df["status"].astype(str)
    error = df["error"].astype("string").fillna("") if "error" in df.columns else pd.Series("", index=df.index)
    by_rule = status.eq("failed") & error.str.startswith("rule:")
    finished = status.eq("done") | by_rule
    state = pd.Series("not_run", index=df.index, dtype=object)
    state[status.eq("running")] = "running"
    state[status.eq("failed") & ~by_rule] = "failed_exception"
    if rule:
        state[finished & matches] = "failed_rule"
        state[finished & ~matches] = "success"
    else:  # no rule in force: keep the worker's verdict
        state[status.eq("done")] = "success"
        state[by_rule] = "failed_rule"
    out = df.copy()
    as_levels = {p: "values that are not finite numbers (inf or -inf)" for p in infinite_params(df)}
    as_levels.update({p: "integers beyond the 64-bit range" for p in params_of(df) if _all_numbers(df[p])})
    from gridrunner.analysis.subgrids import find_union

    union = find_union(df)
    for param in params_of(df):
        present = union.present(param) if union is not None else pd.Series(True, index=df.index)
        out[param] = model_ready(df[param], present)
    if union is not None:
        name = SUBGRID
        while name in out.columns:
            name = "_" + name
        out[name] = pd.Categorical(union.label, categories=list(union.groups))
        union.column = name
    out[STATE] = pd.Categorical(state, categories=STATES)
    out[FAILED] = state.map({"success": 0.0, "failed_exception": 1.0, "failed_rule": 1.0}).astype(float)
    out.attrs = {**df.attrs, "failure": rule, "union": union, "as_levels": as_levels, "labelled": True,
                 "rule_errors": (errors, first_error)}
    return out


def _rename_reserved(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each parameter and outcome named like a column the analysis or its tables add
    (:data:`RESERVED`) renamed ``param_<name>`` or ``outcome_<name>``; ``attrs["renamed"]`` (parameters)
    and ``attrs["renamed_outcomes"]`` record it for the report and for :func:`resolve_metric`."""
    names: dict[str, dict[str, str]] = {"param": {}, "outcome": {}}
    taken = set(df.columns)
    for kind, columns in (("param", params_of(df)), ("outcome", outcomes_of(df))):
        for column in columns:
            if column in RESERVED:
                new = f"{kind}_{column}"
                while new in taken:
                    new = "_" + new
                names[kind][column] = new
                taken.add(new)
    if not names["param"] and not names["outcome"]:
        return df
    out = df.rename(columns={**names["param"], **names["outcome"]})
    attrs = dict(df.attrs)
    attrs["params"] = [names["param"].get(p, p) for p in attrs.get("params", [])]
    attrs["outcomes"] = [names["outcome"].get(o, o) for o in attrs.get("outcomes", [])]
    if attrs.get("metric") in names["outcome"]:
        attrs["metric"] = names["outcome"][attrs["metric"]]
    out.attrs = {**attrs, "renamed": names["param"], "renamed_outcomes": names["outcome"]}
    return out


def model_ready(column: pd.Series, present: pd.Series) -> pd.Series:
    """One parameter column in the types the models and tables read.

    Numbers stay numbers (a mix of int and float is float). Everything else is a categorical of text
    levels in a fixed order: booleans ``false, true``; text sorted; lists in the order ``load`` gives.
    A ``null`` among a parameter's values is the level ``null`` (first, so it is the reference level),
    and a numeric parameter with ``null`` among its values becomes a categorical of its values' texts.
    So does one with ``inf`` or ``-inf`` among them: no line has a slope through an infinite value, but
    ``inf`` can be a level (``1, 2, inf``), and every table and plot can show it as one. Integers beyond
    int64 (which ``load`` keeps exact, in an object column) are levels too, in numeric order.
    Rows outside ``present`` (whose sub-grid lacks the parameter) stay missing.
    """
    null = column.isna() & present
    dtype = column.dtype
    if pd.api.types.is_bool_dtype(dtype) or _all_bool(column):
        labels = column.map(lambda v: None if pd.isna(v) else ("true" if bool(v) else "false")).astype(object)
        order = [v for v in ("false", "true") if (labels == v).any()]
    elif pd.api.types.is_numeric_dtype(dtype):
        if not null.any() and not has_infinity(column):
            return column
        labels = column.map(lambda v: None if pd.isna(v) else _number_text(v)).astype(object)
        order = sorted(set(labels.dropna()), key=lambda text: (float(text), text))  # -0.0 and 0.0 are two levels
    elif isinstance(dtype, pd.CategoricalDtype):
        labels = column.astype(object).astype(str).where(column.notna(), None)
        present_levels = set(labels.dropna())
        order = list(dict.fromkeys(str(c) for c in dtype.categories if str(c) in present_levels))
    elif _all_numbers(column):  # integers beyond int64, kept exact by load: levels in numeric order
        values = column.dropna().unique()
        labels = column.map(lambda v: None if v is None or pd.isna(v) else _number_text(v)).astype(object)
        order = list(dict.fromkeys(_number_text(v) for v in sorted(values)))
    else:
        labels = column.astype(object).astype(str).where(column.notna(), None)
        order = sorted(set(labels.dropna()))
    if null.any():
        labels = labels.where(~null, NULL_LEVEL)
        order = [NULL_LEVEL] + [v for v in order if v != NULL_LEVEL]
    return pd.Series(pd.Categorical(labels, categories=order), index=column.index, name=column.name)


def has_infinity(column: pd.Series) -> bool:
    """Whether a numeric column holds ``inf`` or ``-inf``."""
    values = column.to_numpy(dtype=float, na_value=np.nan)
    return bool(np.isinf(values).any())


def infinite_params(df: pd.DataFrame) -> list[str]:
    """The numeric parameters of ``df`` (from ``gridrunner.load``) with ``inf`` or ``-inf`` among their values."""
    return [p for p in params_of(df) if pd.api.types.is_numeric_dtype(df[p].dtype)
            and not pd.api.types.is_bool_dtype(df[p].dtype) and has_infinity(df[p])]


def _all_numbers(column: pd.Series) -> bool:
    """An object column of numbers (``load`` keeps integers beyond int64 so)."""
    present = column.dropna()
    return (len(present) > 0 and pd.api.types.is_object_dtype(column.dtype)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present))


def _all_bool(column: pd.Series) -> bool:
    present = column.dropna()
    return len(present) > 0 and pd.api.types.is_object_dtype(column.dtype) and all(isinstance(v, bool) for v in present)


def _number_text(value) -> str:
    """``0.1``, ``1e-05``, ``3``: short, and distinct for distinct values."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float):
        text = f"{value:g}"
        return text if float(text) == value else repr(value)
    return str(value)


def ensure_labelled(df: pd.DataFrame, failure: str | None = None) -> pd.DataFrame:
    """``df`` itself when :func:`label_rows` already ran on it with the same rule, else a labelled copy."""
    if df.attrs.get("labelled") and STATE in df.columns and (failure is None or failure == df.attrs.get("failure")):
        return df
    return label_rows(df, failure)


def state_counts(df: pd.DataFrame, failure: str | None = None) -> pd.DataFrame:
    """How many rows are in each state: columns ``state, rows, share`` (a table for the report)."""
    df = ensure_labelled(df, failure)
    counts = df[STATE].value_counts().reindex(STATES, fill_value=0)
    total = max(len(df), 1)
    return pd.DataFrame(
        {"state": [STATE_WORDS[s] for s in STATES], "rows": counts.to_numpy(), "share": counts.to_numpy() / total}
    )


def counts_sentence(df: pd.DataFrame, failure: str | None = None) -> str:
    """``"504 rows: 412 done, 0 failed by exception, 79 failed by rule, 3 running, 10 not run."``"""
    table = state_counts(df, failure)
    parts = ", ".join(f"{rows} {word}" for word, rows in zip(table["state"], table["rows"]))
    unmerged = df.attrs.get("unmerged") or []
    note = ""
    if unmerged:  # gridrunner.load shows such a shard as the merge will make it, not as the file says
        names = ", ".join(unmerged[:3]) + (", ..." if len(unmerged) > 3 else "")
        note = (f" {names} {'was' if len(unmerged) == 1 else 'were'} saved by hand and not merged yet: "
                f"{'its' if len(unmerged) == 1 else 'their'} rows are as the next worker's merge will make them "
                f"(the newer state of each row the journal knows).")
    return f"{len(df)} rows: {parts}.{note}"


def dropped_reasons(df: pd.DataFrame, keep: pd.Series, reasons: dict[str, pd.Series]) -> dict[str, int]:
    """Count the rows outside ``keep``, each under the first reason (in order) whose mask covers it."""
    left = ~keep
    out = {}
    for reason, mask in reasons.items():
        hit = left & mask
        if hit.any():
            out[reason] = int(hit.sum())
        left &= ~mask
    if left.any():
        out["other"] = int(left.sum())
    return out


def usage_sentence(used: int, total: int, dropped: dict[str, int]) -> str:
    """``"Used 412 of 504 rows; dropped 79 failed, 13 not finished."``"""
    if not dropped:
        return f"Used all {total} rows."
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
    return f"Used {used} of {total} rows; dropped {why}."


def rule_thresholds(rule: str | None, name: str) -> list[float]:
    """The constants ``name`` is compared with in ``rule`` (``[0.5]`` for ``m_ssim < 0.5 or m_mae > 1``)."""
    if not rule:
        return []
    from gridrunner.expr import parse

    found = []

    def walk(node):
        if not isinstance(node, tuple):
            return
        if node[0] == "cmp":
            left, right = node[2], node[3]
            for a, b in ((left, right), (right, left)):
                if a == ("name", name) and b[0] == "const" and isinstance(b[1], (int, float)) and not isinstance(b[1], bool):
                    found.append(float(b[1]))
        for child in node[1:]:
            if isinstance(child, tuple):
                walk(child)
            elif isinstance(child, list):
                for item in child:
                    walk(item)

    walk(parse(rule).tree)
    return found


def benchmark_value(df: pd.DataFrame, metric: str) -> float | None:
    """The median benchmark of ``metric``: column ``bench_<x>`` for a metric ``m_<x>`` (or ``bench_<metric>``).

    The MRI tasks report the undersampled input's own score as ``bench_ssim`` beside ``m_ssim``: the
    study's benchmark line, which a model must beat to have learned anything. None without such a column.
    """
    names = [f"bench_{metric[2:]}"] if metric.startswith("m_") else []
    names.append(f"bench_{metric}")
    for name in names:
        if name in df.columns:
            values = pd.to_numeric(df[name], errors="coerce").dropna()
            if len(values):
                return float(values.median())
    return None
