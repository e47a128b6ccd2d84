"""How rows failed: the kinds of failure, and which rows a prune rule stopped, at which steps.

A failed row's ``error`` starts with its kind: an exception's type (``FloatingPointError: ...``),
``TaskDied``, ``RuleError``, ``NonFiniteMetric``, a worker's verdict on a row that it stopped,
``Pruned: <rule> at step <n>`` (a prune rule matched a logged record), ``Hung: no progress for N min
(last step k)`` or ``TimeLimit: ...``, and ``rule: <rule>`` for a finished row whose outcomes match the
failure rule (the rule in force decides those: :func:`analysis.rows.label_rows`). Every one of them
counts as failed.
"""
from __future__ import annotations

import re

import pandas as pd

from gridrunner.analysis.rows import STATE, ensure_labelled

PRUNED, HUNG, TIME_LIMIT = "Pruned", "Hung", "TimeLimit"
#: What the worker ended on purpose, in words (one row, several rows).
STOPPED_WORDS = {HUNG: ("hung (no progress)", "hung (no progress)"),
                 TIME_LIMIT: ("ran past its time limit", "ran past their time limit")}
_KIND = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)\s*:")
_PRUNED = re.compile(r"^Pruned: (?P<rule>.*) at step (?P<step>-?\d+(?:\.\d+)?)\s*$", re.DOTALL)


def kind_of_error(error: str) -> str:
    """``FloatingPointError`` for ``FloatingPointError: loss became NaN``; ``other`` without a ``Type:`` prefix."""
    match = _KIND.match(error or "")
    return match.group(1) if match else "other"


def failure_kinds(df: pd.DataFrame, failure: str | None = None) -> pd.DataFrame:
    """Failed rows per kind: ``kind, rows, share`` (of the failed rows), most frequent first."""
    df = ensure_labelled(df, failure)
    state = df[STATE].astype(str)
    kinds = df.loc[state.eq("failed_exception"), "error"].astype(str).map(kind_of_error)
    kinds = pd.concat([kinds, pd.Series("failure rule", index=df.index[state.eq("failed_rule")])])
    counts = kinds.value_counts()
    total = max(int(counts.sum()), 1)
    table = pd.DataFrame({"kind": counts.index.astype(str), "rows": counts.to_numpy(int)})
    table["share"] = table["rows"] / total
    return table.sort_values(["rows", "kind"], ascending=[False, True], kind="stable").reset_index(drop=True)


def pruned_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows a prune rule stopped: ``row_id, rule, step``."""
    errors = df["error"].astype(str)
    found = errors[errors.str.startswith(PRUNED + ":")].str.extract(_PRUNED)
    found = found.dropna()
    out = pd.DataFrame({"row_id": df.loc[found.index, "row_id"].astype(str), "rule": found["rule"],
                        "step": pd.to_numeric(found["step"], errors="coerce")})
    return out.reset_index(drop=True)


def pruning_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per prune rule: ``rule, rows, first_step, median_step, last_step``."""
    rows = pruned_rows(df)
    columns = ["rule", "rows", "first_step", "median_step", "last_step"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    table = rows.groupby("rule", sort=False)["step"].agg(rows="size", first_step="min", median_step="median", last_step="max")
    return table.reset_index().sort_values("rows", ascending=False, kind="stable").reset_index(drop=True)[columns]


def stopped_sentences(df: pd.DataFrame) -> list[str]:
    """``"12 rows were pruned: 8 by `step >= 200 and val_ssim < 0.3` at step 200–400 (median 200) ..."``, and
    the counts of hung and timed-out rows; empty when the worker stopped no row."""
    out = []
    table = pruning_table(df)
    if not table.empty:
        parts = []
        for row in table.itertuples():
            steps = f"step {row.first_step:g}" if row.first_step == row.last_step else (
                f"steps {row.first_step:g}–{row.last_step:g} (median {row.median_step:g})")
            parts.append(f"{row.rows} by `{row.rule}` at {steps}")
        total = int(table["rows"].sum())
        out.append(f"{total} row{'s were' if total != 1 else ' was'} pruned (counted as failed): {'; '.join(parts)}")
    errors = df["error"].astype(str)
    for kind in (HUNG, TIME_LIMIT):
        count = int(errors.str.startswith(kind + ":").sum())
        if count:
            one, many = STOPPED_WORDS[kind]
            out.append(f"{count} row{'s' if count != 1 else ''} {one if count == 1 else many} (`{kind}: ...`), counted as failed")
    return out
