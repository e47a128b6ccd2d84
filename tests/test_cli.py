"""The command line: help everywhere, one-line errors with exit codes, and each command end to end."""
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
