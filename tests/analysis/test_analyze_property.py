"""Property tests of `gridrunner analyze` over generated specs, through the real command line.

Hypothesis generates specs over the space `make` accepts: every value type (bool, int, float, a mix of
int and float, inf, -inf, NaN, floats near the largest, integers beyond int64, text with unicode,
commas, quotes, dollar signs (mathtext), formula-like and number-like text, null, lists, linked
mappings), parameter and outcome names that are also formula functions or columns the analysis adds,
metrics near the largest float, and every grid shape (unions whose sub-grids have different parameters,
exclude, repeat, random samples, one level, one row, no failures, every row failed, rows still running
or not run). The task is tests/analysis/synthetic.py, whose outcome and failures follow parameters the
spec chooses. Each example runs `gridrunner make`, `gridrunner work --inline` and `gridrunner analyze`.

The runs are deterministic (``derandomize=True``) and small enough for CI. ``GRIDRUNNER_LONG_PROPERTY=1``
runs many more examples (400 grids and 60 planted grids; an hour or more), ``GRIDRUNNER_PROPERTY_EXAMPLES=N``
sets the number of grids, ``GRIDRUNNER_PROPERTY_SEED=N`` draws them at random from seed N instead of the
fixed set; ``GRIDRUNNER_PROPERTY_STATS=FILE`` appends one JSON line per example (what was
generated and what analyze did) to FILE.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from cli_runs import analyse, check_contract, invoke, make_and_run
from synthetic import value_key

LONG = os.environ.get("GRIDRUNNER_LONG_PROPERTY") == "1"
EXAMPLES = int(os.environ.get("GRIDRUNNER_PROPERTY_EXAMPLES", 400 if LONG else 14))
PLANTED_EXAMPLES = int(os.environ.get("GRIDRUNNER_PROPERTY_EXAMPLES", 60)) // 5 if LONG else 6
MAX_ROWS = 60
#: ``GRIDRUNNER_PROPERTY_SEED=N`` draws other examples than the fixed CI set (random, from seed N).
SEED = os.environ.get("GRIDRUNNER_PROPERTY_SEED")
#: pytest-timeout's limit per test: the CI default, or 12 hours for a long run.
TIMEOUT = 12 * 3600 if LONG or SEED else 900


def seeded(test):
    return seed(int(SEED))(test) if SEED else test

#: Parameter names: ordinary ones, formula functions, and the columns the analysis and its tables add.
NAMES = ["a", "b", "lr", "act", "depth", "loss", "C", "np", "Q", "I", "state", "failed", "subgrid", "δ", "x_1",
         "rank", "budget_s", "rows_within", "finished", "failures", "failure_rate", "shard", "_score"]
#: Names of the second outcome (the synthetic task's ``aux``), some of them columns the tables add.
AUX_NAMES = ["aux", "rank", "budget_s", "rows_within", "failures", "shard", "state", "failed"]
TRICKY_TEXT = ["=SUM(A1)", "+1", "-x", "@a", "a,b", 'say "hi"', "it's", "3", "1e5", "true", "null", "ünï", "日本",
               " lead", "C(x)", "np.log(x)", "a:b", "[T.x]", "(not set)", "x~y", "é,\"'", "$x^$", "$\\frac{a}$", "a$b"]

EXTREME_FLOATS = [math.inf, -math.inf, math.nan, 1.7976931348623157e308, -1.7976931348623157e308, 1e-300, 0.0, 1.0, 2.5]
#: Distributions of ``random``: ordinary ones, and bounds that pass a type check but numpy cannot sample
#: (make refuses them: exit 1, never 3).
RANDOM_PARAMS = [{"r": {"uniform": [0, 1]}}, {"w": {"int": [1, 4]}}, {"opt": {"choice": ["adam", "sgd"]}},
                 {"lr_r": {"loguniform": [1e-4, 1e-1]}}, {"r": {"uniform": [0, math.inf]}},
                 {"r": {"uniform": [-1e308, 1e308]}}, {"lr_r": {"loguniform": [1e-300, math.inf]}},
                 {"w": {"int": [0, 10**20]}}, {"r": {"uniform": [0, 10**400]}}, {"r": {"uniform": [1e307, 1.7e308]}}]
EFFECT_SIZES = [-1.0, 0.5, 2.0]
HUGE_EFFECT_SIZES = [-1.7e308, 1e308, 1.7e308, 0.0]
HUGE_INTEGERS = [2**63, 2**63 + 1, -(2**63) - 1, 10**30, 10**400, 0, 7, 0.5]

text = st.one_of(st.sampled_from(TRICKY_TEXT), st.text(alphabet="abzé日,\"' =+-@:[]().~$^\\{}", min_size=1, max_size=6))
scalar_lists = st.one_of(
    st.just([True, False]),
    st.lists(st.booleans(), min_size=1, max_size=2, unique=True),
    st.lists(st.integers(-5, 200), min_size=1, max_size=4, unique=True),
    st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=4, unique=True),
    st.lists(st.one_of(st.integers(1, 9), st.sampled_from([0.5, 2.5, 1e-4, 1e3])), min_size=2, max_size=4, unique_by=value_key),
    st.lists(text, min_size=1, max_size=4, unique=True),
    st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=2), min_size=1, max_size=3, unique_by=value_key),
    # numbers no line goes through: infinities, NaN, the largest floats (their squares overflow), the smallest
    st.lists(st.sampled_from(EXTREME_FLOATS), min_size=1, max_size=4, unique_by=value_key),
    # integers beyond int64 (and beyond any float), alone or with floats
    st.lists(st.sampled_from(HUGE_INTEGERS), min_size=1, max_size=4, unique_by=value_key),
)


@st.composite
def values(draw):
    """One parameter's candidate list, sometimes with null among them."""
    candidates = list(draw(scalar_lists))
    if draw(st.integers(0, 4)) == 0:
        candidates.append(None)
    return candidates


