"""Spreadsheets are real users: a shard saved by pandas or by LibreOffice Calc keeps every recorded result.

Each test records what the tool changed in the file (the README's "What spreadsheets change" lists the
same), then lets one transaction merge the saved file: the values the tool rewrote are equal values,
so the committed text (full-precision metrics) comes back, and the edits made in the tool are applied.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridrunner.reconcile import fingerprint, same_value
from gridrunner.store import GridStore
from gridrunner.worker import Worker
from gridtools import make_grid

SPEC = {"task": "gridrunner.tasks.toy:quadratic", "outcomes": ["score", "runtime_proxy"], "max_len": 100,
        "grid": {"x": [1.0e-05, 0.0001, 0.5], "loss": ["l1", "l2"], "flag": [True, False], "filters": [[16, 32]]},
        "fixed": {"noise": 0.05}}


@pytest.fixture
def finished(tmp_path):
    """A grid of 12 rows with 8 done (full-precision metrics) and 4 not run."""
    grid = make_grid(tmp_path, SPEC)
    Worker(grid, shard=0, steal=False, max_rows=8, inline=True, handle_signals=False).run()
    shard = grid / "shards" / "shard-000.csv"
    return grid, shard, shard.read_text()


def _cells(text: str) -> list[list[str]]:
    return [r for r in csv.reader(io.StringIO(text)) if r]


def _changed_cells(before: str, after: str) -> set[tuple[str, str, str]]:
    """(column, old text, new text) of every cell the tool rewrote."""
    old, new = _cells(before), _cells(after)
    assert len(old) == len(new) and old[0] == new[0]
    return {(old[0][j], a, b) for r, s in zip(old[1:], new[1:]) for j, (a, b) in enumerate(zip(r, s)) if a != b}


def _merge(grid: Path, shard: Path):
    store = GridStore(grid)
    with store.transaction(shard) as merged:
        note = merged.note
    return note


def test_a_pandas_round_trip_changes_cells_but_no_value_and_keeps_every_result(finished):
    pd = pytest.importorskip("pandas")
    grid, shard, committed = finished
    pd.read_csv(shard).to_csv(shard, index=False)
    changes = _changed_cells(committed, shard.read_text())
    # What pandas changes: booleans are capitalised, a column with empty cells becomes float.
    assert ("flag", "true", "True") in changes and ("flag", "false", "False") in changes
    assert all(same_value(a) == same_value(b) for _, a, b in changes), changes
    assert _merge(grid, shard) == "shard-000.csv was saved by hand: no change to any row"
    assert shard.read_text() == committed  # gridrunner's own text is back, byte for byte


def test_a_pandas_edit_resets_a_row_and_appends_one(finished):
    pd = pytest.importorskip("pandas")
    grid, shard, committed = finished
    frame = pd.read_csv(shard, dtype=str, keep_default_na=False)
    done = frame.index[frame["status"] == "done"][0]
    frame.loc[done, "status"] = "not_run"
    extra = {c: "" for c in frame.columns} | {"x": "2.5", "loss": "l1", "flag": "true", "filters": "[16, 32]",
                                               "status": "not_run", "attempts": "0"}
    frame = pd.concat([frame, pd.DataFrame([extra])], ignore_index=True)
    frame.to_csv(shard, index=False)
    assert _merge(grid, shard) == "shard-000.csv was saved by hand over an older version: applied 1 added row, " \
                                  "applied 1 reset"
    rows = _cells(shard.read_text())
    header = rows[0]
    assert len(rows) == 14 and rows[-1][header.index("x")] == "2.5"
    assert rows[1 + done][header.index("status")] == "not_run"
    kept = [r for k, r in enumerate(_cells(committed)[1:]) if k != done]
    assert all(r in rows for r in kept)  # every other row exactly as committed


def _soffice_round_trip(shard: Path, profile: Path, out: Path) -> str:
    soffice = shutil.which("soffice")
    if soffice is None:
        pytest.skip("LibreOffice is not installed (apt-get install libreoffice-calc)")
    out.mkdir()
    command = [soffice, f"-env:UserInstallation=file://{profile}", "--headless", "--convert-to",
               'csv:Text - txt - csv (StarCalc):44,34,76,1,,0,false,true,false,false', "--outdir", str(out), str(shard)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "HOME": str(profile.parent)})
    saved = out / shard.name
    assert result.returncode == 0 and saved.exists(), result.stdout + result.stderr
    return saved.read_text()


def test_a_libreoffice_save_rounds_metrics_yet_the_full_precision_results_survive(finished, tmp_path):
    grid, shard, committed = finished
    saved = _soffice_round_trip(shard, tmp_path / "lo-profile", tmp_path / "lo-out")
    changes = _changed_cells(committed, saved)
    columns = {c for c, _, _ in changes}
    # What LibreOffice Calc 7.4 changes: metrics rounded to 15 significant digits, 1e-05 written 0.00001.
    assert ("x", "1e-05", "0.00001") in changes, changes
    assert "score" in columns and all(len(b.replace("-", "").replace(".", "").lstrip("0")) <= 15
                                      for c, _, b in changes if c == "score")
    assert all(same_value(a) == same_value(b) for _, a, b in changes), changes
    shard.write_text(saved)
    assert _merge(grid, shard) == "shard-000.csv was saved by hand: no change to any row"
    assert shard.read_text() == committed


def test_a_reset_made_in_libreoffice_is_applied_and_the_rest_keeps_full_precision(finished, tmp_path):
    grid, shard, committed = finished
    rows = _cells(committed)
    header = rows[0]
    done = next(k for k, r in enumerate(rows) if r[header.index("status")] == "done")
    rows[done][header.index("status")] = "not_run"
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    edited = tmp_path / "edit" / shard.name
    edited.parent.mkdir()
    edited.write_text(out.getvalue())
    shard.write_text(_soffice_round_trip(edited, tmp_path / "lo-profile", tmp_path / "lo-out"))
    assert _merge(grid, shard) == "shard-000.csv was saved by hand over an older version: applied 1 reset"
    after = _cells(shard.read_text())
    assert after[done][header.index("status")] == "not_run" and after[done][header.index("score")] == ""
    assert [r for k, r in enumerate(after) if k != done] == [r for k, r in enumerate(_cells(committed)) if k != done]


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_float_and_its_15_digit_rounding_are_the_same_value(x):
    assert same_value(repr(x)) == same_value(format(x, ".15g"))


@given(st.integers(min_value=-10 ** 15 + 1, max_value=10 ** 15 - 1))
def test_an_integer_written_as_a_float_is_the_same_value(n):
    assert same_value(str(n)) == same_value(f"{n}.0") == same_value(format(float(n), ".15g"))


@pytest.mark.parametrize("a, b", [("0.0001", "1e-4"), ("1e-05", "0.00001"), ("TRUE", "true"), ("False", "false"),
                                  ("[16, 32]", "[16,32]"), (" 3", "3"), ("0.5884171540468066", "0.588417154046807")])
def test_cells_that_mean_the_same_value_are_equal(a, b):
    assert same_value(a) == same_value(b)
    assert fingerprint(["x", a]) == fingerprint(["x", b])


@pytest.mark.parametrize("a, b", [("0.1", "0.2"), ("l1", "L1"), ("x", "y"), ("[16, 32]", "[32, 16]"), ("1", "")])
def test_cells_that_mean_different_values_differ(a, b):
    assert same_value(a) != same_value(b)
