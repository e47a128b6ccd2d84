"""Places gridrunner cannot write (a read-only grid, a `--runs` or `--out` that cannot be created): one
`Error:` line that names the place and why, exit 1, nothing changed on disk; never exit 3.

Permissions are tested with the real command in a fresh process. Root ignores them, so as root it runs
under `setpriv` without the capabilities that bypass file permissions, as an ordinary user would.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gridrunner.cli import main
from gridtools import write_spec

SPEC = {"task": "gridrunner.tasks.toy:quadratic", "grid": {"x": [0.0, 0.5, 1.0], "loss": ["l1", "ssim"]},
        "repeat": 2, "max_len": 6, "outcomes": ["score", "runtime_proxy"]}
NO_OVERRIDE = ["--bounding-set", "-dac_override,-dac_read_search,-fowner", "--inh-caps", "-all"]


def as_a_user(project: Path, *args: str) -> subprocess.CompletedProcess:
    """``gridrunner ARGS`` from ``project``, subject to file permissions even when the tests run as root."""
    argv = [sys.executable, "-m", "gridrunner.cli", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permissions cannot be tested")
        argv = [setpriv, *NO_OVERRIDE, *argv]
    env = {**os.environ, "XDG_CACHE_HOME": str(project / "cache")}
    return subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=300)


def snapshot(root: Path) -> dict:
    """Every path under ``root`` and its bytes, but the cache (matplotlib's font list, gridrunner's crash logs)."""
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
            if p.relative_to(root).parts[0] != "cache"}


def read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project whose grid ``runs/g`` has its 12 rows run; everything made writable again afterwards."""
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, SPEC)
    runner = CliRunner()
    assert runner.invoke(main, ["make", "g.yaml"]).exit_code == 0
    assert runner.invoke(main, ["work", "--inline", "--quiet", "--no-linger"]).exit_code == 0
    yield tmp_path
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def check(result: subprocess.CompletedProcess, message: str) -> None:
    assert (result.returncode, result.stdout + result.stderr) == (1, f"Error: {message}\n")


@pytest.mark.parametrize("args, message", [
    (["work", "--quiet"], "runs/g/workers: cannot write this worker's heartbeat file (Permission denied); no row was "
                          "claimed"),
    (["recover"], "runs/g/shards/shard-000.csv: cannot create the shard's lock file (Permission denied); the shard "
                  "keeps its previous content"),
    (["analyze"], "runs/g/report: cannot write the report there: runs/g is not writable (pass --out DIR)"),
    (["make", "g.yaml", "--runs", "runs/g/more"], "cannot create the runs directory runs/g/more (Permission denied); "
                                                  "nothing was written; choose another --runs DIR"),
])
def test_regression_a_read_only_grid_is_one_error_line_that_names_the_place(project, args, message):
    # was: exit 3 with "unexpected PermissionError" at workers/*.hb (work), the shard's lock (recover),
    # report/ (analyze), and the runs directory (make)
    read_only(project / "runs")
    before = snapshot(project)
    check(as_a_user(project, *args), message)
    assert snapshot(project) == before
    assert not (project / "cache" / "gridrunner").exists()  # no crash log


@pytest.mark.parametrize("runs, why", [("/dev/null", "/dev/null is not a directory"),
                                       ("notes.txt/runs", "notes.txt is not a directory")])
def test_regression_a_runs_directory_with_a_file_in_its_way_is_one_error_line(tmp_path, monkeypatch, runs, why):
    # was: exit 3 with "unexpected FileExistsError" (/dev/null) or "NotADirectoryError"
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, SPEC)
    (tmp_path / "notes.txt").write_text("a file\n")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["make", "g.yaml", "--runs", runs])
    assert (result.exit_code, result.output) == (
        1, f"Error: cannot create the runs directory {runs} ({why}); nothing was written; choose another --runs DIR\n")
    assert snapshot(tmp_path) == before


def test_regression_a_report_file_that_cannot_be_written_is_one_error_line(project):
    # the check before the models cannot foresee everything: here index.html is a directory
    (project / "runs" / "g" / "report" / "index.html").mkdir(parents=True)
    result = CliRunner().invoke(main, ["analyze"])
    assert (result.exit_code, result.output) == (
        1, "Error: runs/g/report: cannot write the report (Is a directory); pass --out DIR for another place\n")


def test_regression_recover_with_a_read_only_journal_folder_rebuilds_the_shard_and_warns_of_the_note(project):
    # was: exit 3 with "unexpected PermissionError" at journal/notes.log, after the shard was rebuilt; the
    # notes only tell what happened, so one that cannot be written is a warning
    grid = project / "runs" / "g"
    shard = sorted((grid / "shards").glob("*.csv"))[0]
    whole = shard.read_bytes()
    shard.unlink()
    (grid / "journal" / "notes.log").unlink(missing_ok=True)
    (grid / "journal").chmod(0o555)
    result = as_a_user(project, "recover")
    assert result.returncode == 0, result.stderr
    assert f"{shard.name}: the file was missing; rebuilt from the journal: 6 rows (" in result.stdout
    assert result.stderr == (f"runs/g/journal/notes.log: cannot add this note (Permission denied): {shard.name} "
                             "was missing: rebuilt from the journal\n")
    assert shard.read_bytes() == whole
    assert not (project / "cache" / "gridrunner").exists()  # no crash log
