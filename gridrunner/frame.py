"""Every shard of a grid as one typed pandas DataFrame (``gridrunner.load``), for analysis and notebooks.

Columns: the parameters (numbers, strings and booleans as such; integers beyond int64 as exact Python
ints in an object column; list-valued parameters, and numeric ones with NaN among their values, as
categorical labels such as ``"[100, 100]"`` or ``"nan"``), the bookkeeping columns (``status`` categorical,
``attempts`` integer, ``runtime_s`` float, ``started_at``/``finished_at`` UTC datetimes) and the
outcomes (float; an empty or non-numeric cell is NaN). ``df.attrs`` carries ``grid``, ``grid_dir``,
``params``, ``outcomes``, ``failure``, ``metric`` (the first outcome), ``spec``, ``bad_rows``
(``[(shard, line, message)]`` for rows that were skipped because they break the contract),
``unmerged`` (the shards saved by hand that no worker has merged yet: their rows are as the merge will
make them, computed without writing, so a stale copy saved over newer results never hides them),
``shard_column``: the column naming each row's shard file, ``shard`` (``_shard`` where a parameter or
outcome is named ``shard``), and ``row_params`` (:class:`RowParams`: each row's parameters by row id, as
the worker decoded them).
"""
from __future__ import annotations

import json
from pathlib import Path

from gridrunner.errors import ShardError
from gridrunner.grid import find_grid, read_resolved
from gridrunner.spec import BOOK_COLUMNS, STATUSES, decode_cell
from gridrunner.shardfile import decode_params
from gridrunner.store import GridStore


def load(grid_dir: str | Path | None = None):
    import pandas as pd

    grid_dir = find_grid(grid_dir)
    spec = read_resolved(grid_dir)
    store = GridStore(grid_dir)
    frames = []
    bad_rows = []
    params: list[str] = []
    outcomes: list[str] = list(spec.get("outcomes") or [])
    unmerged = []
    shards = []
    for path in store.shard_paths():
        try:
            shard = store.view(path)
        except ShardError as err:
            bad_rows.append((path.name, None, err.message))
            continue
        if shard.unmerged:
            unmerged.append(path.name)
        bad_rows += [(path.name, line, message) for line, message in shard.bad_rows()]
        params += [name for name in shard.params if name not in params]
        outcomes += [name for name in shard.outcomes if name not in outcomes]
        shards.append((path, shard))
    shard_column = "shard"  # the file each row is in; "_shard" where a parameter or outcome is named shard
    while shard_column in params + outcomes:
        shard_column = "_" + shard_column
    cells = RowParams()
    for path, shard in shards:
        rows = [shard.records[i] for i in shard.valid()]
        names = tuple(shard.params)
        for fields in rows:
            cells.add(fields[len(names)], names, fields[:len(names)])
        if rows:
            frame = pd.DataFrame(rows, columns=shard.header, dtype=object)
            frame.insert(len(frame.columns), shard_column, path.name)
            frames.append(frame)
    columns = params + list(BOOK_COLUMNS) + outcomes + [shard_column]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns, dtype=object)
    df = df.reindex(columns=columns)
    for name in params:
        df[name] = _typed_param(df[name], pd)
    df["status"] = pd.Categorical(df["status"], categories=list(STATUSES))
    df["attempts"] = pd.to_numeric(df["attempts"], errors="coerce").fillna(0).astype(int)
    df["runtime_s"] = pd.to_numeric(df["runtime_s"].replace("", None), errors="coerce").astype(float)
    for name in ("started_at", "finished_at"):
        df[name] = pd.to_datetime(df[name].replace("", None), format="%Y-%m-%dT%H:%M:%SZ", utc=True, errors="coerce")
    for name in ("worker", "error"):
        df[name] = df[name].fillna("").astype(str)
    for name in outcomes:
        df[name] = pd.to_numeric(df[name].replace("", None), errors="coerce").astype(float)
    df.attrs.update({
        "grid": spec.get("name"),
        "grid_dir": str(grid_dir),
        "params": params,
        "outcomes": outcomes,
        "failure": spec.get("failure"),
        "metric": outcomes[0] if outcomes else None,
        "spec": spec,
        "bad_rows": bad_rows,
        "unmerged": unmerged,
        "shard_column": shard_column,
        "row_params": cells,
    })
    return df


class RowParams:
    """Each row's parameter cells by row id; ``row_params[row_id]`` decodes them exactly as a worker decodes
    the row it claims (:func:`gridrunner.shardfile.decode_params`), so a rule evaluated on them sees the
    values the worker's did: lists as lists, ``2**63`` as an int, NaN as NaN (the typed columns cannot all
    say so). Kept in ``df.attrs``, which pandas deep-copies on every operation: it is never copied, as
    nothing changes it once ``load`` has filled it."""

    def __init__(self):
        self._cells: dict[str, tuple] = {}

    def add(self, row_id: str, names: tuple, cells) -> None:
        self._cells[row_id] = (names, tuple(cells))

    def __contains__(self, row_id) -> bool:
        return row_id in self._cells

    def __getitem__(self, row_id: str) -> dict:
        names, cells = self._cells[row_id]
        return decode_params(names, cells)

    def __len__(self) -> int:
        return len(self._cells)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _typed_param(column, pd):
    """Decode one parameter column: numbers stay numbers, lists become categorical labels."""
    values = [None if cell is None or cell == "" or (isinstance(cell, float) and cell != cell) else decode_cell(cell)
              for cell in column]
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pd.Series(values, index=column.index, dtype="boolean")
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if any(v != v for v in present):  # NaN, a value of the spec's (``.nan``): a label, never "missing"
            labels = [None if v is None else _number_label(v) for v in values]
            order = sorted(set(label for label in labels if label is not None), key=_number_order)
            return pd.Categorical(labels, categories=order)
        if any(isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX for v in present):
            # beyond int64 (2**63, 10**30, 10**400): the exact Python ints; as floats some would merge
            # (2**63 and 2**63 + 1) or overflow (10**400)
            return pd.Series(values, index=column.index, dtype=object)
        if all(isinstance(v, int) for v in present) and len(present) == len(values):
            return pd.Series(values, index=column.index, dtype="int64")
        return pd.Series(values, index=column.index, dtype=float)
    labels = [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values]
    if present and all(isinstance(v, (list, dict)) for v in present):
        order = list(dict.fromkeys(label for label in labels if label is not None))
        return pd.Categorical(labels, categories=order)
    return pd.Series(labels, index=column.index, dtype=object)


def _number_label(value) -> str:
    """``nan``, ``inf``, ``0.1``, ``3``: the text of a number as a level."""
    if isinstance(value, float):
        text = f"{value:g}"
        return text if value != value or float(text) == value else repr(value)
    return str(value)


def _number_order(label: str):
    value = float(label)
    return (value != value, value, label)  # NaN last
