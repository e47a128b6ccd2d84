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
    """A model's right-hand side: one formula term per kept parameter, and why others were left out.

    ``terms`` and ``formula`` use the parameters' names (what the report shows). The model itself is
    fitted on :meth:`frame`, whose columns have internal names (``v0``, ``v1``, ...; the response is
    ``y``) so that no parameter name (``C``, ``np``, ``I``) or level text can break the formula;
    :meth:`display` turns the fitted column and term names back into the parameters' names.
    """

    response: str
    terms: list[str]
    params: list[str]
    notes: list[str] = field(default_factory=list)
    internal: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # "level", "number" or "log" per term
    subgrid: str | None = None  # the sub-grid column, when the model has a C(subgrid) term

    @property
    def formula(self) -> str:
        return f"{self.response} ~ {' + '.join(self.terms) if self.terms else '1'}"

    @property
    def internal_formula(self) -> str:
        return f"y ~ {' + '.join(self.internal) if self.internal else '1'}"

    def remove(self, index: int) -> None:
        for items in (self.terms, self.params, self.internal, self.kinds):
            del items[index]

    def names(self) -> dict[str, str]:
        """Internal term name -> displayed term name (``C(v0)`` -> ``C(loss)``)."""
        return dict(zip(self.internal, self.terms))

    def display(self, name: str) -> str:
        """A fitted column or term name (``C(v0)[T.ssim]``, ``np.log10(v1)``) with the parameter's name."""
        for internal, shown in sorted(self.names().items(), key=lambda item: -len(item[0])):
            if name == internal or name.startswith(internal + "["):
                return shown + name[len(internal):]
        return name

    def frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """The model's data: ``y`` and one internal column per term, every row complete.

        A level column keeps only the levels seen in ``df`` (an unseen level would be a column of zeros).
        Rows whose sub-grid lacks a parameter hold its first level (numbers: its smallest value); with
        C(subgrid) in the model, that makes the parameter's coefficients comparisons within its own
        sub-grids (:mod:`analysis.subgrids`).
        """
        out = {"y": pd.to_numeric(df[self.response], errors="coerce").astype(float)} if self.response in df.columns else {}
        columns = [(param, internal_name(i), kind) for i, (param, kind) in enumerate(zip(self.params, self.kinds))]
        for param, name, kind in columns:
            out[name] = model_column(df[param], kind)
        return pd.DataFrame(out, index=df.index)


def internal_name(index: int) -> str:
    return f"v{index}"


def model_column(column: pd.Series, kind: str) -> pd.Series:
    """A parameter as one model column: numbers as floats, levels as a categorical of the levels seen."""
    if kind == "level":
        if not isinstance(column.dtype, pd.CategoricalDtype):
            column = column.astype(object).map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v))
            column = column.astype("category")
        column = column.cat.remove_unused_categories()
        if column.isna().any() and len(column.cat.categories):
            column = column.fillna(column.cat.categories[0])
        return column
    values = pd.to_numeric(column, errors="coerce").astype(float)
    if values.isna().any() and values.notna().any():
        values = values.fillna(values.min())
    return values


def quote(name: str) -> str:
    """A column name as a formula can read it (``Q("learning-rate")`` where it is not an identifier)."""
    return name if name.isidentifier() else f'Q("{name}")'


def is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype)


#: A positive numeric parameter whose largest value is this many times its smallest enters as ``np.log10``.
LOG_SPAN = 100
#: A numeric parameter that would enter linearly but reaches this size enters as levels: least squares
#: multiplies values together, and near 1e308 (the largest float) their products overflow to inf.
MAX_LINEAR = 1e100


def kind_of(df: pd.DataFrame, param: str) -> str:
    """``"number"`` for a numeric parameter, ``"log"`` for one spanning orders of magnitude, else ``"level"``
    (also for a number too large to enter linearly, see :data:`MAX_LINEAR`)."""
    column = df[param]
    if not is_numeric(column):
        return "level"
    low, high = column.min(), column.max()
    if low > 0 and high / low >= LOG_SPAN:
        return "log"
    if max(abs(low), abs(high)) >= MAX_LINEAR:
        return "level"
    return "number"


def _term(name: str, kind: str) -> str:
    return {"level": f"C({name})", "log": f"np.log10({name})", "number": name}[kind]


