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
