"""Failure conditions in words: the smallest conditions on parameter levels that cover the failures.

A *condition* is a conjunction of one to three parameter levels (``act=tanh and lr=0.1``); numeric
parameters with many values use the bins of :func:`analysis.tables.level_labels`. Over finished rows,
every condition is counted exactly (one ``bincount`` per set of up to three parameters), and the
description is the first of these that exists:

1. **one condition that only failures meet and every failure meets**:
   ``failed: 6 of 6 rows with act=tanh and lr=0.1; 0 of 30 elsewhere``;
2. **up to three such conditions that together cover every failure** (chosen greedily, most failures
   first, fewer levels first): ``failed: 4 of 4 rows with a=1 and b=2; 3 of 3 rows with c=x; 0 of 40 elsewhere``;
3. **the narrowest condition that every failure meets**, where it leaves some rows out (the study's
   finding): ``loss=ssim: 79 of 168 failed; every other loss: 0 of 336``;
4. otherwise no simple rule covers every failure, and the sentence names the most telling condition:
   the one with the smallest hypergeometric chance of holding so many of the failures
   (``no simple rule covers every failure; most telling: loss=ssim, 114 of its 150 rows failed, 47 of 300
   elsewhere``); where even that chance, times the number of conditions compared, is 1 % or more, the failures *follow no simple rule, and no
   condition on parameter levels stands out*.

Among equally good conditions the one with fewer levels, then more rows, then the earlier parameters
in spec order wins, so the description is deterministic.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from gridrunner.analysis.rows import FAILED, REPLICATE_PARAMS, ensure_labelled, params_of
from gridrunner.analysis.tables import MISSING_LEVEL, level_labels

#: Conjunctions of at most this many parameter levels, and descriptions of at most this many of them.
MAX_LEVELS_PER_CONDITION = 3
MAX_CONDITIONS = 3
#: At most this many parameters (those whose levels differ most in failure rate) enter the search.
MAX_PARAMS = 16
COLUMNS = ["kind", "condition", "failed", "rows", "failure_rate"]
#: Where nothing covers every failure, the condition whose failures are least likely by chance is named,
#: as standing out when that chance (hypergeometric, one-sided), times the number of conditions compared
#: (Bonferroni), is below this.
STANDS_OUT = 0.01


@dataclass
class Conditions:
    """What :func:`failure_conditions` found: ``sentence`` in words and ``table`` (:data:`COLUMNS`)."""

    sentence: str
    kind: str  # "none failed", "all failed", "exact", "cover", "envelope", "no simple rule", "nothing finished"
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COLUMNS))

    @property
    def simple(self) -> bool:
        return self.kind in ("exact", "cover", "envelope")


@dataclass
class _Cell:
    params: tuple[str, ...]
    levels: tuple[str, ...]
    index: int  # the cell's number in the combined codes of ``params``
    failed: int
    rows: int
    log_p: float = 0.0  # log of the hypergeometric chance of at least ``failed`` failures among ``rows`` rows

    @property
    def text(self) -> str:
        return " and ".join(f"{p}={v}" for p, v in zip(self.params, self.levels))

    def key(self, order: dict[str, int]):
        return (len(self.params), -self.rows, [order[p] for p in self.params], self.levels)


class _Search:
    """The finished rows' level codes, and the counts of every condition, by set of parameters."""

    def __init__(self, params: list[str], codes: dict, names: dict, failed: np.ndarray):
        self.codes, self.names, self.failed = codes, names, failed
        self.k, self.n = int(failed.sum()), len(failed)
        self.exact: list[_Cell] = []
        self.envelope: list[_Cell] = []
        self.pure: dict[tuple, np.ndarray] = {}  # combo -> indices of cells only failures meet (>= 2 of them)
        self.best: list[_Cell] = []  # per combo, the most telling cell (smallest hypergeometric chance)
        self.tested = 0  # conditions compared for the most telling one (a Bonferroni correction)
        self.combos = [c for size in range(1, MAX_LEVELS_PER_CONDITION + 1) for c in itertools.combinations(params, size)]
        for combo in self.combos:
            cell, total = self.cell(combo)
            rows = np.bincount(cell, minlength=total)
            fails = np.bincount(cell, weights=failed, minlength=total).round().astype(np.int64)
            valid = self.valid(combo)
            for index in np.flatnonzero(valid & (fails == self.k)):
                target = self.exact if rows[index] == self.k else self.envelope
                if rows[index] < self.n:
                    target.append(self.make(combo, index, fails, rows))
            pure = np.flatnonzero(valid & (fails == rows) & (fails >= 2))
            if len(pure):
                self.pure[combo] = pure
            self.tested += int((valid & (rows > 0) & (rows < self.n)).sum())
            candidates = np.flatnonzero(valid & (fails > 0) & (rows < self.n))
            if len(candidates):  # the most telling cell: the smallest chance of so many failures among its rows
                log_p = stats.hypergeom.logsf(fails[candidates] - 1, self.n, self.k, rows[candidates])
                index = candidates[int(np.argmin(log_p))]
                cell = self.make(combo, index, fails, rows)
                cell.log_p = float(log_p.min())
                self.best.append(cell)

    def sizes(self, combo) -> list[int]:
        return [len(self.names[p]) for p in combo]

    def cell(self, combo) -> tuple[np.ndarray, int]:
        cell = np.zeros(self.n, dtype=np.int64)
        for p, width in zip(combo, self.sizes(combo)):
            cell = cell * width + self.codes[p]
        return cell, int(np.prod(self.sizes(combo)))

    def valid(self, combo) -> np.ndarray:
        """Cells none of whose levels is :data:`MISSING_LEVEL` (a row lacking a parameter is no condition)."""
        ok = np.ones(self.sizes(combo), dtype=bool)
        for axis, p in enumerate(combo):
            if MISSING_LEVEL in self.names[p]:
                index = [slice(None)] * len(combo)
                index[axis] = self.names[p].index(MISSING_LEVEL)
                ok[tuple(index)] = False
        return ok.ravel()

    def make(self, combo, index, fails, rows) -> _Cell:
        levels = tuple(self.names[p][i] for p, i in zip(combo, np.unravel_index(int(index), self.sizes(combo))))
        return _Cell(combo, levels, int(index), int(fails[index]), int(rows[index]))

    def mask(self, cell: _Cell) -> np.ndarray:
        return self.cell(cell.params)[0] == cell.index

    def greedy_cover(self, order: dict) -> list[_Cell] | None:
        """Up to :data:`MAX_CONDITIONS` conditions that only failures meet and that together hold every failure."""
        left = self.failed.copy()
        chosen: list[_Cell] = []
        while left.any() and len(chosen) < MAX_CONDITIONS:
            candidates = []
            for combo, pure in self.pure.items():
                cell, total = self.cell(combo)
                gain = np.bincount(cell, weights=left, minlength=total).round().astype(np.int64)
                rows = np.bincount(cell, minlength=total)
                for index in pure[gain[pure] > 0]:
                    candidates.append((int(gain[index]), self.make(combo, index, rows, rows)))
            if not candidates:
                return None
            _, best = min(candidates, key=lambda item: (-item[0],) + tuple(item[1].key(order)))
            chosen.append(best)
            left &= ~self.mask(best)
        return None if left.any() else chosen


