"""What a spec or a shard cannot make gridrunner do: run code, write spreadsheet formulas, leave the grid.

* Specs (and the saved ``spec.yaml``) are read with safe YAML: a ``!!python/...`` tag is an error, and
  the code it names never runs.
* Rules are a small language parsed and evaluated without ``eval``. Fuzzed: any text either parses into
  the allowed node kinds or raises ``ExprError``, and evaluating it calls only the expression module's
  own code and a fixed list of built-in functions: no attribute is read, nothing else is called, and it
  ends quickly.
* No cell that gridrunner writes starts a spreadsheet formula (``= + - @``, tab, CR) unless it is a
  plain number; checked through the store, with the cells a spreadsheet would see.
* Paths from specs and shards stay inside the grid directory.
"""
from __future__ import annotations

import csv
import gc
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gridrunner import expr as expr_module
from gridrunner.errors import ExprError, ShardError, SpecError
from gridrunner.expr import Expr
from gridrunner.grid import make
from gridrunner.spec import canonical_json, load_spec
from gridrunner.store import GridStore, Result
from gridrunner.worker import heartbeat_path
from gridtools import make_grid, write_spec
from reliability_tools import cli, snapshot

GOOD = "task: gridrunner.tasks.toy:noop\ngrid: {x: [1, 2]}\noutcomes: [value]\n"

# ============================================================================
# Safe YAML
# ============================================================================

TAGS = ["!!python/object/apply:os.system [{command}]", "!!python/object/new:os.system [{command}]",
        "!!python/object:os.system {{}}", "!!python/name:os.system ''", "!!python/module:os ''",
        "!!python/object/apply:builtins.exec [{code}]"]


def _tag(tag: str, canary: Path) -> str:
    """``tag`` aimed at creating ``canary``, with its arguments as YAML double-quoted strings."""
    return tag.format(command=json.dumps(f"touch '{canary}'"), code=json.dumps(f"open({str(canary)!r}, 'w')"))


@pytest.mark.parametrize("tag", TAGS)
def test_a_python_tag_in_a_spec_is_an_error_and_never_runs(project, tag):
    canary = project / "pwned"
    write_spec(project, GOOD + f"fixed: {{f: {_tag(tag, canary)}}}\n")
    with pytest.raises(SpecError, match=r"^g\.yaml:4: invalid YAML: could not determine a constructor for the tag "
                                        r"'tag:yaml\.org,2002:python/"):
        load_spec("g.yaml")
    assert not canary.exists()


def test_a_python_tag_in_the_saved_spec_is_an_error_and_never_runs(project):
    grid = make_grid(project, yaml.safe_load(GOOD))
    canary = project / "pwned"
    line = len((grid / "spec.yaml").read_text().splitlines()) + 1
    with open(grid / "spec.yaml", "a") as fh:
        fh.write(f"extra: {_tag(TAGS[0], canary)}\n")
    before = snapshot(project)
    result = cli("status")
    assert result.returncode == 1 and result.stderr.startswith(
        f"Error: runs/g/spec.yaml:{line}: invalid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'; re-run `gridrunner make` on the source spec"), result.stderr
    assert not canary.exists() and snapshot(project) == before


# ============================================================================
# The rule language, fuzzed
# ============================================================================

NODE_KINDS = {"or", "and", "not", "cmp", "in", "const", "name", "list", "neg", "arith", "call"}
OPERATORS = {"<", "<=", ">", ">=", "==", "!=", "+", "-", "*", "/", "%", "**"}
# Every C function evaluation may call, as (module, qualified name); a Python function it calls must be
# defined in gridrunner/expr.py (or be ExprError's constructor).
ALLOWED_BUILTINS = {
    *(("builtins", name) for name in ("abs", "min", "max", "len", "sum", "isinstance")),
    *(("math", name) for name in ("log", "log2", "log10", "sqrt", "exp", "isnan")),
    *(("_operator", name) for name in ("lt", "le", "gt", "ge", "eq", "ne", "add", "sub", "mul", "truediv", "mod")),
    (None, "int.bit_length"), (None, "bool.bit_length"),  # sizing an integer power before computing it
}


def _name(func) -> tuple:
    return getattr(func, "__module__", None), func.__qualname__


# Words and pieces of Python that must never do anything: attribute access, subscripts, lambdas, calls of
# built-ins, dunder names, statements; beside the language's own tokens, so that many texts parse.
PIECES = ["a", "b", "x", "depth", "loss", "__class__", "__import__", "__builtins__", "os", "eval", "exec", "open",
          "getattr", "lambda", "import", "for", "if", "else", "def", "yield", "await", "print", "globals",
          "and", "or", "not", "in", "true", "false", "none", "True", "None",
          "abs(", "min(", "max(", "log(", "log2(", "sqrt(", "exp(", "len(", "sum(", "log10(",
          "0", "1", "2", "9", "0.5", "1e3", "1e308", "99999", ".5", "'s'", '"ssim"', "'\\''", "'a\\\\'", "''",
          "(", ")", "[", "]", ",", ".", ":", ";", "=", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "**", "/",
          "%", "//", "@", "~", "&", "|", "^", "<<", "{", "}", "#", "\\", "`", "$", "!", "?", " ", "\t", "\n"]
