"""Learning curves: the ``history.jsonl`` each row logs through ``ctx.log`` (``rows/<row_id>/history.jsonl``)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

HISTORY_FILE = "history.jsonl"


def read_history(grid_dir: str | Path, row_id: str) -> pd.DataFrame:
    """One row's logged curve (``step``, ``time`` and its metrics); empty when it logged nothing.

    Lines that are not JSON objects (a line cut short by a killed worker) are skipped.
    """
    path = Path(grid_dir) / "rows" / str(row_id) / HISTORY_FILE
    if not path.exists():
        return pd.DataFrame()
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return pd.DataFrame(records)


def curve_key(history: pd.DataFrame) -> str | None:
    """The quantity to draw: ``loss`` where logged, else the first numeric column other than step and time."""
    if "loss" in history.columns:
        return "loss"
    for column in history.columns:
        if column not in ("step", "time") and pd.api.types.is_numeric_dtype(history[column]):
            return column
    return None