def failure_conditions(df: pd.DataFrame, failure: str | None = None) -> Conditions:
    """The smallest conditions on parameter levels that cover the failed rows, with counts (see the module)."""
    df = ensure_labelled(df, failure)
    data = df[df[FAILED].notna()]
    failed = data[FAILED].to_numpy(float) == 1.0
    n, k = len(data), int(failed.sum())
    if n == 0:
        return Conditions("no row has finished yet", "nothing finished")
    if k == 0:
        return Conditions(f"no finished row failed (0 of {n})", "none failed", _table("none failed", [], n, 0))
    if k == n:
        return Conditions(f"every finished row failed ({n} of {n})", "all failed", _table("all failed", [], n, n))
    union = df.attrs.get("union")
    params = [p for p in params_of(df) if p.lower() not in REPLICATE_PARAMS]
    if union is not None and union.column in data.columns:
        params = [union.column] + params
    codes, names = {}, {}
    for param in params:
        labels = level_labels(data[param])
        if labels.nunique() > 1:
            codes[param] = labels.cat.codes.to_numpy().astype(np.int64)
            names[param] = [str(c) for c in labels.cat.categories]
    params = _most_telling(list(codes), codes, failed)
    order = {p: i for i, p in enumerate(params)}
    search = _Search(params, codes, names, failed)
    if search.exact:
        best = min(search.exact, key=lambda c: c.key(order))
        sentence = f"failed: {k} of {k} rows with {best.text}; 0 of {n - k} elsewhere"
        return Conditions(sentence, "exact", _table("exact", [best], n, k, search))
    cover = search.greedy_cover(order)
    if cover is not None:
        covered = np.logical_or.reduce([search.mask(c) for c in cover])
        parts = "; ".join(f"{c.failed} of {c.rows} rows with {c.text}" for c in cover)
        sentence = f"failed: {parts}; 0 of {int((~covered).sum())} elsewhere"
        return Conditions(sentence, "cover", _table("cover", cover, n, k, search))
    if search.envelope:
        best = min(search.envelope, key=lambda c: (-c.failed / c.rows,) + tuple(c.key(order)))
        rest = n - best.rows
        if len(best.params) == 1:
            sentence = f"{best.text}: {k} of {best.rows} failed; every other {best.params[0]}: 0 of {rest}"
        else:
            sentence = f"{best.text}: {k} of {best.rows} failed; elsewhere: 0 of {rest}"
        return Conditions(sentence, "envelope", _table("envelope", [best], n, k, search))
    if not search.best:
        return Conditions(f"the failures follow no simple rule ({k} of {n} finished rows failed, and no parameter varies)",
                          "no simple rule", _table("no simple rule", [], n, k, search))
    best = min(search.best, key=lambda c: (round(c.log_p, 9), -c.failed) + tuple(c.key(order)))
    counts = f"{best.failed} of its {best.rows} rows failed, {k - best.failed} of {n - best.rows} elsewhere"
    if best.log_p + np.log(max(search.tested, 1)) < np.log(STANDS_OUT):
        sentence = f"no simple rule covers every failure; most telling: {best.text}, {counts}"
    else:
        sentence = f"the failures follow no simple rule, and no condition on parameter levels stands out (the closest, {best.text}: {counts})"
    return Conditions(sentence, "no simple rule", _table("no simple rule", [best], n, k, search))


