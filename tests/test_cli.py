"""The command line: help everywhere, one-line errors with exit codes, and each command end to end."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gridrunner.cli import main
from gridtools import write_spec

SPEC = "task: gridrunner.tasks.toy:quadratic\ngrid:\n  x: [0.0, 1.0]\n  loss: [l1, ssim]\nmax_len: 2\noutcomes: [score, runtime_proxy]\n"


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, SPEC, "demo")
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_help_for_every_command_without_heavy_imports():
    for command in [[]] + [[name] for name in main.commands]:
        result = invoke(*command, "--help")
        assert result.exit_code == 0, command
        assert "Usage:" in result.output
    code = ("import sys, gridrunner.cli; from click.testing import CliRunner; "
            "CliRunner().invoke(gridrunner.cli.main, ['--help']); "
            "print(sorted(m for m in ('tensorflow', 'pandas', 'statsmodels', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_make_work_status_reset_split(project):
    result = invoke("make", "demo.yaml")
    assert result.exit_code == 0
    assert result.output == "runs/demo: 4 rows in the spec; 0 already there, wrote 4 new in 2 shard file(s)\n"
    result = invoke("work", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("status")
    assert result.exit_code == 0
    assert "4/4 finished" in result.output and "shard-001.csv" in result.output
    result = invoke("reset", "--where", "x == 1.0", "--dry-run")
    assert result.output == "would reset 2 row(s)\n"
    result = invoke("reset", "--where", "x == 1.0")
    assert result.output == "reset 2 row(s)\n"
    assert "2 not_run" in invoke("status").output
    result = invoke("split", "--shard", "0", "--into", "2")
    assert result.exit_code == 0 and "shard-002.csv" in result.output


@pytest.mark.parametrize("args, message", [
    (["status"], "Error: no grid under runs/; run `gridrunner make SPEC` first, or pass --grid PATH\n"),
    (["status", "--grid", "nowhere"],
     "Error: nowhere is not a grid directory (no spec.yaml); run `gridrunner make SPEC` first\n"),
    (["work", "--grid", "demo.yaml"],
     "Error: demo.yaml is a spec file, not a grid directory; run `gridrunner make demo.yaml` and pass --grid "
     "runs/demo\n"),
    (["make", "missing.yaml"], "Error: missing.yaml: no such spec file\n"),
])
def test_user_errors_are_one_line_exit_1_and_change_nothing(project, args, message):
    before = snapshot(project)
    result = CliRunner().invoke(main, args)
    assert (result.exit_code, result.output) == (1, message)
    assert snapshot(project) == before


def test_usage_errors_exit_2(project):
    invoke("make", "demo.yaml")
    before = snapshot(project)
    result = CliRunner().invoke(main, ["split", "--shard", "0", "--into", "1"])
    assert result.exit_code == 2 and "Invalid value for '--into': 1 is not in the range x>=2." in result.output
    result = CliRunner().invoke(main, ["reset", "--status", "broken"])
    assert result.exit_code == 2 and "'broken' is not one of" in result.output
    assert snapshot(project) == before


@pytest.mark.parametrize("args", [["reset", "--where", "x + 1"], ["reset", "--where", "1"],
                                  ["analyze", "--failure", "score + 1"]])
def test_regression_a_rule_that_is_not_a_condition_is_refused_and_changes_nothing(project, args):
    """`reset --where 'x + 1'` reset every row whose x was not -1: a finished grid's results were gone."""
    invoke("make", "demo.yaml")
    invoke("work", "--quiet")
    before = snapshot(project)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: a rule must be a condition (a comparison, 'in', 'and', 'or', 'not')")
    assert result.output.count("\n") == 1
    assert snapshot(project) == before


def test_regression_reset_of_a_row_its_status_leaves_out_says_which_status_takes_it(project):
    """`reset --row <id of a done row> --status failed` said "reset 0 row(s)" and nothing more."""
    invoke("make", "demo.yaml")
    invoke("work", "--quiet")
    import csv

    with open(project / "runs" / "demo" / "shards" / "shard-000.csv", newline="") as fh:
        row_id = next(csv.DictReader(fh))["row_id"]
    result = invoke("reset", "--row", row_id, "--status", "failed")
    assert result.output == ("reset 0 row(s); left 1 row(s) given by --row as they are, for their status (done): "
                             "add --status done to reset them\n")
    assert invoke("reset", "--row", row_id).output == "reset 1 row(s)\n"