# Expressions of the language itself, so that many texts parse and evaluation goes deep ...
LEAVES = st.sampled_from(["a", "b", "x", "depth", "loss", "__class__", "os", "0", "1", "2.5", "1e308", "99999",
                          "'ssim'", '"a"', "true", "none", "[]"])
EXPRESSIONS = st.recursive(LEAVES, lambda inner: st.one_of(
    st.builds("({} {} {})".format, inner, st.sampled_from(sorted(OPERATORS)), inner),
    st.builds("{} {} {}".format, inner, st.sampled_from(["and", "or", "in", "not in"]), inner),
    st.builds("not {}".format, inner), st.builds("-{}".format, inner),
    st.builds("{}({})".format, st.sampled_from(sorted(expr_module._FUNCS)), inner),
    st.builds("{}({}, {})".format, st.sampled_from(["min", "max", "log"]), inner, inner),
    st.builds("[{}, {}]".format, inner, inner)), max_leaves=12)
# ... and the same with a piece of Python pushed in somewhere, which must never slip through.
TEXTS = st.one_of(
    EXPRESSIONS,
    st.builds(lambda text, at, piece: text[:at % (len(text) + 1)] + piece + text[at % (len(text) + 1):],
              EXPRESSIONS, st.integers(0, 200), st.sampled_from(PIECES)),
    st.lists(st.sampled_from(PIECES), max_size=30).map("".join),
    st.lists(st.sampled_from(PIECES), max_size=30).map(" ".join),
    st.text(max_size=40),
)
VALUES = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                   st.booleans(), st.none(), st.lists(st.integers(-5, 5), max_size=4))


def _check_tree(node) -> None:
    """Every node of a parsed rule is one of the language's kinds, with plain data in it."""
    kind = node[0]
    assert kind in NODE_KINDS, node
    if kind == "const":
        assert node[1] is None or type(node[1]) in (int, float, str, bool), node
    elif kind == "name":
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", node[1]), node
    elif kind == "call":
        assert node[1] in expr_module._FUNCS, node
        for arg in node[2]:
            _check_tree(arg)
    elif kind == "list":
        for item in node[1]:
            _check_tree(item)
    elif kind in ("cmp", "arith"):
        assert node[1] in OPERATORS, node
        _check_tree(node[2])
        _check_tree(node[3])
    else:
        for child in node[1:]:
            _check_tree(child)


def _calls_during(func) -> tuple[list, list]:
    """(Python code objects, C functions) that ``func()`` called, through ``sys.setprofile``."""
    python, builtin = [], []

    def profile(frame, event, arg):
        if event == "call":
            python.append(frame.f_code)
        elif event == "c_call":
            builtin.append(arg)

    gc.disable()  # a collection would run other code's callbacks (Hypothesis times its collections) in between
    sys.setprofile(profile)
    try:
        func()
    finally:
        sys.setprofile(None)
        gc.enable()
    return python, builtin


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXTS, st.dictionaries(st.sampled_from(["a", "b", "x", "depth", "loss", "__class__", "os"]), VALUES))
def test_any_text_parses_into_the_small_language_or_raises_expr_error_and_evaluating_it_calls_nothing_else(
        text, values):
    try:
        rule = Expr(text)
    except ExprError:
        return
    _check_tree(rule.tree)
    def evaluate():
        try:
            rule.evaluate(values)
        except ExprError:  # a function given a bad argument: log(0), len(1)
            pass

    started = time.monotonic()
    python, builtin = _calls_during(evaluate)
    assert time.monotonic() - started < 1.0, text
    own = {expr_module.__file__, __file__}  # the language, and evaluate() above
    assert [code for code in python if code.co_filename not in own and code is not ExprError.__init__.__code__] \
        == [], text
    assert [func for func in builtin if _name(func) not in ALLOWED_BUILTINS and func is not sys.setprofile] == [], text


@pytest.mark.parametrize("text", ["9 ** 9 ** 9", "99999 ** 99999 ** 99999", "10 ** 10 ** 10 > 1",
                                  "exp(1e308) > 1", "log(2, 1) > 0", "(" * 30 + "2 ** 9999" + ")" * 30])
def test_a_rule_always_evaluates_quickly_to_a_value(text):
    started = time.monotonic()
    Expr(text).evaluate({})
    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize("text", ["(" * 5000 + "1" + ")" * 5000, "-" * 5000 + "1", "not " * 5000 + "a",
                                  "[" * 5000 + "]" * 5000, "abs(" * 5000 + "1" + ")" * 5000, "2" + " ** 2" * 5000])
