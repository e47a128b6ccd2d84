"""Helpers shared by the core tests: write specs, make grids, start real worker processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from gridrunner.grid import make


def write_spec(directory: Path, spec: dict | str, name: str = "g") -> Path:
    path = Path(directory) / f"{name}.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def make_grid(directory: Path, spec: dict, name: str = "g") -> Path:
    """Write ``spec`` and make it under ``directory/runs``; returns the grid directory."""
    report = make(write_spec(directory, spec, name), Path(directory) / "runs")
    return report.grid_dir


def worker_cmd(grid_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "gridrunner.cli", "work", "--grid", str(grid_dir), "--quiet", *args]


def start_worker(grid_dir: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(worker_cmd(grid_dir, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def events(side_file: Path) -> Counter:
    """Count ``<event> <row_id>`` lines written by the toy tasks' ``record_to``."""
    counts: Counter = Counter()
    if not Path(side_file).exists():
        return counts
    for line in Path(side_file).read_text().splitlines():
        event, row_id, _pid = line.split()
        counts[(event, row_id)] += 1
    return counts


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
