"""`gridrunner analyze` on grids `make` accepts, through the real command line: a report and exit 0, or one
`Error:` line and exit 1 where no model can be fitted; never exit 3. The first three are the grids that
crashed it (issue 12)."""
import pandas as pd
import pytest

from cli_runs import analyse, check_contract, make_and_run

TOY = {"task": "gridrunner.tasks.toy:quadratic", "outcomes": ["score", "runtime_proxy"]}
SYNTHETIC = {"task": "synthetic:run", "outcomes": ["score", "aux"]}


def test_regression_a_boolean_parameter_is_a_level(tmp_path):
    # was: exit 3, "unexpected TypeError: Cannot interpret 'BooleanDtype' as a data type"
    grid = make_and_run(tmp_path, {**TOY, "name": "b", "grid": {"x": [0.0, 0.5, 1.0], "big": [True, False], "loss": ["l1", "ssim"]}, "repeat": 2})
    analysed = analyse(grid)
    check_contract(analysed)
    assert analysed.exit_code == 0
    levels = pd.read_csv(analysed.report_dir / "levels.csv")
    assert set(levels.loc[levels["param"] == "big", "level"]) == {"false", "true"}
    assert "C(big)" in (analysed.report_dir / "report.md").read_text()


def test_regression_a_union_of_sub_grids_with_different_parameters_is_modelled_with_the_sub_grid_as_a_factor(tmp_path):
    # was: exit 3, "unexpected ValueError: 'Intercept' is not in list"
    spec = {**TOY, "name": "u", "grid": [{"x": [0.0, 0.5, 1.0], "loss": ["l1", "ssim"], "depth": [2, 4]},
                                         {"x": [0.0, 1.0], "loss": ["l2"], "z": [1, 2, 3]}]}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    assert analysed.exit_code == 0
    text = (analysed.report_dir / "report.md").read_text()
    assert "Formula: `score ~ C(subgrid) + x + depth + z`" in text
    assert "depth only in grid[0]; z only in grid[1]" in text and "modelled within the sub-grids that have it" in text


def test_regression_a_null_among_the_values_is_a_level_of_its_own(tmp_path):
    # was: exit 3, "unexpected ValueError: 'list' argument must have no negative elements"
    grid = make_and_run(tmp_path, {**TOY, "name": "n", "grid": {"x": [0.0, 0.5, 1.0], "dropout": [None, 0.1, 0.5], "loss": ["l1", "ssim"]}})
    analysed = analyse(grid)
    check_contract(analysed)
    assert analysed.exit_code == 0
    levels = pd.read_csv(analysed.report_dir / "levels.csv", keep_default_na=False)
    assert list(levels.loc[levels["param"] == "dropout", "level"]) == ["null", "0.1", "0.5"]
    model = pd.read_csv(analysed.report_dir / "outcome_model.csv")
    assert {"C(dropout)[T.0.1]", "C(dropout)[T.0.5]"} <= set(model["term"])


def test_one_row_gives_one_error_line_that_says_why_and_writes_nothing(tmp_path):
    analysed = analyse(make_and_run(tmp_path, {**SYNTHETIC, "name": "one", "grid": {"x": [0.5], "loss": ["l1"]}}))
    check_contract(analysed)
    assert analysed.exit_code == 1
    assert "outcome model: 1 successful rows for 1 coefficients" in analysed.output


def test_a_grid_not_run_yet_gives_one_error_line(tmp_path):
    analysed = analyse(_made_only(tmp_path))
    check_contract(analysed)
    assert analysed.exit_code == 1
    assert "failure model: no row has finished" in analysed.output


def _made_only(tmp_path):
    from cli_runs import invoke

    (tmp_path / "g.yaml").write_text("task: gridrunner.tasks.toy:quadratic\ngrid: {x: [0.0, 1.0]}\noutcomes: [score, runtime_proxy]\n")
    assert invoke("make", tmp_path / "g.yaml", "--runs", tmp_path / "runs").exit_code == 0
    return tmp_path / "runs" / "g"


