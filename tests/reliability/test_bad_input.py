"""Bad input never damages state: the corpus of bad specs, hand edits and arguments, in one place.

Every case runs the real command line on a project that holds a made grid with two rows done
(click's CliRunner in this process; `gridrunner work` in a subprocess, whose log goes to stderr), and
checks the exact message and exit code, and that every file under the project, hidden ones included,
is byte for byte what it was before.

* A bad spec or argument: one ``Error: ...`` line naming the file, key or row and what would be valid;
  exit 1 (2 for click's usage errors); nothing on disk changes.
* A bad hand edit of a shard: ``gridrunner status`` reports it with its shard and line (and changes
  nothing); ``gridrunner work`` reports it the same way, runs every other row, and leaves the bad row's
  text (a bad header: the whole shard) exactly as the user left it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from gridrunner.cli import main
from gridrunner.spec import row_id_of
from gridrunner.worker import Worker
from gridtools import make_grid
from reliability_tools import cli, rows, snapshot
from test_spec import BAD_SPECS

SPEC = {"task": "gridrunner.tasks.toy:noop", "grid": {"a": [1, 2, 3], "b": ["x", "y"]}, "outcomes": ["value"], "max_len": 3}
SHARD = "runs/g/shards/shard-000.csv"  # rows a=1 b=x, 1 y (both done), 2 x (not run); shard-001 holds the rest
ID_2X = row_id_of({"a": 2, "b": "x"})


@pytest.fixture
def grid(project):
    """``runs/g`` made from ``g.yaml``, with the first two rows of shard 0 done."""
    path = make_grid(project, SPEC)
    summary = Worker(path, shard=0, steal=False, max_rows=2, inline=True, handle_signals=False).run()
    assert summary.done == 2
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


# ============================================================================
# Specs and arguments: one error, exit 1 or 2, nothing changed
# ============================================================================

GOOD = "task: gridrunner.tasks.toy:noop\ngrid: {x: [1, 2]}\noutcomes: [value]\n"
CANARY = "pwned"  # the file a spec that ran code would create
BOMB = "".join(f"l{k}: &l{k} [{', '.join([f'*l{k - 1}' if k else '1'] * 10)}]\n" for k in range(9))

#: More bad specs, beside tests/test_spec.py's BAD_SPECS (whose messages are checked through the CLI here too).
SPECS = [
    (GOOD + "name: ../x\n", "g.yaml:4, at key name: expected a plain name (letters, digits, '-', '_'), got '../x'"),
    (GOOD + "name: /etc\n", "g.yaml:4, at key name: expected a plain name (letters, digits, '-', '_'), got '/etc'"),
    (GOOD + "name: '..'\n", "g.yaml:4, at key name: expected a plain name (letters, digits, '-', '_'), got '..'"),
    (GOOD + "max_len: '10'\n", "g.yaml:4, at key max_len: expected a positive integer, got '10'"),
    (GOOD + "max_attempts: 2.5\n", "g.yaml:4, at key max_attempts: expected a positive integer, got 2.5"),
    (GOOD + "lease_s: true\n", "g.yaml:4, at key lease_s: expected a positive number of seconds, got True"),
    ("task: gridrunner.tasks.toy:noop\ngrid: {x: [1]}\noutcomes: 3\n",
     "g.yaml:3, at key outcomes: expected a non-empty list of metric names, got 3"),
    (GOOD + "fixed: [1, 2]\n", "g.yaml:4, at key fixed: expected a mapping of constants, got a list"),
    ("task: 42\ngrid: {x: [1]}\noutcomes: [value]\n",
     "g.yaml:1, at key task: expected 'module:function' or the name of a bundled task (dncnn, unet), got 42"),
    ("task: gridrunner.tasks.toy:noop\ngrid: []\noutcomes: [value]\n",
     "g.yaml:2, at key grid: expected a mapping of parameter lists, or a list of such mappings, got a list"),
    (GOOD + "exclude: ['x > 0']\n", "g.yaml, at key exclude: every one of the grid's 2 rows is excluded; the grid "
                                    "would be empty"),
    ("task: gridrunner.tasks.toy:noop\ngrid:\n\tx: [1]\noutcomes: [value]\n",
     "g.yaml:3: invalid YAML: found character '\\t' that cannot start any token"),
    ("task: gridrunner.tasks.toy:noop\ngrid:\n  arch: [{a: [1, 2], b: 3}, {a: 1, c: 3}]\noutcomes: [value]\n",
     "g.yaml:3, at key grid.arch[1]: linked candidates must all set the same parameters: ['a', 'b'] vs ['a', 'c']"),
    (GOOD + "failure: value.__class__ == 1\n",
     "g.yaml:4, at key failure: unexpected character '.' at column 6 in 'value.__class__ == 1'"),
    (GOOD + "failure: open('x') > 0\n",
     "g.yaml:4, at key failure: unknown function 'open' (known: abs, exp, len, log, log10, log2, max, min, sqrt, "
     "sum) at column 1 in \"open('x') > 0\""),
    (GOOD + "failure: '(lambda: 1)() > 0'\n",
     "g.yaml:4, at key failure: unexpected character ':' at column 8 in '(lambda: 1)() > 0'"),
    (GOOD + "cost: x *\n", "g.yaml:4, at key cost: expected a number, string, name or '(', found the end at column "
                           "4 in 'x *'"),
    (GOOD + "prune: x > 1\n",
     "g.yaml:4, at key prune: the rule reads only parameters, so it would prune rows before they learn anything; "
     "use `exclude` to leave such rows out, or add a logged metric or `step` in 'x > 1'"),
    (GOOD + "prune: [step > 3 and loss > 1, 'status == 1']\n",
     "g.yaml:4, at key prune[1]: 'status' is a bookkeeping column, never in a logged record (a record has step, "
     "time and the metrics the task logs) in 'status == 1'"),
    (GOOD + "prune: loss\n",
     "g.yaml:4, at key prune: a prune rule must be a condition such as 'step >= 200 and val_ssim < 0.3' in 'loss'"),
    (GOOD + "hang_after_min: -5\n", "g.yaml:4, at key hang_after_min: expected a positive number of minutes, got -5"),
    (GOOD + "row_time_limit_min: 2 * y\n",
     "g.yaml:4, at key row_time_limit_min: unknown parameter 'y' (valid: x) in '2 * y'"),
    (GOOD + "exclude: ['x >> 1']\n",
     "g.yaml:4, at key exclude[0]: expected a number, string, name or '(', found '>' at column 4 in 'x >> 1'"),
    (GOOD + "random: {n: 0, params: {lr: {uniform: [0, 1]}}}\n",
     "g.yaml:4, at key random.n: expected a positive number of samples, got 0"),
    (GOOD + f"fixed: {{f: !!python/object/apply:os.system ['touch {CANARY}']}}\n",
     "g.yaml:4: invalid YAML: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    (GOOD + "fixed: {f: !!python/object:os.system {}}\n",
     "g.yaml:4: invalid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'"),
    (GOOD + "fixed: {f: !!python/name:os.system ''}\n",
     "g.yaml:4: invalid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'"),
    (GOOD + BOMB, "g.yaml:9, at key l5: the spec holds more than 1,000,000 values (aliases of aliases?); write it "
                  "out with fewer nested aliases"),
    ("task: gridrunner.tasks.toy:sleep\ngrid: {a: [1, 2, 3], b: [x, y]}\noutcomes: [value]\nmax_len: 3\n",
     "g.yaml, at key task: the task changed since this grid was made ('gridrunner.tasks.toy:noop' → 'gridrunner.tasks.toy:sleep'); "
     "finished rows would no longer match. Make a new grid (another `name:` or --runs DIR), or change it back"),
]
SPEC_CASES = [(text, message) for text, message in BAD_SPECS if text] + SPECS


@pytest.mark.parametrize("text, message", SPEC_CASES, ids=[f"spec-{i}" for i in range(len(SPEC_CASES))])
def test_a_bad_spec_gives_one_error_and_changes_nothing(grid, project, text, message):
    (project / "g.yaml").write_text(text)
    before = snapshot(project)
    result = invoke("make", "g.yaml")
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")
    assert snapshot(project) == before
    assert not (project / CANARY).exists()


def test_an_empty_spec_file_gives_one_error_and_changes_nothing(grid, project):
    (project / "g.yaml").write_text("")
    before = snapshot(project)
    result = invoke("make", "g.yaml")
    assert (result.exit_code, result.output) == (
        1, "Error: g.yaml: the spec is empty; it needs at least `task`, `grid` and `outcomes`\n")
    assert snapshot(project) == before


@dataclass
class Args:
    """A command line, the files it needs beside the grid, and its exact error line and exit code."""

    args: list[str]
    code: int
    message: str
    files: dict[str, str] = field(default_factory=dict)


USAGE = 2
ARGS = {
    "no grid under --runs": Args(["status", "--runs", "elsewhere"], 1,
                                 "Error: no grid under elsewhere/; run `gridrunner make SPEC` first, or pass --grid PATH"),
    "--grid not a grid": Args(["status", "--grid", "nowhere"], 1,
                              "Error: nowhere is not a grid directory (no spec.yaml); run `gridrunner make SPEC` first"),
    "--grid a spec file": Args(["work", "--grid", "g.yaml"], 1,
                               "Error: g.yaml is a spec file, not a grid directory; run `gridrunner make g.yaml` and "
                               "pass --grid runs/g"),
    "make a missing spec": Args(["make", "missing.yaml"], 1, "Error: missing.yaml: no such spec file"),
    "make over a directory that is no grid": Args(
        ["make", "h.yaml"], 1, "Error: runs/h exists but holds no spec.yaml; it is not a grid. Move it away or "
                               "choose another name or --runs DIR",
        {"h.yaml": GOOD, "runs/h/notes.txt": "mine"}),
    "submit --shards 0": Args(["submit", "--shards", "0"], USAGE,
                              "Error: Invalid value for '--shards': must be at least 1, got 0"),
    "submit an unknown profile": Args(["submit", "--profile", "nope"], 1,
                                      "Error: no profile 'nope': looked for {project}/jobs/nope.yaml (profiles: gpu)",
                                      {"jobs/gpu.yaml": "partition: gpu\n"}),
    "submit a profile with an unknown key": Args(
        ["submit", "--profile", "typo", "--executor", "local"], 1,
        "Error: {project}/jobs/typo.yaml: unknown key 'gpu'; did you mean 'gpus'? (valid keys: executor, partition, "
        "account, qos, constraint, gpus, cpus, mem_gb, time_min, setup, signal_delay_s, max_requeues, "
        "array_parallelism, max_parallel, lease_s, slurm, rows_per_gpu, watcher)",
        {"jobs/typo.yaml": "gpu: 1\n"}),
    "submit --rows-per-gpu 0": Args(["submit", "--rows-per-gpu", "0"], USAGE,
                                    "Error: Invalid value for '--rows-per-gpu': 0 is not in the range x>=1."),
    "submit a profile with rows_per_gpu 0": Args(
        ["submit", "--profile", "pack", "--executor", "local"], 1,
        "Error: {project}/jobs/pack.yaml: rows_per_gpu must be a whole number >= 1, got 0",
        {"jobs/pack.yaml": "rows_per_gpu: 0\n"}),
    "submit a profile with a bad watcher": Args(
        ["submit", "--profile", "w", "--executor", "local"], 1,
        "Error: {project}/jobs/w.yaml: unknown key 'time' under watcher (valid keys: time_min, mem_gb, partition, "
        "setup, slurm)",
        {"jobs/w.yaml": "watcher: {time: 5}\n"}),
    "submit --executor bogus": Args(["submit", "--executor", "bogus"], USAGE,
                                    "Error: Invalid value for '--executor': 'bogus' is not one of 'auto', 'slurm', "
                                    "'local'."),
    "split --into 1": Args(["split", "--shard", "0", "--into", "1"], USAGE,
                           "Error: Invalid value for '--into': 1 is not in the range x>=2."),
    "split an unknown shard": Args(["split", "--shard", "9", "--into", "2"], 1,
                                   "Error: no shard 9 in runs/g/shards (shards: 0, 1)"),
    "reset --status broken": Args(["reset", "--status", "broken"], USAGE,
                                  "Error: Invalid value for '--status': 'broken' is not one of 'failed', 'done', "
                                  "'running', 'not_run'."),
    "reset an unknown row": Args(["reset", "--row", "0123456789ab"], 1,
                                 "Error: no row '0123456789ab' in runs/g (1 unknown id(s))"),
    "reset a row id that is a path": Args(["reset", "--row", "../../x"], 1,
                                          "Error: no row '../../x' in runs/g (1 unknown id(s))"),
    "reset --where that does not parse": Args(
        ["reset", "--where", "a <"], 1, "Error: expected a number, string, name or '(', found the end at column 4 in "
                                        "'a <'"),
    "reset --where an unknown column": Args(
        ["reset", "--where", "zz > 1"], 1,
        "Error: unknown column 'zz' (valid: a, attempts, b, runtime_s, status, value) in 'zz > 1'"),
    "reset --where that calls a function": Args(
        ["reset", "--where", "__import__('os') == 1"], 1,
        "Error: unknown function '__import__' (known: abs, exp, len, log, log10, log2, max, min, sqrt, sum) at "
        "column 1 in \"__import__('os') == 1\""),
    "work --lease 0": Args(["work", "--lease", "0"], USAGE,
                           "Error: Invalid value for '--lease': 0.0 is not in the range x>=0.1."),
    "work --shard -1": Args(["work", "--shard", "-1"], USAGE,
                            "Error: Invalid value for '--shard': -1 is not in the range x>=0."),
    "work --max-rows 0": Args(["work", "--max-rows", "0"], USAGE,
                              "Error: Invalid value for '--max-rows': 0 is not in the range x>=1."),
    "analyze an unknown metric": Args(["analyze", "--metric", "nope"], 1,
                                      "Error: unknown metric 'nope' (outcomes: value)"),
    "replay-prune a rule that does not parse": Args(
        ["replay-prune", "step >"], 1,
        "Error: expected a number, string, name or '(', found the end at column 7 in 'step >'"),
    "replay-prune without a rule": Args(["replay-prune"], USAGE, "Error: Missing argument 'RULES...'."),
    "an unknown command": Args(["frobnicate"], USAGE, "Error: No such command 'frobnicate'."),
    "an unknown option": Args(["status", "--bogus"], USAGE, "Error: No such option '--bogus'. Did you mean '--runs'?"),
}


@pytest.mark.parametrize("case", list(ARGS.values()), ids=list(ARGS))
def test_a_bad_argument_gives_one_error_and_changes_nothing(grid, project, case):
    for name, text in case.files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    before = snapshot(project)
    result = invoke(*case.args)
    message = case.message.format(project=project)
    if case.code == USAGE:
        assert (result.exit_code, result.output.rstrip("\n").splitlines()[-1]) == (USAGE, message)
    else:
        assert (result.exit_code, result.output) == (1, message + "\n")
    assert snapshot(project) == before


# ============================================================================
# Hand edits: reported with shard and line, never claimed, never rewritten
# ============================================================================

def _line(n: int, change: Callable[[str], str]) -> Callable[[str], str]:
    """An edit of line ``n`` (1-based) of the shard's text."""
    def edit(text: str) -> str:
        lines = text.split("\n")
        lines[n - 1] = change(lines[n - 1])
        return "\n".join(lines)
    return edit


