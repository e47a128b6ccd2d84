"""How much of the metric each hyperparameter and each pair explains, without assuming linearity.

Method: functional ANOVA (Hutter, Hoos and Leyton-Brown 2014) of a random forest. A scikit-learn
``RandomForestRegressor`` learns the metric from the parameters over successful rows; its predictions
over the grid of observed levels (every combination, each level weighted equally) are split into a mean,
main effects and pair effects, and each effect's variance is reported as a share of the total
variance of the predictions. What the pairs leave unexplained belongs to higher-order interactions.
When the grid of levels is too large to enumerate, the shares are estimated by partial dependence
over a random sample of combinations.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from gridrunner.analysis.rows import REPLICATE_PARAMS, STATE, ensure_labelled, params_of, resolve_metric
from gridrunner.analysis.tables import level_labels

#: Enumerate every combination of levels up to this many; beyond it, sample.
MAX_CELLS = 50_000
#: Pairs are computed among at most this many parameters (those with the largest main effects).
MAX_PAIR_PARAMS = 6
#: A metric reaching this size is divided by its largest absolute value first: squares of it overflow.
MAX_SCALE = 1e100


def importance(
    df: pd.DataFrame,
    metric: str | None = None,
    failure: str | None = None,
    max_rows: int = 20_000,
    n_trees: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """Functional-ANOVA variance shares of the metric: ``effect, kind, variance_share``, largest first.

    ``attrs["method"]`` says how they were computed, ``attrs["notes"]`` which rows and parameters were used.
    """
    from sklearn.ensemble import RandomForestRegressor

    df = ensure_labelled(df, failure)
    metric = resolve_metric(df, metric)
    data = df[df[STATE].eq("success") & df[metric].notna()]
    notes: list[str] = []
    method = (
        f"functional ANOVA of a scikit-learn RandomForestRegressor ({n_trees} trees, min_samples_leaf=3) "
        f"fitted to {metric} over successful rows"
    )
    params = [p for p in params_of(df) if p.lower() not in REPLICATE_PARAMS and data[p].nunique() > 1]
    if len(data) < 10 or not params:
        notes.append(f"needs at least 10 successful rows and one varying parameter (has {len(data)} and {len(params)})")
        return _with_attrs(pd.DataFrame(columns=["effect", "kind", "variance_share"]), method, notes)
    if len(data) > max_rows:
        notes.append(f"the forest was fitted to a random {max_rows:,} of {len(data):,} successful rows")
        data = data.sample(max_rows, random_state=seed)
    levels = {p: _grid_values(data[p]) for p in params}
    x = np.column_stack([_encode(data[p], levels[p]) for p in params])
    y = data[metric].to_numpy(float)
    largest = float(np.abs(y).max())
    if largest >= MAX_SCALE:
        # Shares are ratios of variances, the same in any unit; near 1e308 the variances themselves overflow.
        y = y / largest
        notes.append(f"{metric} reaches {largest:.3g}: it was divided by that before the forest was fitted "
                     "(the shares do not depend on its unit, and its variance would overflow)")
    forest = RandomForestRegressor(n_estimators=n_trees, min_samples_leaf=3, oob_score=True, random_state=seed, n_jobs=1)
    sizes = [len(levels[p]) for p in params]
    codes = [np.arange(n, dtype=float) for n in sizes]
    enumerate_all = np.prod(sizes, dtype=float) <= MAX_CELLS
    try:
        with np.errstate(over="raise", invalid="raise"):
            forest.fit(x, y)
            explained = forest.oob_score_
            shares = _exact(forest, codes, params) if enumerate_all else _sampled(forest, codes, params, np.random.default_rng(seed))
    except (ValueError, FloatingPointError) as err:  # what the forest cannot take, said in words
        notes.append(f"not computed: the forest cannot be fitted to {metric} ({_first_line(err)})")
        return _with_attrs(pd.DataFrame(columns=["effect", "kind", "variance_share"]), method, notes)
    notes.append(f"the forest explains {explained:.0%} of the variance of {metric} out of bag, over {len(data):,} rows")
    if not enumerate_all:
        notes.append("the grid of levels is too large to enumerate: shares are estimated by partial dependence over 500 sampled combinations")
    table = pd.DataFrame(shares, columns=["effect", "kind", "variance_share"])
    table = table.sort_values("variance_share", ascending=False, kind="stable").reset_index(drop=True)
    return _with_attrs(table, method, notes)


def _with_attrs(table: pd.DataFrame, method: str, notes: list[str]) -> pd.DataFrame:
    table.attrs.update(method=method, notes=notes)
    return table


def _grid_values(series: pd.Series) -> np.ndarray:
    """The values a parameter takes on the grid: its levels, or bin medians for a many-valued number."""
    labels = level_labels(series)
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return series.groupby(labels, observed=True).median().to_numpy(float)
    return np.asarray(labels.cat.categories)


def _encode(series: pd.Series, values: np.ndarray) -> np.ndarray:
    """Each row as the index of its grid value (nearest value for numbers), which the forest splits on."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return np.abs(series.to_numpy(float)[:, None] - values[None, :]).argmin(axis=1).astype(float)
    return level_labels(series).cat.codes.to_numpy(float)


def _exact(forest, codes, params):
    grid = np.stack(np.meshgrid(*codes, indexing="ij"), axis=-1).reshape(-1, len(codes))
    predictions = forest.predict(grid).reshape([len(c) for c in codes])
    mean, total = predictions.mean(), predictions.var()
    axes = range(len(codes))
    main = {i: predictions.mean(axis=tuple(a for a in axes if a != i)) - mean for i in axes}
    rows = [(params[i], "main", float(np.mean(main[i] ** 2) / total) if total > 0 else 0.0) for i in axes]
    for i, j in _pairs(main, params):
        joint = predictions.mean(axis=tuple(a for a in axes if a not in (i, j))) - mean
        pure = joint - main[i][:, None] - main[j][None, :]
        rows.append((f"{params[i]} × {params[j]}", "pair", float(np.mean(pure**2) / total) if total > 0 else 0.0))
    return rows


def _sampled(forest, codes, params, rng, n_background: int = 500):
    background = np.column_stack([rng.choice(c, n_background) for c in codes])
    base = forest.predict(background)
    mean, total = base.mean(), base.var()
    main = {}
    for i, values in enumerate(codes):
        main[i] = np.array([_set(forest, background, {i: v}).mean() for v in values]) - mean
    rows = [(params[i], "main", float(np.mean(main[i] ** 2) / total) if total > 0 else 0.0) for i in main]
    for i, j in _pairs(main, params):
        joint = np.array([[_set(forest, background, {i: a, j: b}).mean() for b in codes[j]] for a in codes[i]]) - mean
        pure = joint - main[i][:, None] - main[j][None, :]
        rows.append((f"{params[i]} × {params[j]}", "pair", float(np.mean(pure**2) / total) if total > 0 else 0.0))
    return rows


def _set(forest, background, values):
    changed = background.copy()
    for column, value in values.items():
        changed[:, column] = value
    return forest.predict(changed)


def _pairs(main, params):
    """Pairs among the parameters with the largest main effects (all of them when there are few)."""
    ranked = sorted(main, key=lambda i: -np.mean(main[i] ** 2))[:MAX_PAIR_PARAMS]
    return list(itertools.combinations(sorted(ranked), 2))


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