def test_every_row_failed_gives_one_error_line(tmp_path):
    spec = {**SYNTHETIC, "name": "allfail", "grid": {"x": [0.0, 1.0], "loss": ["l1", "ssim"]}, "failure": "score < 100"}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    assert analysed.exit_code == 1 and "failure model: every finished row failed" in analysed.output


def test_no_failure_still_writes_the_report_and_the_failure_section_says_why(tmp_path):
    spec = {**SYNTHETIC, "name": "nofail", "grid": {"x": [0.0, 0.5, 1.0], "loss": ["l1", "l2"]}, "repeat": 3, "failure": "score < -100"}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    assert analysed.exit_code == 0
    text = (analysed.report_dir / "report.md").read_text()
    assert "Not fitted: no finished row failed." in text
    assert "Failure conditions: no finished row failed (0 of 18)" in analysed.output


def test_rows_still_running_or_not_run_are_counted_and_left_out(tmp_path):
    spec = {**TOY, "name": "partial", "grid": {"x": [0.0, 0.5, 1.0], "loss": ["l1", "l2"], "depth": [2, 4]}, "repeat": 2}
    analysed = analyse(make_and_run(tmp_path, spec, max_rows=16, running=3))
    check_contract(analysed)
    assert analysed.exit_code == 0
    assert "3 running, 5 not run" in analysed.output


def test_planted_failure_driver_is_stated_as_a_condition_with_counts(tmp_path):
    spec = {"name": "cond", "task": "synthetic:run", "outcomes": ["score", "aux"],
            "grid": {"act": ["relu", "tanh"], "lr": [0.001, 0.01, 0.1], "width": [1, 2, 3]}, "repeat": 2,
            "fixed": {"fail_when": {"act": '"tanh"', "lr": "0.1"}}}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    assert "Failure conditions: failed: 6 of 6 rows with act=tanh and lr=0.1; 0 of 30 elsewhere" in analysed.output
    table = pd.read_csv(analysed.report_dir / "failure_conditions.csv")
    assert table.iloc[0].to_dict() == {"kind": "exact", "condition": "act=tanh and lr=0.1", "failed": 6, "rows": 6, "failure_rate": 1.0}


def test_failures_at_random_are_said_to_follow_no_simple_rule(tmp_path):
    spec = {"name": "noise", "task": "synthetic:run", "outcomes": ["score", "aux"],
            "grid": {"a": [1, 2, 3], "b": ["p", "q", "r"]}, "repeat": 6, "fixed": {"fail_share": 0.3}}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    words = " ".join(analysed.output.split())  # the summary wraps long lines
    assert "Failure conditions: the failures follow no simple rule, and no condition on parameter levels stands out" in words


def test_regression_a_grid_whose_only_parameter_has_one_level_fits_the_failure_rate_alone(tmp_path):
    # was: exit 3, "unexpected ValueError: Shape of passed values is (0, 5), indices imply (0, 6)" (statsmodels'
    # marginal effects of an intercept-only logit); found by the seeded property run (seed 14714)
    spec = {**SYNTHETIC, "name": "flat", "grid": {"a": [0]}, "repeat": 12, "fixed": {"fail_share": 0.4}}
    grid = make_and_run(tmp_path, spec)
    analysed = analyse(grid)
    check_contract(analysed)
    failed = sum(row["status"] == "failed" for row in _rows(grid))
    assert 0 < failed < 12, failed  # both outcomes, so a failure model is fitted
    assert analysed.exit_code == 0, analysed.output


def _rows(grid):
    import csv

    return [row for path in sorted((grid / "shards").glob("*.csv")) for row in csv.DictReader(open(path))]


