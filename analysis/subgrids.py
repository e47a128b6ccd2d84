"""Which sub-grid of a union each row came from, and which parameters exist in only some sub-grids.

A spec's ``grid`` may be a list of mappings whose parameters differ (the study's 5- and 7-level U-Nets).
A row lacks the parameters of the other sub-grids: its cell is empty, which ``gridrunner.load`` reads
as missing, like a ``null`` value. The analysis must tell the two apart: a ``null`` the spec lists is a
level of its parameter; a parameter the row's sub-grid does not have is *absent*.

Sub-grids that have the same parameters are one group (their rows differ only in values, which the
models see anyway). A row's group is found by expanding each sub-grid of the saved spec and matching
row ids (exact, content-addressed); a row the spec no longer makes (a hand-appended row, an older
version of the spec) goes to the first group whose parameters include every parameter it has a value
for. Groups are labelled by their place in the spec: ``grid[0]``, or ``grid[1,2]`` for two sub-grids
with the same parameters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Union:
    """The sub-grid groups of a union whose parameters differ. ``label`` is each row's group."""

    groups: dict[str, list[str]]  # group label -> its parameters, in spec order
    label: pd.Series
    partial: dict[str, list[str]] = field(default_factory=dict)  # parameter -> the groups that have it
    column: str = "subgrid"  # the column of the labelled frame that holds ``label``

    def present(self, param: str) -> pd.Series:
        """True for the rows whose sub-grid has ``param``."""
        if param not in self.partial:
            return pd.Series(True, index=self.label.index)
        return self.label.isin(self.partial[param])


def find_union(df: pd.DataFrame) -> Union | None:
    """The union structure of ``df``'s grid, or None when its sub-grids all have the same parameters."""
    spec = _spec_of(df)
    if spec is None or len(spec.subgrids) < 2:
        return None
    extra = list(spec.random["params"]) if spec.random else []
    if spec.repeat > 1 and "seed" not in extra:
        extra.append("seed")
    groups: dict[tuple, list[int]] = {}
    for i, sub in enumerate(spec.subgrids):
        rename = df.attrs.get("renamed", {})
        names = tuple(dict.fromkeys(rename.get(n, n) for n in [name for _, candidates in sub for name, _ in candidates[0]] + extra))
        groups.setdefault(names, []).append(i)
    if len(groups) < 2:
        return None
    labels = {names: f"grid[{','.join(map(str, indices))}]" for names, indices in groups.items()}
    by_id: dict[str, str] = {}
    from gridrunner.spec import expand

    for names, indices in groups.items():
        for i in indices:
            for row in expand(dataclasses.replace(spec, subgrids=[spec.subgrids[i]])):
                by_id.setdefault(row.row_id, labels[names])
    label = df["row_id"].astype(str).map(by_id)
    unknown = label.isna()
    if unknown.any():
        params = [p for p in df.attrs.get("params", []) if p in df.columns]
        has = df.loc[unknown, params].notna()
        fallback = pd.Series(None, index=has.index, dtype=object)
        for names in groups:
            fits = ~has.loc[:, [p for p in params if p not in names]].any(axis=1)
            fallback = fallback.where(fallback.notna() | ~fits, labels[names])
        label[unknown] = fallback.fillna("other")
    all_params = {p for names in groups for p in names}
    partial = {
        p: [labels[names] for names in groups if p in names]
        for p in all_params
        if any(p not in names for names in groups)
    }
    group_params = {labels[names]: list(names) for names in groups}
    if (label == "other").any():
        group_params["other"] = []
    return Union(group_params, label.astype(object), partial)


def _spec_of(df: pd.DataFrame):
    """The grid's spec as a validated ``Spec``, or None when ``df.attrs`` holds no usable one."""
    spec = df.attrs.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), list):
        return None
    from gridrunner.errors import GridError
    from gridrunner.spec import validate

    clean = {k: v for k, v in spec.items() if k not in ("project_dir", "source", "made_at")}
    try:
        return validate(clean, check_task=False)
    except GridError:
        return None


def union_sentence(union: Union, params: list[str]) -> str:
    """How parameters that exist in only some sub-grids were modelled, in words."""
    partial = [p for p in params if p in union.partial]
    where = "; ".join(f"{p} only in {', '.join(union.partial[p])}" for p in partial)
    return (
        f"the grid is a union of sub-grids with different parameters ({where}). "
        "The sub-grid enters as a factor C(subgrid), and each parameter that exists in only some sub-grids is "
        "modelled within the sub-grids that have it: in the rows of other sub-grids it is held at its first "
        "level (numbers: its smallest value), so its coefficients compare levels within its own sub-grids, "
        "and C(subgrid) compares the sub-grids at those first levels"
    )