def _cell(n: int, column: str, value: str) -> Callable[[str], str]:
    header = ["a", "b", "row_id", "status", "attempts", "worker", "started_at", "finished_at", "runtime_s", "error",
              "value"]
    index = header.index(column)

    def change(line: str) -> str:
        cells = line.split(",")
        cells[index] = value
        return ",".join(cells)
    return _line(n, change)


@dataclass
class Edit:
    """A hand edit of shard 0, and the exact report ``{shard}:{line}: {message}`` it must give."""

    edit: Callable[[str], str]
    line: int | None  # None: the shard as a whole is unreadable, and the message is the whole report
    message: str
    binary: bytes | None = None  # replaces the file instead of ``edit``


FIELDS = "expected 11 fields, got {n} (truncated line, or a comma inside an unquoted cell)"
BOOK = "row_id, status, attempts, worker, started_at, finished_at, runtime_s, error"
EDITS = {
    "an unknown status": Edit(_cell(4, "status", "finished"), 4,
                              "unknown status 'finished' (valid: not_run, running, done, failed)"),
    "a status in capitals": Edit(_cell(2, "status", "Done"), 2,
                                 "unknown status 'Done' (valid: not_run, running, done, failed)"),
    "a duplicate row_id": Edit(lambda t: t + t.split("\n")[3] + "\n", 5, f"duplicate row_id {ID_2X} (also on line 4)"),
    "a missing column": Edit(_line(1, lambda h: h.replace(",attempts", "")), None,
                             f"{SHARD}:1: missing column 'attempts': after the parameters the header must be {BOOK}"),
    "no row_id column": Edit(_line(1, lambda h: h.replace("row_id,", "")), None,
                             f"{SHARD}:1: missing column 'row_id': the header must be the parameters, then {BOOK}, "
                             f"then the outcomes"),
    "bookkeeping columns out of order": Edit(_line(1, lambda h: h.replace("status,attempts", "attempts,status")), None,
                                             f"{SHARD}:1: bookkeeping columns out of order: after the parameters the "
                                             f"header must be {BOOK}"),
    "a repeated column": Edit(_line(1, lambda h: h.replace("a,b,", "a,a,", 1)), None,
                              f"{SHARD}:1: a column name repeats in the header"),
    "a non-numeric outcome": Edit(_cell(2, "value", "one"), 2, "outcome value must be a number or empty, got 'one'"),
    "a non-numeric runtime": Edit(_cell(2, "runtime_s", "fast"), 2, "runtime_s must be a number, got 'fast'"),
    "non-numeric attempts": Edit(_cell(4, "attempts", "two"), 4, "attempts must be a whole number, got 'two'"),
    "a truncated file": Edit(lambda t: t[: t.index(ID_2X) + 5], 4, FIELDS.format(n=3)),
    "a comma in an unquoted cell": Edit(_cell(4, "b", "x,y"), 4, FIELDS.format(n=12)),
    # (A parameter changed under its row_id is no longer a bad row: it is a change the user meant, applied;
    # see tests/reliability/test_hand_edits.py.)
    "a status left blank": Edit(_cell(4, "status", ""), 4, "unknown status '' (valid: not_run, running, done, failed)"),
    "a row_id that is a path": Edit(
        _cell(4, "row_id", "../../x"), 4,
        f"row_id '../../x' does not match its parameters (their id is {ID_2X}): a parameter was edited under an "
        f"existing row_id; clear the row_id cell to make it a new row"),
    "an empty file": Edit(lambda t: "", None, f"{SHARD}: empty file: a shard needs at least its header line"),
    "bytes that are not UTF-8": Edit(None, None, f"{SHARD}: not UTF-8 text: 'utf-8' codec can't decode byte 0xff in "
                                                 f"position 0: invalid start byte", binary=b"\xff\xfe,garbage\n"),
}