def test_parameters_named_like_analysis_columns_or_formula_functions_are_analysed(tmp_path):
    names = {"state": ["a", "b"], "failed": [1, 2], "subgrid": [True, False], "C": ["x", "y"], "np": [0.5, 1.5]}
    analysed = analyse(make_and_run(tmp_path, {**SYNTHETIC, "name": "named", "grid": names, "repeat": 2,
                                               "fixed": {"effects": {"C": {'"y"': 1.0}}, "noise": 0.05}}))
    check_contract(analysed)
    assert analysed.exit_code == 0
    model = pd.read_csv(analysed.report_dir / "outcome_model.csv").set_index("term")
    assert {"C(param_state)[T.b]", "param_failed", "C(param_subgrid)[T.true]", "C(C)[T.y]", "np"} <= set(model.index)
    assert model.loc["C(C)[T.y]", "estimate"] > 0.9
    assert "The parameter `state` is shown as `param_state`" in (analysed.report_dir / "report.md").read_text()


# --------------------------------------------------------------------------- what --metric and --formula may name

@pytest.fixture(scope="module")
def xloss_grid(tmp_path_factory):
    """12 done rows of x ∈ {0, 0.5, 1} × loss ∈ {l1, ssim} × 2 seeds; x = 0 has no logarithm."""
    return make_and_run(tmp_path_factory.mktemp("xloss"), {**SYNTHETIC, "name": "xloss", "repeat": 2,
                                                           "grid": {"x": [0.0, 0.5, 1.0], "loss": ["l1", "ssim"]}})


def _one_error_line(grid, *args):
    before = sorted(p for p in grid.rglob("*"))
    analysed = analyse(grid, *args)
    assert analysed.exit_code == 1, analysed.output
    lines = analysed.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), analysed.output
    assert sorted(p for p in grid.rglob("*")) == before and not analysed.report_dir.exists()
    return lines[0]


@pytest.mark.parametrize("metric, message", [
    ("loss", "'loss' is a parameter, not an outcome"),
    ("x", "'x' is a parameter, not an outcome"),
    ("status", "'status' is not an outcome"),
    ("worker", "'worker' is not an outcome"),
    ("row_id", "'row_id' is not an outcome"),
    ("error", "'error' is not an outcome"),
    ("shard", "'shard' is not an outcome"),
    ("nosuch", "unknown metric 'nosuch'"),
])
def test_regression_a_metric_that_is_a_column_but_not_an_outcome_is_one_error_line(xloss_grid, metric, message):
    # was: exit 3, "unexpected ValueError: zero-size array to reduction operation maximum" (statsmodels)
    assert _one_error_line(xloss_grid, "--metric", metric) == f"Error: {message} (outcomes: score, aux)"


@pytest.mark.parametrize("formula, message", [
    ("score ~ np.log(x)", "the formula 'score ~ np.log(x)' cannot be fitted: np.log(x) is infinite in 4 of 12 rows "
                          "(a transform outside its domain, such as np.log of 0 or a division by 0)"),
    ("np.log(x) ~ C(loss)", "the formula 'np.log(x) ~ C(loss)' cannot be fitted: np.log(x) is infinite in 4 of 12 "
                            "rows (a transform outside its domain, such as np.log of 0 or a division by 0)"),
    ("score ~ 0", "the formula 'score ~ 0' has no terms to fit: its right-hand side removes the intercept and adds "
                  "no term (add one, as in 'score ~ 1 + x')"),
    ("score ~ -1", "the formula 'score ~ -1' has no terms to fit: its right-hand side removes the intercept and adds "
                   "no term (add one, as in 'score ~ 1 + x')"),
    ("~ x", "the formula '~ x' has no response: name the outcome to model left of '~', as in "
            "'m_ssim ~ C(loss) + depth'"),
    ("status ~ x", "the formula 'status ~ x' models 'status', which is not an outcome (outcomes: score, aux)"),
    ("np.exp(aux) + loss ~ x", "the formula 'np.exp(aux) + loss ~ x' cannot be fitted: its response np.exp(aux) + "
                               "loss is not a number"),
    ("score + aux ~ x", "the formula 'score + aux ~ x' cannot be fitted: its response score + aux is 2 columns "
                        "(score, aux); model one outcome at a time"),
    ("score ~ nosuch", "the formula 'score ~ nosuch' does not fit the grid's columns: Error evaluating factor: "
                       "NameError: name 'nosuch' is not defined"),
])
def test_regression_a_formula_that_parses_but_cannot_be_fitted_is_one_error_line(xloss_grid, formula, message):
    # was: exit 3 with "LinAlgError: SVD did not converge" (np.log of 0), "ValueError: zero-size array" (no
    # terms); "'str' object has no attribute 'ndim'" for no response
    assert _one_error_line(xloss_grid, "--formula", formula) == f"Error: {message}"


