"""What a fitted model hands to the report: its tables, the rows it used, and notes in words."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from gridrunner.analysis.rows import usage_sentence
from gridrunner.errors import GridError

#: The columns of every coefficient table, in this order (``outcome_model.csv`` and ``failure_model.csv``).
COLUMNS = ["term", "estimate", "ci_low", "ci_high", "p_value"]


@dataclass
class Fit:
    """One model: ``table`` has one row per term (:data:`COLUMNS` plus ``std_error``).

    ``extra`` holds further tables (an ANOVA, a penalised logit, a linear probability model), ``notes``
    every decision taken on the user's behalf, ``result`` the statsmodels result where there is one.
    """

    title: str
    method: str
    formula: str | None
    used: int
    total: int
    dropped: dict[str, int]
    table: pd.DataFrame = field(default_factory=lambda: empty_table())
    notes: list[str] = field(default_factory=list)
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    result: object = None
    #: The reference level of each ``C(name)`` factor, by parameter name.
    baselines: dict[str, str] = field(default_factory=dict)
    #: The names of ``result``'s design columns as the tables show them (parameters' names).
    columns: list[str] = field(default_factory=list)
    #: Why the model could not be fitted, in words (None when it was, or when nothing was tried).
    reason: str | None = None

    @property
    def usage(self) -> str:
        return usage_sentence(self.used, self.total, self.dropped)

    @property
    def fitted(self) -> bool:
        return not self.table.empty

    def __str__(self) -> str:
        lines = [self.title, f"  {self.method}", f"  {self.formula}" if self.formula else "", f"  {self.usage}"]
        lines += [f"  note: {note}" for note in self.notes]
        if self.fitted:
            lines.append(self.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return "\n".join(line for line in lines if line)


def check_design(formula: str, y: pd.DataFrame, x: pd.DataFrame, what: str = "formula") -> None:
    """Raise a GridError that names a user's ``formula`` where its design (patsy's ``dmatrices``, rows with
    NaN dropped) is one no model can be fitted on: a response that is not one number, no term on the right
    of ``~`` (``y ~ 0``), or a value a transform made infinite (``np.log`` of 0, a division by 0), where
    statsmodels would fail deep inside the fit."""
    response = formula.split("~", 1)[0].strip()
    if any(info.type == "categorical" for info in y.design_info.factor_infos.values()):
        raise GridError(f"the {what} {formula!r} cannot be fitted: its response {response} is not a number")
    if y.shape[1] != 1:
        raise GridError(f"the {what} {formula!r} cannot be fitted: its response {response} is {y.shape[1]} "
                        f"columns ({', '.join(y.columns)}); model one outcome at a time")
    if x.shape[1] == 0:
        raise GridError(f"the {what} {formula!r} has no terms to fit: its right-hand side removes the intercept "
                        f"and adds no term (add one, as in '{response} ~ 1 + x')")
    names = list(y.columns) + list(x.columns)
    values = np.column_stack([y.to_numpy(dtype=float), x.to_numpy(dtype=float)])
    infinite = ~np.isfinite(values)
    if infinite.any():
        columns = [name for name, column in zip(names, infinite.T) if column.any()]
        raise GridError(f"the {what} {formula!r} cannot be fitted: {', '.join(columns)} is infinite in "
                        f"{int(infinite.any(axis=1).sum())} of {len(values)} rows (a transform outside its domain, "
                        f"such as np.log of 0 or a division by 0)")


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=object if column == "term" else float) for column in COLUMNS + ["std_error"]})


def coefficient_table(estimate, std_error, names, df_resid: float | None = None, level: float = 0.95) -> pd.DataFrame:
    """Estimates with Wald intervals and two-sided p-values (t with ``df_resid``, else normal)."""
    estimate = np.asarray(estimate, dtype=float)
    std_error = np.asarray(std_error, dtype=float)
    dist = stats.t(df_resid) if df_resid else stats.norm()
    half = dist.ppf(0.5 + level / 2) * std_error
    with np.errstate(divide="ignore", invalid="ignore"):
        p_value = 2 * dist.sf(np.abs(estimate / std_error))
    return pd.DataFrame(
        {
            "term": list(names),
            "estimate": estimate,
            "ci_low": estimate - half,
            "ci_high": estimate + half,
            "p_value": p_value,
            "std_error": std_error,
        }
    )


def result_table(result, display=lambda name: name) -> pd.DataFrame:
    """The coefficient table of a statsmodels result, with the covariance it was fitted with."""
    ci = np.asarray(result.conf_int())
    table = pd.DataFrame(
        {
            "term": [display(name) for name in result.model.exog_names],
            "estimate": np.asarray(result.params),
            "ci_low": ci[:, 0],
            "ci_high": ci[:, 1],
            "p_value": np.asarray(result.pvalues),
            "std_error": np.asarray(result.bse),
        }
    )
    return table


_LEVEL = re.compile(r"^C\((?P<name>[^,)]+)(?:,[^)]*)?\)\[T\.(?P<level>.*)\]$", re.DOTALL)


def pretty_term(term: str, baselines: dict[str, str] | None = None) -> str:
    """``C(loss)[T.ssim]`` → ``loss=ssim (vs l1)``; other terms are returned as they are."""
    parts = []
    pieces = [term] if _LEVEL.match(term) and term.count("[T.") == 1 else term.split(":")
    for piece in pieces:
        match = _LEVEL.match(piece)
        if not match:
            parts.append(piece)
            continue
        name = match["name"].removeprefix('Q("').removesuffix('")')
        base = (baselines or {}).get(name)
        parts.append(f"{name}={match['level']}" + (f" (vs {base})" if base is not None else ""))
    return " × ".join(parts)


def baselines_of(result, display=lambda name: name) -> dict[str, str]:
    """The reference level of each ``C(name)`` factor of a patsy-built statsmodels model (``display``
    maps a factor's name, ``C(v0)``, to the one shown, ``C(loss)``)."""
    info = getattr(result.model.data, "design_info", None) or getattr(result.model.data, "model_spec", None)
    out = {}
    if info is None:
        return out
    for factor, factor_info in info.factor_infos.items():
        if factor_info.type == "categorical":
            match = re.match(r"^C\((?P<name>[^,)]+)", display(factor.name()))
            if match:
                name = match["name"].removeprefix('Q("').removesuffix('")')
                out[name] = str(factor_info.categories[0])
    return out


def strongest(table: pd.DataFrame, n: int = 3, alpha: float = 0.05) -> pd.DataFrame:
    """The ``n`` significant terms with the largest |estimate|/std_error (intercept excluded)."""
    rows = table[(table["term"] != "Intercept") & (table["p_value"] < alpha)].copy()
    rows["_z"] = (rows["estimate"] / rows["std_error"]).abs()
    return rows.sort_values("_z", ascending=False).head(n).drop(columns="_z")