@st.composite
def subgrid(draw, names):
    grid = {name: draw(values()) for name in names}
    if draw(st.integers(0, 5)) == 0:  # linked parameters
        a, b = draw(st.sampled_from([("k_in", "k_out"), ("arch_a", "arch_b")]))
        left, right = draw(scalar_lists), draw(scalar_lists)
        grid["arch"] = [{a: x, b: y} for x, y in zip(left, right)] or [{a: 1, b: 2}]
    return grid


@st.composite
def specs(draw):
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    if len(names) > 1 and draw(st.booleans()):  # a union whose sub-grids have different parameters
        shared = names[:1]
        grid = [draw(subgrid(shared + names[1::2])), draw(subgrid(shared + names[2::2] or shared))]
    else:
        grid = draw(subgrid(names))
    aux = draw(st.sampled_from(AUX_NAMES))
    assume(aux not in names)
    spec = {"name": "p", "task": "synthetic:run", "outcomes": ["score", aux], "grid": grid,
            "repeat": draw(st.integers(1, 3)), "max_len": draw(st.sampled_from([5, 100]))}
    first = grid[0] if isinstance(grid, list) else grid
    params = [p for p in first if p != "arch"]
    if draw(st.integers(0, 3)) == 0:
        param = draw(st.sampled_from(params))
        spec["exclude"] = [{param: first[param][0]}]
    elif draw(st.integers(0, 5)) == 0:  # a rule that may not evaluate on some rows (make refuses: exit 1)
        param = draw(st.sampled_from(params))
        spec["exclude"] = [draw(st.sampled_from([f"log({param}) > 1", f"sqrt({param}) < 1", f"{param} == 1"]))]
    if draw(st.integers(0, 3)) == 0:
        spec["random"] = {"n": draw(st.integers(1, 3)), "seed": 0,
                          "params": draw(st.sampled_from(RANDOM_PARAMS))}
    fixed = {"noise": 0.05, "aux_name": aux}
    driver = draw(st.sampled_from(params))
    sizes = EFFECT_SIZES if draw(st.integers(0, 4)) else HUGE_EFFECT_SIZES  # a metric near the largest float
    fixed["effects"] = {driver: {value_key(v): draw(st.sampled_from(sizes)) for v in first[driver]}}
    failures = draw(st.sampled_from(["none", "driver", "random", "all", "rule"]))
    if failures == "driver":
        fixed["fail_when"] = {driver: value_key(draw(st.sampled_from(first[driver])))}
    elif failures == "random":
        fixed["fail_share"] = 0.3
    elif failures == "all":
        fixed["fail_share"] = 1.0
    elif failures == "rule":
        spec["failure"] = "score < 0"
    spec["fixed"] = fixed
    return spec, {"failures": failures, "union": isinstance(grid, list), "huge_metric": sizes is HUGE_EFFECT_SIZES}