def test_a_formula_with_a_transform_defined_on_every_row_still_fits(xloss_grid, tmp_path):
    analysed = analyse(xloss_grid, "--formula", "score ~ np.log(x + 1) + C(loss)", "--out", str(tmp_path / "r"))
    assert analysed.exit_code == 0, analysed.output
    assert "np.log(x + 1)" in pd.read_csv(tmp_path / "r" / "outcome_model.csv")["term"].tolist()


def test_regression_a_numeric_parameter_with_infinite_values_is_modelled_as_levels(tmp_path):
    # was: exit 3, "unexpected LinAlgError: SVD did not converge" (terms.unit_columns divided by an infinite norm)
    for name, inf in (("inf", float("inf")), ("neginf", -float("inf"))):
        spec = {**SYNTHETIC, "name": name, "grid": {"a": [1, 2, inf], "b": ["x", "y", "z"]}, "repeat": 2,
                "fixed": {"effects": {"b": {'"y"': 1.0}}}}
        analysed = analyse(make_and_run(tmp_path / name, spec))
        check_contract(analysed)
        assert analysed.exit_code == 0, analysed.output
        text = (analysed.report_dir / "report.md").read_text()
        assert "Formula: `score ~ C(a) + C(b)`" in text
        assert "a has values that are not finite numbers" in text
        levels = pd.read_csv(analysed.report_dir / "levels.csv", keep_default_na=False)
        assert set(levels.loc[levels["param"] == "a", "level"]) == {"1", "2", "inf" if inf > 0 else "-inf"}


def test_regression_a_parameter_with_the_largest_floats_is_not_collinear_with_the_intercept(tmp_path):
    # was: "dropped a: collinear with the intercept" (the column's norm overflowed to inf, so it scaled to zeros)
    spec = {**SYNTHETIC, "name": "huge", "grid": {"a": [1.7976931348623157e+308, -1.7976931348623157e+308, 0.0],
                                                 "b": ["x", "y", "z"]}, "repeat": 2}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    text = (analysed.report_dir / "report.md").read_text()
    assert "collinear" not in text
    assert "Formula: `score ~ C(a) + C(b)`" in text and "a reaches 1.79769e+308, too large a number to enter linearly" in text
    model = pd.read_csv(analysed.report_dir / "outcome_model.csv")
    assert model["estimate"].notna().all() and model["p_value"].notna().all()


def test_regression_nan_among_a_parameters_values_is_a_level_of_its_own_not_null(tmp_path):
    # was: the level "null", as if the spec had no value there
    spec = {**SYNTHETIC, "name": "nan", "grid": {"a": [1, 2, float("nan")], "b": ["x", "y", "z"]}, "repeat": 2}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    levels = pd.read_csv(analysed.report_dir / "levels.csv", keep_default_na=False)
    assert list(levels.loc[levels["param"] == "a", "level"]) == ["1", "2", "nan"]


@pytest.mark.parametrize("values", [[1, 2, 9223372036854775808], [1, 2, 10**30], [-(10**400), 0, 10**400],
                                    [9223372036854775807, 9223372036854775808, 9223372036854775809]])
