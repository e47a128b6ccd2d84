"""What every benchmark shares: grids of toy rows, worker processes, execution counts, statistics and
the tables in ``bench/README.md``.

Scratch data goes under ``bench/runs/`` (git-ignored). Each benchmark script rewrites its own section
of the README, between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``, with the table it measured,
the machine it ran on and the command that reproduces it.
"""
from __future__ import annotations

import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RUNS = BENCH_DIR / "runs"
README = BENCH_DIR / "README.md"
PYTHON = sys.executable

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compile_bytecode() -> None:
    """Write the ``.pyc`` files of ``gridrunner/`` and ``tasks/``, as an installed package has them. Every
    worker and spawner the benchmarks start imports them; where ``PYTHONDONTWRITEBYTECODE`` is set, nothing
    else writes them, and each process would compile the sources again (about 30 ms of CPU per worker)."""
    import compileall

    for package in ("gridrunner", "tasks"):
        compileall.compile_dir(str(ROOT / package), quiet=1)


compile_bytecode()


def gridrunner_command() -> list[str]:
    """The ``gridrunner`` command the benchmarks run: ``$BENCH_GRIDRUNNER`` if set (to measure another
    build side by side), else the console script of this interpreter's environment, else ``python -m``."""
    if os.environ.get("BENCH_GRIDRUNNER"):
        return shlex.split(os.environ["BENCH_GRIDRUNNER"])
    script = Path(PYTHON).parent / "gridrunner"
    return [str(script)] if script.exists() else [PYTHON, "-m", "gridrunner.cli"]


def scratch(name: str) -> Path:
    """An empty scratch folder ``bench/runs/<name>``."""
    path = RUNS / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def two_factors(rows: int) -> tuple[int, int]:
    """``a * b == rows`` with ``a`` the largest divisor not above the square root (a 2-D grid of ``rows``)."""
    a = int(math.isqrt(rows))
    while rows % a:
        a -= 1
    return a, rows // a


def write_spec(path: Path, name: str, task: str, rows: int, outcomes: list[str], fixed: dict | None = None,
               **extra) -> Path:
    """A spec of ``rows`` rows: parameters ``a`` and ``b`` crossed (unless ``extra`` gives a ``grid``)."""
    a, b = two_factors(rows)
    spec = {"name": name, "task": task, "grid": {"a": list(range(a)), "b": list(range(b))}, "outcomes": outcomes}
    if fixed:
        spec["fixed"] = fixed
    spec.update(extra)
    path.write_text(yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100_000), encoding="utf-8")
    return path


def make_grid(spec: Path, runs_dir: Path) -> Path:
    """``gridrunner make`` in a subprocess; returns the grid directory."""
    subprocess.run([*gridrunner_command(), "make", str(spec), "--runs", str(runs_dir)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    name = yaml.safe_load(spec.read_text())["name"]
    return runs_dir / name


@dataclass
class Timed:
    wall_s: float
    cpu_s: float  # user + system time of every process started, and of their children
    peak_rss_mb: float  # the largest peak RSS among them (RUSAGE_CHILDREN's ru_maxrss)
    codes: list


def _children_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def run_processes(commands: list[list[str]], timeout_s: float = 3600, env: dict | None = None) -> Timed:
    """Start every command at once and wait for all; wall time from the first start to the last exit."""
    cpu0, _ = _children_cpu()
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
             for cmd in commands]
    codes = []
    deadline = start + timeout_s
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(deadline - time.perf_counter(), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode:
            sys.stderr.write(err.decode(errors="replace")[-2000:])
        codes.append(proc.returncode)
    wall = time.perf_counter() - start
    cpu1, rss = _children_cpu()
    return Timed(wall, cpu1 - cpu0, rss, codes)


def measure_command(command: list[str], timeout_s: float = 3600) -> Timed:
    """One command in a subprocess: wall time, CPU time and its peak RSS (from ``wait4``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
    proc.stderr.close()
    return Timed(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, [proc.returncode])


def gridrunner_workers(grid_dir: Path, n: int, *extra: str) -> list[list[str]]:
    """``gridrunner work`` commands for ``n`` workers on home shards 0 .. n-1."""
    base = gridrunner_command()
    return [[*base, "work", "--grid", str(grid_dir), "--shard", str(i), "-q", *extra] for i in range(n)]


def count_executions(record: Path, expected: set[str]) -> tuple[int, int, Counter]:
    """From a ``record_to`` side file: (rows started more than once, expected rows never finished, starts per row)."""
    starts: Counter = Counter()
    finished = set()
    if record.exists():
        with open(record, encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 2:
                    continue
                if parts[0].startswith("start"):
                    starts[parts[1]] += 1
                elif parts[0] == "finish":
                    finished.add(parts[1])
    duplicates = sum(1 for row, k in starts.items() if k > 1)
    missing = len(expected - finished)
    return duplicates, missing, starts


def grid_row_ids(grid_dir: Path) -> dict[str, str]:
    """Every row id of a grid and its status, read through gridrunner's store."""
    from gridrunner.store import STATUS, GridStore

    out = {}
    for shard in GridStore(grid_dir).read_all():
        p = shard.n_params
        for i in shard.valid():
            fields = shard.records[i]
            out[fields[p]] = fields[p + STATUS]
    return out


# --------------------------------------------------------------------------- statistics

def median(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def spread(values) -> str:
    """``min–max`` of the repeats (empty for a single one)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) < 2:
        return ""
    return f"{fmt(min(values))}–{fmt(max(values))}"


def fmt(value: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, no exponent for everyday sizes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(digits - 1 - magnitude, 0)
    return f"{value:,.{decimals}f}"


def with_spread(values, digits: int = 3) -> str:
    """``median (min–max)`` of repeats."""
    s = spread(values)
    return fmt(median(values), digits) + (f" ({s})" if s else "")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the machine and the README

def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


START_COMMIT = _commit()  # the code the run started with; others may commit while a long run goes on


def machine_line(load_before: str) -> str:
    commit = _commit()
    if commit != START_COMMIT:
        commit = f"{START_COMMIT} (HEAD was {commit} at the end)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "gridrunner"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Measured {when} at commit {commit}{' (gridrunner/ modified)' if dirty else ''}, Python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs; load average (1, 5, 15 min) "
            f"{load_before} before, {load_average()} after.")


def update_readme(name: str, body: str) -> None:
    """Replace the README's section ``name`` (between its markers) with ``body``; append it if missing."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text, encoding="utf-8")
    print(f"updated {README.relative_to(ROOT)} ({name})")


def command_line() -> str:
    """The command that ran this benchmark, as the README shows it."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    args = " ".join(sys.argv[1:])
    return f".venv/bin/python {script}{' ' + args if args else ''}"


def section(title: str, load_before: str, minutes: float) -> list[str]:
    """The first lines of a README section: its heading, the command that reproduces it, the machine."""
    return [f"## {title}", "", "```", command_line(), "```", "",
            machine_line(load_before) + f" The whole run took {minutes:.1f} minutes.", ""]


def publish(name: str, lines: list[str], readme: bool = True) -> None:
    """Print a section and, unless ``readme`` is false, write it between its markers in bench/README.md."""
    text = "\n".join(lines)
    print(text)
    if readme:
        update_readme(name, text)
