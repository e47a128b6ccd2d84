"""Run a spec through the real command line, in this process: ``make``, ``work --inline``, ``analyze``.

Imported by name (like ``analysis_grids``). The task ``synthetic:run`` is tests/analysis/synthetic.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from click.testing import CliRunner

from gridrunner.cli import main
from gridrunner.shardfile import is_number


@dataclass
class Analysed:
    grid_dir: Path
    exit_code: int
    output: str

    @property
    def report_dir(self) -> Path:
        return self.grid_dir / "report"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def make_and_run(root: Path, spec: dict, max_rows: int | None = None, running: int = 0) -> Path:
    """Write ``spec``, make it under ``root/runs``, run it inline (``max_rows`` rows, else all), and mark
    ``running`` of the rows left ``running`` (claimed by a worker that never finishes them)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{spec.get('name', 'g')}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    made = invoke("make", path, "--runs", root / "runs")
    assert made.exit_code == 0, made.output
    grid_dir = root / "runs" / spec.get("name", "g")
    extra = ["--max-rows", max_rows] if max_rows else []
    worked = invoke("work", "--grid", grid_dir, "--inline", "--quiet", "--no-linger", *extra)
    assert worked.exit_code == 0, worked.output
    if running:
        mark_running(grid_dir, running)
    return grid_dir


def mark_running(grid_dir: Path, count: int) -> None:
    """Set ``count`` not-run rows to ``running`` through the store, as a worker's claim would."""
    from gridrunner.store import ATTEMPTS, STARTED, STATUS, WORKER, GridStore, now_iso

    store = GridStore(grid_dir)
    left = count
    for path in store.shard_paths():
        with store.transaction(path) as shard:
            for i in shard.valid():
                if left and shard.cell(i, STATUS) == "not_run":
                    shard.set(i, STATUS, "running")
                    shard.set(i, WORKER, "elsewhere:1")
                    shard.set(i, ATTEMPTS, "1")
                    shard.set(i, STARTED, now_iso())
                    left -= 1


def analyse(grid_dir: Path, *args: str) -> Analysed:
    result = invoke("analyze", "--grid", grid_dir, *args)
    return Analysed(grid_dir, result.exit_code, result.output)


def check_contract(analysed: Analysed) -> None:
    """The promise of ``analyze`` on a grid ``make`` accepted: a report and exit 0, or one ``Error:`` line
    saying that no model can be fitted and exit 1, with nothing written."""
    assert analysed.exit_code in (0, 1), analysed.output
    if analysed.exit_code == 0:
        assert (analysed.report_dir / "index.html").exists() and (analysed.report_dir / "report.md").exists()
        assert (analysed.report_dir / "failure_conditions.csv").exists()
        assert "Failure conditions: " in analysed.output
        assert not any(line.startswith("Error") for line in analysed.output.splitlines())
        assert formula_cells(analysed.report_dir) == []
    else:
        lines = analysed.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "no model can be fitted" in lines[0], analysed.output
        assert not analysed.report_dir.exists()


def formula_cells(report_dir: Path) -> list[tuple[str, str]]:
    """(file, cell) of every cell of the report's CSVs that a spreadsheet would read as a formula: one that
    starts with ``= + - @`` (or a tab or carriage return) and is not a number."""
    import csv

    found = []
    for path in sorted(Path(report_dir).glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                for cell in row:
                    if cell.startswith(("=", "+", "-", "@", "\t", "\r")) and not is_number(cell):
                        found.append((path.name, cell))
    return found