def test_regression_integers_outside_int64_are_loaded_and_analysed(tmp_path, values):
    # was: exit 3, "unexpected OverflowError" in frame._typed_param (dtype int64)
    import gridrunner

    spec = {**SYNTHETIC, "name": "big", "grid": {"a": values, "b": ["x", "y", "z"]}, "repeat": 2}
    grid = make_and_run(tmp_path, spec)
    df = gridrunner.load(grid)
    assert sorted(set(df["a"])) == sorted(values)  # every value is kept exactly, none merged with another
    analysed = analyse(grid)
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    levels = pd.read_csv(analysed.report_dir / "levels.csv", keep_default_na=False, dtype=str)
    assert list(levels.loc[levels["param"] == "a", "level"]) == [str(v) for v in sorted(values)]
    assert "a has integers beyond the 64-bit range, so it enters as levels" in (analysed.report_dir / "report.md").read_text()


#: Columns the report's tables add beside parameters and outcomes (rank in top.csv, ...), and the frame's shard.
TABLE_COLUMNS = ["rank", "budget_s", "rows_within", "finished", "failures", "failure_rate", "shard"]


@pytest.mark.parametrize("name", TABLE_COLUMNS + ["_score"])
def test_regression_a_parameter_named_like_a_column_a_table_adds_is_shown_as_param_name(tmp_path, name):
    # was: exit 3, "cannot insert rank, already exists" (tables.top_configurations), and likewise for the others
    spec = {**SYNTHETIC, "name": "t", "grid": {name: [1, 2, 3], "b": ["x", "y"]}, "repeat": 2, "fixed": {"fail_share": 0.3}}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    shown = name if name in ("shard", "_score") else f"param_{name}"
    top = pd.read_csv(analysed.report_dir / "top.csv")
    assert list(top.columns[:3]) == ["rank", shown, "b"]
    assert sorted(set(top[shown])) <= [1, 2, 3]
    front = pd.read_csv(analysed.report_dir / "pareto_front.csv")
    assert set(front[shown]) <= {1, 2, 3}