def _apply(case: Edit, path: Path) -> None:
    if case.binary is not None:
        path.write_bytes(case.binary)
    else:
        path.write_text(case.edit(path.read_text()))


def _report(case: Edit) -> str:
    return case.message if case.line is None else f"{SHARD}:{case.line}: {case.message}"


@pytest.mark.parametrize("case", list(EDITS.values()), ids=list(EDITS))
def test_status_reports_a_bad_hand_edit_with_shard_and_line_and_changes_nothing(grid, project, case):
    _apply(case, project / SHARD)
    before = snapshot(project)
    result = invoke("status")
    assert result.exit_code == 0
    report = _report(case)
    if case.line is None:
        assert report in result.output  # in the shard's row of the table
    else:
        assert [line for line in result.output.splitlines() if line.startswith("bad row ")] == [f"bad row {report}"]
    assert snapshot(project) == before


# An empty file is a shard cut before its header: `work` waits for it and, once it has stayed so for 5 s,
# merges it and runs its rows from the journal (test_hand_edits.py::test_regression_a_shard_truncated_to_...).
WORK_EDITS = {name: case for name, case in EDITS.items() if name != "an empty file"}


@pytest.mark.parametrize("case", list(WORK_EDITS.values()), ids=list(WORK_EDITS))
def test_work_reports_a_bad_hand_edit_runs_every_other_row_and_keeps_the_bad_text(grid, project, case):
    path = project / SHARD
    _apply(case, path)
    before = snapshot(project)
    edited = path.read_bytes()
    result = cli("work", "--quiet", "--shard", "0")  # a worker looks into its home shard first, whatever it holds
    assert result.returncode == 0, result.stderr
    logged = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in result.stderr.splitlines()]
    if case.line is None:
        assert logged.count(f"{case.message} (skipping this shard)") == 1, result.stderr
        assert path.read_bytes() == edited  # the whole shard is left as it is
    else:
        (line,) = [line for line in logged if line.startswith(f"{SHARD}:")]
        assert line.startswith(_report(case)) and line.endswith(
            " (bad row: never claimed, kept as it is; fix or delete it)"), result.stderr
        bad_text = edited.split(b"\n")[case.line - 1]
        assert path.read_bytes().split(b"\n")[case.line - 1] == bad_text
    # Every other row ran; nothing outside the grid's row, worker and shard files changed.
    unreadable = ("shard-000.csv",) if case.line is None else ()
    assert {r["status"] for r in rows(grid, skip=unreadable).values()} == {"done"}
    after = snapshot(project)
    grid_owned = re.compile(r"^runs/g/(rows|workers|shards|journal)/")
    assert {k: v for k, v in after.items() if not grid_owned.match(k)} == \
        {k: v for k, v in before.items() if not grid_owned.match(k)}
    assert not (project / "runs" / "x").exists() and not (project / "x").exists()


def test_the_corpus_tries_more_than_thirty_bad_inputs():
    total = len(SPEC_CASES) + 1 + len(ARGS) + len(EDITS) + len(WORK_EDITS)
    assert len(SPEC_CASES) >= 30 and len(ARGS) >= 20 and len(EDITS) >= 15
    print(f"bad-input corpus: {len(SPEC_CASES) + 1} specs, {len(ARGS)} command lines, {len(EDITS)} hand edits "
          f"(each through status and all but one through work): {total} cases")