def test_regression_the_runs_default_is_shown_once_in_help(project):
    out = invoke("status", "--help").output
    assert "(default: ./runs)" not in out and out.count("[default: runs]") == 1


def test_reset_of_an_unknown_row_changes_nothing(project):
    invoke("make", "demo.yaml")
    invoke("work", "--quiet")
    before = snapshot(project)
    result = CliRunner().invoke(main, ["reset", "--row", "0123456789ab"])
    assert (result.exit_code, result.output) == (1, "Error: no row '0123456789ab' in runs/demo (1 unknown id(s))\n")
    assert snapshot(project) == before


def test_an_unexpected_error_saves_its_traceback(project, monkeypatch):
    import gridrunner.grid

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(gridrunner.grid, "make", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(project / "cache"))
    result = CliRunner().invoke(main, ["make", "demo.yaml"])
    assert result.exit_code == 3
    assert "Error: unexpected ZeroDivisionError: boom. This is a bug in gridrunner; the traceback is in" in result.output
    (log,) = (project / "cache" / "gridrunner").glob("crash-*.log")
    assert "ZeroDivisionError: boom" in log.read_text()


# --------------------------------------------------------------------------- a reader that closes the pipe early

def _gridrunner(project, *args, **kwargs):
    """The real command in a fresh process, from ``project``, its crash logs (if any) under project/cache."""
    env = {**os.environ, "XDG_CACHE_HOME": str(project / "cache")}
    return subprocess.Popen([sys.executable, "-m", "gridrunner.cli", *args], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.parametrize("args", [
    ["status", "--json"], ["status"], ["--help"], ["status", "--help"], ["make", "demo.yaml", "--dry-run"],
    ["reset", "--dry-run"], ["recover"],
])
def test_regression_a_closed_stdout_pipe_ends_the_command_with_141_silently(project, args):
    # was: exit 3, "unexpected BrokenPipeError" (status --json, reset, recover, make, a command's --help), or
    # exit 1 with no message (text status, the group's --help)
    invoke("make", "demo.yaml")  # an unfinished grid
    before = snapshot(project)
    proc = _gridrunner(project, *args)
    proc.stdout.close()  # as `| true` does: the reader is gone before the first write
    stderr = proc.stderr.read().decode()
    assert (proc.wait(timeout=60), stderr) == (141, "")
    assert snapshot(project) == before  # no crash log either


def test_regression_a_watch_whose_reader_takes_one_line_ends_with_141(project):
    # `gridrunner status --json --watch | head -1` on an unfinished grid: the second document meets the closed pipe
    invoke("make", "demo.yaml")
    proc = _gridrunner(project, "status", "--json", "--watch", "0.1")
    assert json.loads(proc.stdout.readline())["finished"] is False
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert (proc.wait(timeout=60), stderr) == (141, "")
    assert not (project / "cache").exists()


# --------------------------------------------------------------------------- durations that never come

@pytest.mark.parametrize("args, message", [
    (["status", "--watch", "nan"], "Invalid value for '--watch': nan is not a finite number of seconds up to 1e+09."),
    (["status", "--watch", "inf"], "Invalid value for '--watch': inf is not a finite number of seconds up to 1e+09."),
    (["status", "--watch", "-1"], "Invalid value for '--watch': -1.0 is not in the range x>=0.1."),
    (["status", "--watch=-1"], "Invalid value for '--watch': -1.0 is not in the range x>=0.1."),
    (["work", "--lease", "inf"], "Invalid value for '--lease': inf is not a finite number of seconds up to 1e+09."),
    (["work", "--lease", "1e308"], "Invalid value for '--lease': 1e308 is not a finite number of seconds up to 1e+09."),
    (["work", "--lease", "nan"], "Invalid value for '--lease': nan is not a finite number of seconds up to 1e+09."),
    (["work", "--grace", "nan"], "Invalid value for '--grace': nan is not a finite number of seconds up to 1e+09."),
    (["submit", "--mem", "inf"], "Invalid value for '--mem': inf is not a finite number of GB up to 1e+06."),
])
def test_regression_non_finite_or_huge_durations_are_usage_errors_that_name_the_option(project, args, message):
    # was: status --watch nan/inf crashed (ValueError in sleep, OverflowError), --lease inf killed the heartbeat
    # thread, and --watch -1 said "No such option '-1'"
    invoke("make", "demo.yaml")
    before = snapshot(project)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"Error: {message}"
    assert snapshot(project) == before


def test_regression_a_spec_lease_of_inf_is_refused_by_make(project):
    # was: accepted, then every worker's heartbeat thread died with OverflowError (timestamp out of range)
    write_spec(project, SPEC + "lease_s: .inf\n", "inf")
    result = CliRunner().invoke(main, ["make", "inf.yaml"])
    assert (result.exit_code, result.output) == (
        1, "Error: inf.yaml:7, at key lease_s: expected at most 1e+09 seconds (about 32 years), got inf\n")
    assert not (project / "runs").exists()


def test_a_broken_pipe_of_gridrunners_own_is_still_a_bug(project, monkeypatch):
    # stdout and stderr are fine: the pipe that broke is an internal one (the worker's spawner), so exit 3
    import gridrunner.grid

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(gridrunner.grid, "make", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(project / "cache"))
    result = CliRunner().invoke(main, ["make", "demo.yaml"])
    assert result.exit_code == 3
    assert "Error: unexpected BrokenPipeError: [Errno 32] Broken pipe. This is a bug in gridrunner" in result.output


@pytest.mark.parametrize("dist, message", [
    ("{uniform: [0, .inf]}", "random.params.r.uniform: the bounds must be finite numbers, got [0, inf]"),
    ("{uniform: [-.inf, 0]}", "random.params.r.uniform: the bounds must be finite numbers, got [-inf, 0]"),
    ("{uniform: [-1.0e+308, 1.0e+308]}", "random.params.r.uniform: high - low must be a finite number (at most "
                                         "1.8e+308) to sample from, got [-1e+308, 1e+308]"),
    ("{loguniform: [1.0e-300, .inf]}", "random.params.r.loguniform: the bounds must be finite numbers, got [1e-300, inf]"),
    ("{uniform: [0, 100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000]}",
     "random.params.r.uniform: the bounds must be finite numbers, got [0, 1e+309 or more]"),
    ("{int: [0, 100000000000000000000]}", "random.params.r.int: int needs bounds within 64-bit integers "
                                          "(-9223372036854775808 to 9223372036854775807), got [0, 100000000000000000000]"),
])
def test_regression_random_bounds_numpy_cannot_sample_are_refused_with_their_key_and_nothing_is_written(project, dist, message):
    # was: exit 3, OverflowError in spec._random_candidates ("high - low range exceeds valid bounds", "high is
    # out of bounds for int64"), with runs/ left behind
    write_spec(project, SPEC + f"random: {{n: 2, params: {{r: {dist}}}}}\n", "rnd")
    before = snapshot(project)
    result = CliRunner().invoke(main, ["make", "rnd.yaml"])
    assert (result.exit_code, result.output) == (1, f"Error: rnd.yaml:7, at key {message}\n")
    assert snapshot(project) == before and not (project / "runs").exists()


@pytest.mark.parametrize("extra, message", [
    ('exclude: ["log(a) > 5"]\n', "at key exclude[0]: log() failed: math domain error in 'log(a) > 5' "
                                  "(on the row a=0, b=x)"),
    ("cost: sqrt(a - 1)\n", "at key cost: sqrt() failed: math domain error in 'sqrt(a - 1)' (on the row a=0, b=x)"),
])
def test_regression_a_make_that_fails_on_a_rule_writes_nothing_to_an_existing_grid(project, extra, message):
    # was: "Error: log() failed: math domain error in 'log(a) > 5'" (no file, no key), after shard-004/005 and
    # their journals were written for the rows before a=0, with spec.yaml not updated
    write_spec(project, "task: gridrunner.tasks.toy:noop\ngrid:\n  a: [1, 2, 3, 4]\n  b: [x, y]\nmax_len: 2\n"
                        "outcomes: [value]\n", "g")
    assert invoke("make", "g.yaml").exit_code == 0
    assert invoke("work", "--quiet", "--no-linger").exit_code == 0
    before = snapshot(project)
    write_spec(project, "task: gridrunner.tasks.toy:noop\ngrid:\n  a: [1, 2, 3, 4, 5, 6, 0]\n  b: [x, y]\nmax_len: 2\n"
                        "outcomes: [value]\n" + extra, "g")
    result = CliRunner().invoke(main, ["make", "g.yaml"])
    assert (result.exit_code, result.output) == (1, f"Error: g.yaml:7, {message}\n")
    after = snapshot(project)
    del after[project / "g.yaml"], before[project / "g.yaml"]
    assert after == before
