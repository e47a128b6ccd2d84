"""One namespace: the bundled tasks and the analysis live in ``gridrunner.tasks`` and ``gridrunner.analysis``;
every spelling of a task that specs used before still resolves; the core never imports upward."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gridrunner.spawner import resolve_task, task_module_candidates
from gridtools import write_spec

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "gridrunner"


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh process, from ``cwd`` (never the repository, whose tasks/ folder would
    otherwise be importable as a top-level package through the current directory)."""
    return subprocess.run([sys.executable, "-m", "gridrunner.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("task, module, function", [
    ("dncnn", "gridrunner.tasks.dncnn", "run"),
    ("unet", "gridrunner.tasks.unet", "run"),
    ("toy:quadratic", "gridrunner.tasks.toy", "quadratic"),
    ("tasks.toy:quadratic", "gridrunner.tasks.toy", "quadratic"),
    ("tasks.toy:noop", "gridrunner.tasks.toy", "noop"),
    ("gridrunner.tasks.toy:quadratic", "gridrunner.tasks.toy", "quadratic"),
])
def test_bundled_task_spellings_resolve_to_gridrunner_tasks(task, module, function):
    func = resolve_task(task)
    assert (func.__module__, func.__name__) == (module, function)


def test_the_legacy_tasks_spelling_tries_gridrunner_first_then_a_users_own_tasks_package():
    assert task_module_candidates("tasks.toy:quadratic") == ["gridrunner.tasks.toy", "tasks.toy"]
    assert task_module_candidates("dncnn") == ["gridrunner.tasks.dncnn", "dncnn"]
    assert task_module_candidates("mytask:run") == ["mytask", "gridrunner.tasks.mytask"]


def test_a_grid_made_with_the_legacy_tasks_spelling_still_runs(tmp_path):
    write_spec(tmp_path, {"name": "old", "task": "tasks.toy:noop", "grid": {"i": [0, 1, 2]}, "outcomes": ["value"]})
    made = run_cli(tmp_path, "make", "g.yaml")
    assert made.returncode == 0, made.stderr
    grid = tmp_path / "runs" / "old"
    assert yaml.safe_load((grid / "spec.yaml").read_text())["task"] == "tasks.toy:noop"  # kept as the user wrote it
    worked = run_cli(tmp_path, "work", "--grid", str(grid), "--quiet")
    assert worked.returncode == 0, worked.stderr
    status = run_cli(tmp_path, "status", "--grid", str(grid), "--json")
    assert yaml.safe_load(status.stdout)["counts"]["done"] == 3, status.stdout


def test_a_users_own_tasks_package_still_serves_tasks_dot_names_gridrunner_does_not_bundle(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "mine.py").write_text("def run(params, ctx):\n    return {'value': params['i'] * 10}\n")
    write_spec(tmp_path, {"name": "mine", "task": "tasks.mine:run", "grid": {"i": [1, 2]}, "outcomes": ["value"]})
    assert run_cli(tmp_path, "make", "g.yaml").returncode == 0
    worked = run_cli(tmp_path, "work", "--grid", "runs/mine", "--quiet")
    assert worked.returncode == 0, worked.stderr
    status = yaml.safe_load(run_cli(tmp_path, "status", "--grid", "runs/mine", "--json").stdout)
    assert status["counts"]["done"] == 2


def imported_modules(path: Path) -> set[str]:
    """Every module that ``path`` imports, at any depth of its code (lazy imports in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def python_files(*folders: str):
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_nothing_in_the_repository_imports_the_old_top_level_tasks_or_analysis():
    offenders = [f"{path.relative_to(REPO)}: {name}"
                 for path in python_files("gridrunner", "tasks", "analysis", "tests", "bench")
                 for name in imported_modules(path)
                 if name.split(".")[0] in ("tasks", "analysis")]
    assert offenders == []


def test_the_core_imports_tasks_and_analysis_only_where_the_cli_dispatches_to_them():
    """The core modules (gridrunner/*.py) stand on their own; only the CLI's ``analyze`` calls down into
    gridrunner.analysis, lazily, and tasks are found by name at run time, never imported by the core."""
    uses = {path.relative_to(CORE).as_posix(): sorted(name for name in imported_modules(path)
                                                      if name.startswith(("gridrunner.tasks", "gridrunner.analysis")))
            for path in sorted(CORE.rglob("*.py"))}
    assert {name: found for name, found in uses.items() if found} == {"cli.py": ["gridrunner.analysis.report"]}
    code = ("import sys, pkgutil, importlib, gridrunner\n"
            "for m in pkgutil.iter_modules(gridrunner.__path__):\n"
            "    if m.name not in ('tasks', 'analysis'):\n"
            "        importlib.import_module('gridrunner.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n.startswith(('gridrunner.tasks', 'gridrunner.analysis', 'tasks', 'analysis'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path("/"), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