def test_a_rule_nested_too_deeply_is_an_expr_error(text):
    with pytest.raises(ExprError, match=r"^nested more than 50 levels deep at column \d+ in "):
        Expr(text)


# ============================================================================
# No spreadsheet formulas in the shards
# ============================================================================

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# A negative number starts with '-' like a formula; so does -inf, written as JSON spells it (a spreadsheet
# shows it as an error value, and no function runs). Everything else that starts so is a finding.
NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|-Infinity")
NASTY = st.lists(st.sampled_from(list("=+-@\t\r\n\"',;|!() ab1:") + ["cmd", "HYPERLINK", "DDE", "SUM(A1)"]),
                 max_size=8).map("".join)
PARAMS = st.one_of(NASTY, st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True),
                   st.booleans(), st.none(), st.lists(st.integers(-9, 9), max_size=3))


def _spreadsheet_cells(path: Path) -> list[str]:
    """Every cell of a shard as a spreadsheet program reads it (CSV unquoting only)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [cell for row in csv.reader(fh) for cell in row]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PARAMS, min_size=1, max_size=4), NASTY, NASTY,
       st.floats(allow_nan=False, allow_infinity=False))  # the worker never records a non-finite metric
@example(["=1+1", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\t=x", "\r=x", -1.5, -math.inf, math.nan],
         "=HYPERLINK(\"http://x\")", "-cmd", -1e-300)
@example([" =x", "=", "-", "+", "@"], "+x", "@x", -0.0)
def test_no_cell_gridrunner_writes_starts_a_formula_unless_it_is_a_number(params, error_type, message, metric):
    with tempfile.TemporaryDirectory() as home:
        spec = write_spec(Path(home), {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"],
                                       "grid": {"p": params, "q": [message]}})
        grid = make(spec, Path(home) / "runs").grid_dir
        store = GridStore(grid)
        (path,) = store.shard_paths()
        # One row fails with a nasty error, one finishes with a metric, one is left running.
        for result in (Result("failed", {"value": metric}, f"{error_type}: {message}"), Result("done", {"value": metric}),
                       None):
            _, scan = store.claim(path, "host:123", lambda *a: False, 3)
            if scan.claim is None:
                break
            if result is not None:
                assert store.record(scan.claim, result)
        for cell in _spreadsheet_cells(path):
            assert not cell.startswith(FORMULA_START) or NUMBER.fullmatch(cell), repr(cell)
        # The quoting that keeps formulas out costs nothing: the parameters read back as the spec's values.
        shard = store.read(path)
        assert not shard.errors
        assert {canonical_json(shard.row_params(i)["p"]) for i in shard.valid()} == {canonical_json(v) for v in params}
        assert {shard.row_params(i)["q"] for i in shard.valid()} == {message}


# ============================================================================
# Paths stay inside the grid
# ============================================================================

@pytest.mark.parametrize("name", ["../x", "../../etc", "/tmp/x", "a/../../x", "..", ".", "a\\..\\x"])
def test_a_spec_name_cannot_put_the_grid_outside_runs(project, name):
    write_spec(project, GOOD + f"name: {yaml.safe_dump(name).splitlines()[0]}\n")
    before = snapshot(project.parent)
    result = cli("make", "g.yaml")
    assert result.returncode == 1 and result.stderr == (
        f"Error: g.yaml:4, at key name: expected a plain name (letters, digits, '-', '_'), got {name!r}\n")
    assert snapshot(project.parent) == before


def test_a_row_id_or_worker_from_a_shard_cannot_name_a_path_outside_the_grid(project):
    grid = make_grid(project, yaml.safe_load(GOOD))
    store = GridStore(grid)
    for row_id in ("../../x", "/etc/passwd", "..", "a/b", ""):
        with pytest.raises(ShardError, match="is not a safe directory name"):
            store.row_dir(row_id)
    workers = (grid / "workers").resolve()
    for worker in ("../../x:1", "/etc/passwd:2", "..:3:4", "host/../..:5"):
        assert heartbeat_path(grid, worker).resolve().parent == workers
    # A hand-edited row_id that is a path is a bad row: never claimed, so no directory is ever made for it.
    path = grid / "shards" / "shard-000.csv"
    path.write_text(path.read_text().replace(path.read_text().splitlines()[1].split(",")[1], "../../x", 1))
    outside = lambda: {p for p in project.parent.rglob("*") if grid not in p.parents}  # noqa: E731
    before = outside()
    result = cli("work", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "row_id '../../x' does not match its parameters" in result.stderr
    assert outside() == before
    # The one good row ran (its directory is made only if its task uses it); the bad one got none.
    shard = store.read(path)
    good = {shard.records[i][shard.n_params] for i in shard.valid()}
    assert [shard.records[i][shard.n_params + 1] for i in shard.valid()] == ["done"]
    made = {p.name for p in (grid / "rows").iterdir()} if (grid / "rows").exists() else set()
    assert made <= good