@pytest.mark.parametrize("name", TABLE_COLUMNS + ["state", "failed"])
def test_regression_an_outcome_named_like_a_column_the_analysis_adds_is_shown_as_outcome_name(tmp_path, name):
    # was: exit 3, "cannot insert rank, already exists" (tables.top_configurations), and likewise for the
    # others; exit 1 for state and failed ("an outcome is named 'state', which the analysis reserves")
    spec = {"task": "synthetic:run", "outcomes": ["score", name], "name": "t", "grid": {"a": [1, 2, 3], "b": ["x", "y"]},
            "repeat": 2, "metric": "score"}
    module = f"synthetic_as_{name.strip('_')}"  # one module per name: an imported module stays imported
    (tmp_path / f"{module}.py").write_text(
        "from synthetic import run as _run\n"
        f"def run(params, ctx):\n    out = _run(params, ctx)\n    out[{name!r}] = out.pop('aux')\n    return out\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        grid = make_and_run(tmp_path, {**spec, "task": f"{module}:run"})
    finally:
        sys.path.remove(str(tmp_path))
    analysed = analyse(grid)
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    shown = name if name == "shard" else f"outcome_{name}"
    top = pd.read_csv(analysed.report_dir / "top.csv")
    assert list(top.columns) == ["rank", "a", "b", "seed", "score", shown, "runtime_s", "row_id"]
    by_it = analyse(grid, "--metric", name, "--goal", "max")  # the spec's name for it
    assert by_it.exit_code == 0, by_it.output
    assert pd.read_csv(by_it.report_dir / "top.csv")[shown].is_monotonic_decreasing


def _worker_verdicts(grid):
    """Row id -> whether the worker's failure rule fired (``rule: ...``), over rows that finished."""
    return {row["row_id"]: row["error"].startswith("rule:") for row in _rows(grid)
            if row["status"] == "done" or row["error"].startswith("rule:")}


def _analysis_verdicts(grid):
    import gridrunner
    from gridrunner.analysis.rows import label_rows

    labelled = label_rows(gridrunner.load(grid))
    finished = labelled[labelled["state"].isin(["success", "failed_rule"])]
    return dict(zip(finished["row_id"], finished["state"].eq("failed_rule")))


@pytest.mark.parametrize("grid, rule", [
    ({"a": [0, 1, 2], "b": ["x", "y"]}, "b > 1"),  # text against a number: unknown to the worker, TypeError here
    ({"l": [[1, 2], [3, 4], [5]], "b": ["x", "y"]}, "l == [1, 2]"),
    ({"l": [[1, 2], [3, 4], [5]], "b": ["x", "y"]}, "sum(l) > 6"),
    ({"l": [[1, 2], [3, 4], [5]], "b": ["x", "y"]}, "len(l) > 1 and score < 0.5"),
    ({"l": [["a", "b"], ["c"], ["a"]], "b": ["x", "y"]}, "'a' in l"),
    ({"a": [0, 1, 2], "b": ["x", "y"]}, "score / a > 0.5"),  # a = 0: NaN to the worker, inf column-wise
    ({"state": ["p", "q"], "failed": [1, 2], "subgrid": [True, False]}, "state == 'p' and failed == 1 and subgrid"),
])
def test_regression_analyze_judges_the_failure_rule_as_the_worker_did(tmp_path, grid, rule):
    # was: exit 3 (TypeError, "Lengths must match", ...), or other rows failed than the worker's (4 for its 1,
    # 0 for its 4; inf where the worker had NaN), or "unknown column 'state'"
    spec = {**SYNTHETIC, "name": "rule", "grid": grid, "repeat": 3, "failure": rule,
            "fixed": {"effects": {next(iter(grid)): {"0": 2.0, '"p"': 2.0, "[1,2]": 2.0, '["a","b"]': 2.0}}}}
    grid_dir = make_and_run(tmp_path, spec)
    worker = _worker_verdicts(grid_dir)
    assert len(worker) == len(_rows(grid_dir))
    analysed = analyse(grid_dir)
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    assert _analysis_verdicts(grid_dir) == worker


def test_a_failure_rule_that_cannot_be_evaluated_on_some_rows_is_said_so_and_does_not_fire_there(tmp_path):
    grid = make_and_run(tmp_path, {**SYNTHETIC, "name": "err", "grid": {"a": [0, 1, 2], "b": ["x", "y"]}, "repeat": 2})
    analysed = analyse(grid, "--failure", "log(a) > 0.5")
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    text = (analysed.report_dir / "report.md").read_text()
    assert "The failure rule cannot be evaluated on 4 rows (first: log() failed: math domain error" in text
    assert "8 done, 0 failed by exception, 4 failed by rule" in analysed.output


def test_regression_a_metric_near_the_largest_float_writes_the_report_and_importance_says_why_not(tmp_path, monkeypatch):
    # was: exit 3 in importance.py, "Input contains infinity or a value too large for dtype('float64')"
    (tmp_path / "task_huge.py").write_text("def run(params, ctx):\n"
                                           "    if (params['a'] + params['seed'] + len(params['b'])) % 4 == 0:\n"
                                           "        raise RuntimeError('planted')\n"
                                           "    return {'score': 1.7e308 * (params['a'] - 2) / (1 + (params['b'] == 'x'))}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = {"task": "task_huge:run", "outcomes": ["score"], "name": "huge", "grid": {"a": [1, 2, 3], "b": ["x", "y", "z"]},
            "repeat": 4}
    analysed = analyse(make_and_run(tmp_path, spec))
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    text = (analysed.report_dir / "report.md").read_text()
    assert "Not fitted: score reaches 1.7e+308, too large for least squares" in text
    section = text[text.index("## Importance"):text.index("## Configurations")]
    assert "Note: score reaches 1.7e+308: it was divided by that before the forest was fitted" in section, section
    importance = pd.read_csv(analysed.report_dir / "importance.csv")
    assert importance.loc[0, "effect"] == "a" and importance["variance_share"].between(0, 1).all()
    assert "(score histogram: not drawn, matplotlib cannot draw these values" in text


def test_regression_text_with_dollar_signs_is_drawn_as_written_not_as_mathtext(tmp_path):
    # was: exit 3, matplotlib's mathtext parsing "$x^$" (a ValueError over several lines)
    levels = ["$x^$", "plain", "$\\frac{a}$", "a$b$c"]
    spec = {**SYNTHETIC, "name": "dollar", "grid": {"a": levels, "b": [1, 2]}, "repeat": 3,
            "fixed": {"fail_when": {"a": '"$x^$"'}, "effects": {"a": {'"plain"': 1.0}}}}
    analysed = analyse(make_and_run(tmp_path, spec), "--split-by", "a")
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    text = (analysed.report_dir / "report.md").read_text()
    assert "not drawn" not in text
    from gridrunner.analysis import plots

    assert plots.plain("$x^$") == "\\$x^\\$"


def test_regression_no_cell_of_the_report_csvs_starts_a_spreadsheet_formula(tmp_path):
    # was: top.csv, levels.csv, failure_rates.csv, runtime.csv, pareto_front.csv, runtime_budgets.csv and
    # outcome_model.csv held =1+1, @SUM(A1) and -x as they were
    from cli_runs import formula_cells

    spec = {**SYNTHETIC, "name": "formula", "grid": {"a": ["=1+1", "@SUM(A1)", "-x", "+y", "plain", '"q"'], "b": [1, 2]},
            "repeat": 2, "fixed": {"fail_when": {"a": '"-x"'}, "effects": {"a": {'"=1+1"': 1.0}}}}
    analysed = analyse(make_and_run(tmp_path, spec))
    assert analysed.exit_code == 0, analysed.output
    assert formula_cells(analysed.report_dir) == []
    levels = pd.read_csv(analysed.report_dir / "levels.csv", keep_default_na=False)
    assert set(levels.loc[levels["param"] == "a", "level"]) == {'"=1+1"', '"@SUM(A1)"', '"-x"', '"+y"', "plain", '"\\"q\\""'}
    model = pd.read_csv(analysed.report_dir / "outcome_model.csv")
    assert pd.api.types.is_float_dtype(model["ci_low"]) and (model["ci_low"] < 0).any()  # negative numbers stay numbers
    check_contract(analysed)


def test_regression_rules_and_options_use_the_specs_names_for_parameters_and_outcomes_the_analysis_renames(tmp_path, monkeypatch):
    # was: make accepted, the worker applied the rule, and analyze refused the spec's own rule ("unknown column
    # 'state'"), or refused an outcome named state or failed
    (tmp_path / "task_named.py").write_text("def run(params, ctx):\n"
                                            "    s = {1: 0.1, 2: 0.5, 3: 0.9}.get(params.get('rank'), 0.2) + 0.01 * params['seed']\n"
                                            "    return {'state': s, 'failed': 1 - s}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = {"task": "task_named:run", "outcomes": ["state", "failed"], "name": "named", "failure": "state < 0.3 and subgrid",
            "grid": [{"subgrid": [True, False], "rank": [1, 2, 3]}, {"subgrid": [True], "other": ["x", "y"]}], "repeat": 2}
    grid = make_and_run(tmp_path, spec)
    assert _analysis_verdicts(grid) == _worker_verdicts(grid) and any(_worker_verdicts(grid).values())
    analysed = analyse(grid, "--split-by", "subgrid")
    check_contract(analysed)
    assert analysed.exit_code == 0, analysed.output
    text = (analysed.report_dir / "report.md").read_text()
    assert "Failure rule: `state < 0.3 and subgrid`." in text
    assert "The outcome `state` is shown as `outcome_state`" in text and "The parameter `subgrid` is shown as `param_subgrid`" in text
    by_failed = analyse(grid, "--failure", "failed > 0.5 or rank == 3", "--metric", "failed")
    assert by_failed.exit_code == 0, by_failed.output
    assert "Failure rule: failed > 0.5 or rank == 3" in by_failed.output
