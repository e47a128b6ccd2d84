"""Which hyperparameters enter a model, and how: the one formula string each model is fitted with.

Defaults, which ``--formula`` overrides:

* text, boolean and list-valued parameters are grid levels, ``C(loss)``;
* numeric parameters are linear, ``filters``; a positive one whose values span two orders of magnitude
  or more (a learning rate) is linear in its logarithm, ``np.log10(lr)``. Write ``np.log2(filters)`` or
  ``C(filters)`` in your own formula to change that;
* a parameter with one value among the rows used is dropped with a note (it cannot have an effect there);
* replicate numbers (``seed``, ``repeat``) are not hyperparameters and are left out;
* a parameter whose columns are a linear combination of earlier ones (aliased, for example when an
  ``exclude`` rule leaves ``depth`` fixed by ``arch``) is dropped with a note naming its partners, because
  its effect cannot be told apart from theirs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import patsy

from gridrunner.analysis.rows import REPLICATE_PARAMS, params_of


@dataclass
class Terms:
    """A model's right-hand side: one formula term per kept parameter, and why others were left out."""

    response: str
    terms: list[str]
    params: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def formula(self) -> str:
        return f"{self.response} ~ {' + '.join(self.terms) if self.terms else '1'}"


def quote(name: str) -> str:
    """A column name as a formula can read it (``Q("learning-rate")`` where it is not an identifier)."""
    return name if name.isidentifier() else f'Q("{name}")'


def is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype)


#: A positive numeric parameter whose largest value is this many times its smallest enters as ``np.log10``.
LOG_SPAN = 100


def term_for(df: pd.DataFrame, param: str) -> str:
    """``filters`` for a numeric parameter, ``np.log10(lr)`` for one spanning orders of magnitude, else ``C(loss)``."""
    column = df[param]
    if not is_numeric(column):
        return f"C({quote(param)})"
    low, high = column.min(), column.max()
    if low > 0 and high / low >= LOG_SPAN:
        return f"np.log10({quote(param)})"
    return quote(param)


def describe_value(value) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def choose_terms(df: pd.DataFrame, response: str, params: list[str] | None = None) -> Terms:
    """The default terms for modelling ``response`` on ``df`` (already restricted to the rows used)."""
    params = params_of(df) if params is None else params
    kept, terms, notes = [], [], []
    for param in params:
        if param.lower() in REPLICATE_PARAMS:
            notes.append(f"left out {param}: it numbers replicates, it is not a hyperparameter")
            continue
        values = df[param].dropna().unique()
        if len(values) <= 1:
            only = f"{param}={describe_value(values[0])}" if len(values) else f"{param} is empty"
            notes.append(f"dropped {param}: constant in the rows used (every one has {only})")
            continue
        kept.append(param)
        terms.append(term_for(df, param))
    result = Terms(response, terms, kept, notes)
    if terms:
        drop_aliased(df, result)
    return result


def design(df: pd.DataFrame, terms: list[str]):
    """The patsy design matrix (with intercept) of ``terms`` on ``df``."""
    return patsy.dmatrix(" + ".join(terms) if terms else "1", df, return_type="matrix", NA_action="drop")


def aliased(matrix) -> list[tuple[str, list[str]]]:
    """Terms of a design matrix whose columns add no rank to the terms before them, with those partners.

    Columns are scaled to unit length first, so the rank tolerance does not depend on units.
    """
    info = matrix.design_info
    values = unit_columns(np.asarray(matrix, dtype=float))
    kept: list[int] = []
    kept_owner: list[str] = []
    found = []
    for name, columns in info.term_name_slices.items():
        block = values[:, columns]
        candidate = values[:, kept + list(range(columns.start, columns.stop))]
        if np.linalg.matrix_rank(candidate) == len(kept) + block.shape[1]:
            kept.extend(range(columns.start, columns.stop))
            kept_owner.extend([name] * block.shape[1])
            continue
        partners: list[str] = []
        if kept:
            coef, *_ = np.linalg.lstsq(values[:, kept], block, rcond=None)
            weight = np.abs(coef).max(axis=1)
            partners = sorted({owner for owner, w in zip(kept_owner, weight) if w > 1e-6 and owner != "Intercept"})
        found.append((name, partners))
    return found


def drop_aliased(df: pd.DataFrame, terms: Terms) -> None:
    """Remove aliased terms from ``terms`` in place, with a note for each."""
    distinct = df[terms.params].drop_duplicates()  # repeated rows add no rank, so the check runs on distinct ones
    matrix = design(distinct, terms.terms)
    for name, partners in aliased(matrix):
        index = terms.terms.index(name)
        param = terms.params[index]
        del terms.terms[index], terms.params[index]
        terms.notes.append(f"dropped {param}: collinear with {alias_words(df, param, partners, terms)}")


def alias_words(df: pd.DataFrame, param: str, partner_terms: list[str], terms: Terms) -> str:
    """Why ``param`` is aliased, in words, with an example when one parameter fixes it."""
    partners = [terms.params[terms.terms.index(t)] for t in partner_terms if t in terms.terms]
    if not partners:
        return "the intercept in the rows used (it carries no information there)"
    text = " and ".join(partners) + " in the rows used, so its effect cannot be told apart from theirs"
    if len(partners) == 1:
        partner = partners[0]
        per_level = df.groupby(partner, observed=True)[param].nunique()
        if (per_level <= 1).all():
            level = per_level.index[0]
            value = df.loc[df[partner] == level, param].iloc[0]
            text += f" (each {partner} has one {param}: {partner}={describe_value(level)} has {param}={describe_value(value)})"
    return text + "; give a --formula to choose which one to keep"


def formula_notes(result) -> list[str]:
    """Notes on a fitted formula model: rank deficiency that statsmodels would otherwise hide."""
    exog = result.model.exog
    rank = np.linalg.matrix_rank(unit_columns(exog))
    if rank >= exog.shape[1]:
        return []
    info = getattr(result.model.data, "design_info", None) or result.model.data.model_spec
    names = [f"{name} (with {', '.join(p) or 'the intercept'})" for name, p in aliased(patsy.DesignMatrix(exog, info))]
    return [
        f"the design has rank {rank} for {exog.shape[1]} coefficients: collinear terms {', '.join(names)}; "
        "their estimates are not identified (statsmodels reports a minimum-norm solution)"
    ]


def unit_columns(values: np.ndarray) -> np.ndarray:
    """``values`` with each non-zero column scaled to unit length, so rank tolerances ignore units."""
    norms = np.linalg.norm(values, axis=0)
    return values / np.where(norms > 0, norms, 1.0)