def _rows_of(spec) -> int:
    grids = spec["grid"] if isinstance(spec["grid"], list) else [spec["grid"]]
    per = sum(int(np.prod([len(v) for v in g.values()])) for g in grids)
    return per * spec["repeat"] * (spec["random"]["n"] if "random" in spec else 1)


def _record(entry: dict) -> None:
    path = os.environ.get("GRIDRUNNER_PROPERTY_STATS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
@seeded
@settings(max_examples=EXAMPLES, derandomize=not SEED, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(generated=specs(), partial=st.sampled_from(["all", "all", "part", "running"]))
def test_every_generated_grid_is_analysed_or_refused_with_one_error_line(generated, partial):
    spec, shape = generated
    assume(_rows_of(spec) <= MAX_ROWS)
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        spec_path = root / "p.yaml"
        import yaml

        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
        made = invoke("make", spec_path, "--runs", root / "check", "--dry-run")
        assert made.exit_code in (0, 1), made.output  # make itself never crashes either
        assume(made.exit_code == 0)  # a spec make refuses (every row excluded, ...) is not analyze's input
        rows = _rows_of(spec)
        max_rows = max(1, rows // 2) if partial != "all" else None
        grid = make_and_run(root / "run", spec, max_rows=max_rows, running=1 if partial == "running" else 0)
        analysed = analyse(grid)
        _record({"spec": spec, "shape": shape, "partial": partial, "exit": analysed.exit_code,
                 "conditions": next((line for line in analysed.output.splitlines() if line.startswith("Failure conditions:")), None),
                 "error": next((line for line in analysed.output.splitlines() if line.startswith("Error:")), None)})
        check_contract(analysed)
        if analysed.exit_code == 0 and not shape["huge_metric"]:  # every figure drawn (text as written)
            assert "not drawn" not in (analysed.report_dir / "report.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- failure rules

def literal(value) -> str | None:
    """``value`` written in the rule language, or None where it has no literal (inf, NaN, [])."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list) and value:
        items = [literal(item) for item in value]
        return None if None in items else "[" + ", ".join(items) + "]"
    return None


@st.composite
def conditions(draw, grid: dict, outcomes: list[str]):
    """One condition over a parameter of ``grid`` or an outcome (named like a column the analysis adds,
    sometimes), of any of the language's kinds."""
    param = draw(st.sampled_from([p for p in grid if p != "arch"]))
    score = draw(st.sampled_from(outcomes))
    value = draw(st.sampled_from(grid[param]))
    number = draw(st.sampled_from(["0", "1", "0.5", "-2", "1e300"]))
    shapes = [f"{param} > {number}", f"{param} <= {number}", f"{score} / {param} > 0.5", f"{score} * {param} < {number}",
              f"len({param}) > 1", f"sum({param}) > 2", f"{score} < {number}", f"{param} ** 2 > {number}"]
    text = literal(value)
    if text is not None:
        shapes += [f"{param} == {text}", f"{param} != {text}", f"{param} in [{text}, 0]"]
        if not isinstance(value, list):
            shapes.append(f"{text} in {param}")
    return draw(st.sampled_from(shapes))


@st.composite
def ruled_specs(draw):
    """A generated spec whose failure rule is a generated condition over its own parameters and outcome."""
    spec, shape = draw(specs())
    first = spec["grid"][0] if isinstance(spec["grid"], list) else spec["grid"]
    rule = draw(st.recursive(conditions(first, spec["outcomes"]), lambda inner: st.one_of(
        st.builds(lambda x: f"not ({x})", inner),
        st.builds(lambda x, op, y: f"({x}) {op} ({y})", inner, st.sampled_from(["and", "or"]), inner)), max_leaves=3))
    spec["failure"] = rule
    spec["fixed"].pop("fail_share", None)
    return spec, shape


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
@seeded
@settings(max_examples=EXAMPLES, derandomize=not SEED, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(generated=ruled_specs())
def test_analyze_labels_the_rows_the_worker_failed_by_rule_and_no_others(generated):
    """For generated grids and generated failure rules (text against numbers, lists, zero divisors,
    overflowing powers, rows that lack a parameter), the rows the analysis labels ``failed_rule`` are the
    rows the worker recorded as ``rule: ...``, and the rows where the rule raised (``RuleError``) are
    failed by exception in both."""
    import csv

    import gridrunner
    from gridrunner.analysis.rows import label_rows

    spec, _ = generated
    assume(_rows_of(spec) <= MAX_ROWS)
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        spec_path = root / "p.yaml"
        import yaml

        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
        made = invoke("make", spec_path, "--runs", root / "check", "--dry-run")
        assert made.exit_code in (0, 1), made.output
        assume(made.exit_code == 0)
        grid = make_and_run(root / "run", spec)
        rows = [row for path in sorted((grid / "shards").glob("*.csv")) for row in csv.DictReader(open(path, encoding="utf-8"))]
        labelled = label_rows(gridrunner.load(grid))
        _record({"spec": spec, "rule": spec["failure"], "fired": sum(r["error"].startswith("rule:") for r in rows),
                 "rule_errors": sum(r["error"].startswith("RuleError") for r in rows), "rows": len(rows)})
    worker = {r["row_id"]: ("failed_rule" if r["error"].startswith("rule:") else
                            "success" if r["status"] == "done" else "failed_exception") for r in rows}
    assert dict(zip(labelled["row_id"], labelled["state"].astype(str))) == worker, spec["failure"]


# ----------------------------------------------------------------------------- planted effects

@st.composite
def planted_specs(draw):
    """A grid with a planted effect on a bool, a text and a numeric parameter, a parameter with no effect,
    and a failure driver; enough rows (4 × 2 × 3 × 3 levels × 2 repeats minus the failures) to find them."""
    levels = draw(st.lists(text, min_size=2, max_size=2, unique=True))
    nothing = draw(st.sampled_from([[1, 2, 3], ["p", "q", "r"], [None, 0.1, 0.5], [True, False]]))
    sizes = [draw(st.sampled_from([0.4, 0.8])) * draw(st.sampled_from([-1, 1])) for _ in range(3)]
    drive = draw(st.sampled_from(["drv_a", "drv_b", "drv_c"]))
    spec = {"name": "planted", "task": "synthetic:run", "outcomes": ["score", "aux"], "repeat": 2,
            "grid": {"flag": [True, False], "kind": levels, "num": [1, 2, 3, 4], "nothing": nothing, "driver": ["drv_a", "drv_b", "drv_c"]},
            "fixed": {"noise": 0.2,
                      "effects": {"flag": {"true": sizes[0]}, "kind": {value_key(levels[1]): sizes[1]}},
                      "slope": {"num": sizes[2]},
                      "fail_when": {"driver": value_key(drive)}}}
    return spec, sizes, levels, drive


def _coefficient(fit, prefix: str):
    table = fit.table.set_index("term")
    rows = [term for term in table.index if term == prefix]
    assert len(rows) == 1, (prefix, list(table.index))
    return table.loc[rows[0]]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
@seeded
@settings(max_examples=PLANTED_EXAMPLES, derandomize=not SEED, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(planted=planted_specs())
def test_planted_effects_are_recovered_whatever_the_value_types(planted):
    import gridrunner
    from gridrunner.analysis import failure_conditions, failure_model, outcome_model

    spec, sizes, levels, drive = planted
    with tempfile.TemporaryDirectory() as root:
        grid = make_and_run(Path(root), spec)
        df = gridrunner.load(grid)
    outcome = outcome_model(df)
    # text levels are sorted, the first is the reference: the planted level's effect, or minus it
    kind_term, kind_size = (f"C(kind)[T.{levels[1]}]", sizes[1]) if sorted(levels)[0] == levels[0] else (f"C(kind)[T.{levels[0]}]", -sizes[1])
    for prefix, size in (("C(flag)[T.true]", sizes[0]), (kind_term, kind_size), ("num", sizes[2])):
        row = _coefficient(outcome, prefix)
        assert np.sign(row["estimate"]) == np.sign(size) and row["p_value"] < 0.01, (prefix, row.to_dict(), outcome.formula)
    table = outcome.table
    assert (table.loc[table["term"].str.contains("nothing"), "p_value"] >= 0.001).all(), table
    failure = failure_model(df)
    assert any(f"driver={drive}" in note for note in failure.notes), failure.notes
    conditions = failure_conditions(df)
    k = int((df["driver"] == drive).sum())
    assert conditions.sentence == f"failed: {k} of {k} rows with driver={drive}; 0 of {len(df) - k} elsewhere", conditions.sentence