def term_for(df: pd.DataFrame, param: str) -> str:
    """``filters`` for a numeric parameter, ``np.log10(lr)`` for one spanning orders of magnitude, else ``C(loss)``."""
    return _term(quote(param), kind_of(df, param))


def describe_value(value) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def choose_terms(df: pd.DataFrame, response: str, params: list[str] | None = None) -> Terms:
    """The default terms for modelling ``response`` on ``df`` (already restricted to the rows used)."""
    params = params_of(df) if params is None else params
    union = df.attrs.get("union")
    result = Terms(response, [], [], [])
    partial = []
    for param in params:
        if param.lower() in REPLICATE_PARAMS:
            result.notes.append(f"left out {param}: it numbers replicates, it is not a hyperparameter")
            continue
        values = df[param].dropna().unique()
        if len(values) <= 1:
            only = f"{param}={describe_value(values[0])}" if len(values) else f"{param} is empty"
            where = " of its sub-grids" if union is not None and param in union.partial else ""
            result.notes.append(f"dropped {param}: constant in the rows used{where} (every one has {only})")
            continue
        kind = kind_of(df, param)
        why = (df.attrs.get("as_levels") or {}).get(param)
        if why:
            result.notes.append(f"{param} has {why}, so it enters as levels, C({param}), not as a line")
        elif kind == "level" and is_numeric(df[param]):
            largest = df[param].abs().max()
            result.notes.append(f"{param} reaches {largest:g}, too large a number to enter linearly (its products "
                                f"overflow), so it enters as levels, C({param})")
        result.params.append(param)
        result.kinds.append(kind)
        result.terms.append(_term(quote(param), kind))
        result.internal.append(_term(internal_name(len(result.internal)), kind))
        if union is not None and param in union.partial:
            partial.append(param)
    if union is not None and union.column in df.columns and df[union.column].nunique() > 1:
        result.params.insert(0, union.column)
        result.kinds.insert(0, "level")
        result.terms.insert(0, f"C({union.column})")
        result.internal = [_term(internal_name(i), kind) for i, kind in enumerate(result.kinds)]
        result.subgrid = union.column
        from gridrunner.analysis.subgrids import union_sentence

        if partial:
            result.notes.append(union_sentence(union, partial))
    if result.terms:
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
    frame = terms.frame(df)
    distinct = frame.drop(columns="y", errors="ignore").drop_duplicates()  # repeated rows add no rank
    while terms.internal:
        matrix = design(distinct, terms.internal)
        found = [(name, partners) for name, partners in aliased(matrix) if name in terms.internal]
        if not found:
            return
        name, partners = found[0]
        index = terms.internal.index(name)
        param = terms.params[index]
        shown = [terms.display(p) for p in partners]
        words = alias_words(df, param, shown, terms)
        terms.remove(index)
        terms.internal = [_term(internal_name(i), kind) for i, kind in enumerate(terms.kinds)]
        distinct = terms.frame(df).drop(columns="y", errors="ignore").drop_duplicates()
        terms.notes.append(f"dropped {param}: collinear with {words}")


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


def formula_notes(result, display=lambda name: name) -> list[str]:
    """Notes on a fitted formula model: rank deficiency that statsmodels would otherwise hide."""
    exog = result.model.exog
    rank = np.linalg.matrix_rank(unit_columns(exog))
    if rank >= exog.shape[1]:
        return []
    info = getattr(result.model.data, "design_info", None) or result.model.data.model_spec
    names = [f"{display(name)} (with {', '.join(map(display, p)) or 'the intercept'})" for name, p in aliased(patsy.DesignMatrix(exog, info))]
    return [
        f"the design has rank {rank} for {exog.shape[1]} coefficients: collinear terms {', '.join(names)}; "
        "their estimates are not identified (statsmodels reports a minimum-norm solution)"
    ]


def unit_columns(values: np.ndarray) -> np.ndarray:
    """``values`` with each non-zero column scaled to unit length, so rank tolerances ignore units.

    Each column is first divided by its largest absolute value, so the norm cannot overflow: a column of
    ±1.8e308 has a norm of inf, and dividing by that would turn it into zeros (collinear with nothing).
    """
    values = np.asarray(values, dtype=float)
    largest = np.abs(values).max(axis=0) if values.shape[0] else np.zeros(values.shape[1])
    values = values / np.where(np.isfinite(largest) & (largest > 0), largest, 1.0)
    norms = np.linalg.norm(values, axis=0)
    return values / np.where(norms > 0, norms, 1.0)