def _most_telling(params: list[str], codes: dict, failed: np.ndarray) -> list[str]:
    """At most :data:`MAX_PARAMS` parameters, those whose levels' failure rates spread most (spec order kept)."""
    if len(params) <= MAX_PARAMS:
        return params
    spread = {}
    for p in params:
        rows = np.bincount(codes[p])
        fails = np.bincount(codes[p], weights=failed)
        rate = fails[rows > 0] / rows[rows > 0]
        spread[p] = rate.max() - rate.min()
    keep = set(sorted(params, key=lambda p: -spread[p])[:MAX_PARAMS])
    return [p for p in params if p in keep]


def _table(kind: str, cells: list[_Cell], n: int, k: int, search: _Search | None = None) -> pd.DataFrame:
    rows = [{"kind": kind, "condition": c.text, "failed": c.failed, "rows": c.rows, "failure_rate": c.failed / c.rows} for c in cells]
    if cells and search is not None:
        inside = np.logical_or.reduce([search.mask(c) for c in cells])
        rest_n, rest_k = int((~inside).sum()), int(search.failed[~inside].sum())
        rows.append({"kind": kind, "condition": "elsewhere", "failed": rest_k, "rows": rest_n,
                     "failure_rate": rest_k / rest_n if rest_n else float("nan")})
    rows.append({"kind": kind, "condition": "every finished row", "failed": k, "rows": n, "failure_rate": k / n if n else float("nan")})
    return pd.DataFrame(rows, columns=COLUMNS)
