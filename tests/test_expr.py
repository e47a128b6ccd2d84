import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridrunner.errors import ExprError
from gridrunner.expr import Expr, parse


@pytest.mark.parametrize("text, values, expected", [
    ("m_ssim < 0.5 or m_mae > 1", {"m_ssim": 0.4, "m_mae": 0.1}, True),
    ("m_ssim < 0.5 or m_mae > 1", {"m_ssim": 0.6, "m_mae": 0.1}, False),
    ("not (a >= 2 and b != 'x')", {"a": 3, "b": "y"}, False),
    ("loss == \"ssim\"", {"loss": "ssim"}, True),
    ("loss in ['ssim', 'ms_ssim']", {"loss": "ms_ssim"}, True),
    ("loss not in ['ssim']", {"loss": "l1"}, True),
    ("depth * filters * kernel ** 2", {"depth": 3, "filters": 8, "kernel": 3}, 216),
    ("-x + 2 * (y - 1) / 4", {"x": 1, "y": 3}, 0.0),
    ("log2(filters) + len(reps) + sum(reps)", {"filters": 8, "reps": [2, 2]}, 9.0),
    ("max(a, b) - min(a, b)", {"a": 2, "b": 5}, 3),
    ("flag == true", {"flag": True}, True),
    ("1e-3 < lr", {"lr": 0.01}, True),
])
def test_evaluates_rules_and_costs(text, values, expected):
    assert parse(text).evaluate(values) == expected


def test_missing_or_nan_values_never_fire_a_rule():
    rule = parse("m_ssim < 0.5")
    assert rule.evaluate({}) is None
    assert rule.evaluate({"m_ssim": None}) is None
    assert rule.evaluate({"m_ssim": float("nan")}) is None
    assert parse("depth * 2").evaluate({}) is None
    assert parse("max(0.01, k)").evaluate({"k": None}) is None


@pytest.mark.parametrize("text, expected", [
    ("not m_ssim < 0.5", None),  # was True: `not` of an unknown fired a rule on a row without m_ssim
    ("not (acc > 0.5) and step >= 2", None),
    ("acc > 0.5 or step >= 2", True),
    ("acc > 0.5 and step >= 9", False),
    ("not (acc > 0.5 or step >= 9)", None),
    ("not (acc > 0.5 and step >= 9)", True),
    ("acc in [1, 2]", None),
    ("not (acc in [1, 2])", None),
    ("not nan_metric > 0", None),
])
def test_not_of_a_missing_value_is_unknown_and_never_fires(text, expected):
    """Regression: `prune: step >= 2 and not (acc > 0.5)` pruned rows that never logged acc."""
    assert parse(text).evaluate({"step": 3, "nan_metric": float("nan")}) is expected


def test_names_and_unknown_names():
    rule = parse("m_ssim < 0.5 or depth > 3")
    assert rule.names == {"m_ssim", "depth"}
    with pytest.raises(ExprError, match=r"unknown outcome 'depth' \(valid: m_mae, m_ssim\)"):
        rule.check_names(["m_ssim", "m_mae"], "outcome")


@pytest.mark.parametrize("text, message", [
    ("", "empty expression in ''"),
    ("a <", "expected a number, string, name or '(', found the end at column 4 in 'a <'"),
    ("a < 1 )", "unexpected ')' at column 7 in 'a < 1 )'"),
    ("__import__('os')", "unknown function '__import__' (known: abs, exp, len, log, log10, log2, max, min, sqrt, sum) at column 1 in \"__import__('os')\""),
    ("a.b > 1", "unexpected character '.' at column 2 in 'a.b > 1'"),
    ("(a > 1", "expected ')', found the end at column 7 in '(a > 1'"),
    ("a ; b", "unexpected character ';' at column 3 in 'a ; b'"),
])
def test_syntax_errors_say_where(text, message):
    with pytest.raises(ExprError) as info:
        parse(text)
    assert str(info.value) == message


def test_the_analysis_judges_a_rule_as_the_worker_did_on_a_real_grid(tmp_path, monkeypatch):
    """The failure rule has one evaluator: ``analysis.rows.rule_mask`` gives, on a grid the worker ran, the
    worker's own ``rule:`` verdicts, on parameters of every type (text against a number, lists, a zero
    divisor, a row that lacks a parameter)."""
    import csv

    import yaml
    from click.testing import CliRunner

    import gridrunner
    from gridrunner.analysis.rows import rule_mask
    from gridrunner.cli import main

    (tmp_path / "task_rule.py").write_text("def run(params, ctx):\n    return {'score': (len(str(params)) % 7) / 7}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rule = ("(b > 1 or sum(l) > 3 or 'x' in l or l == [1, 2]) and score / a > 0.1"
            " or not (c == 'q') and score < 0.5")
    spec = {"name": "r", "task": "task_rule:run", "outcomes": ["score"], "failure": rule,
            "grid": [{"a": [0, 1, 2], "b": ["x", 2], "l": [[1, 2], [3, 4], ["x"]]},
                     {"a": [1], "b": [0], "l": [[5]], "c": ["p", "q"]}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    assert runner.invoke(main, ["make", str(tmp_path / "r.yaml"), "--runs", str(tmp_path / "runs")]).exit_code == 0
    worked = runner.invoke(main, ["work", "--grid", str(tmp_path / "runs" / "r"), "--inline", "--quiet", "--no-linger"])
    assert worked.exit_code == 0, worked.output
    rows = [row for path in sorted((tmp_path / "runs" / "r" / "shards").glob("*.csv")) for row in csv.DictReader(open(path))]
    worker = {row["row_id"]: row["error"].startswith("rule:") for row in rows}
    assert len(worker) == 20 and 0 < sum(worker.values()) < 20 and all(r["status"] in ("done", "failed") for r in rows)
    df = gridrunner.load(tmp_path / "runs" / "r")
    assert dict(zip(df["row_id"], rule_mask(df, rule))) == worker


_NAMES = ("a", "b", "c")
_comparison = st.builds(lambda name, op, number: f"{name} {op} {number}", st.sampled_from(_NAMES),
                        st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), st.integers(-2, 2))
_membership = st.builds(lambda name, neg, items: f"{name} {neg}in [{', '.join(map(str, items))}]",
                        st.sampled_from(_NAMES), st.sampled_from(["", "not "]),
                        st.lists(st.integers(-2, 2), min_size=1, max_size=3))
_arith = st.builds(lambda x, op, y, cmp, n: f"{x} {op} {y} {cmp} {n}", st.sampled_from(_NAMES),
                   st.sampled_from(["+", "-", "*"]), st.sampled_from(_NAMES), st.sampled_from(["<", ">="]),
                   st.integers(-3, 3))
_conditions = st.recursive(
    st.one_of(_comparison, _membership, _arith),
    lambda inner: st.one_of(st.builds(lambda x: f"not ({x})", inner),
                            st.builds(lambda x, op, y: f"({x}) {op} ({y})", inner, st.sampled_from(["and", "or"]),
                                      inner)),
    max_leaves=6)
_value = st.one_of(st.integers(-2, 2), st.just(None), st.just(float("nan")))


@settings(max_examples=300, deadline=None)
@given(_conditions, st.lists(st.dictionaries(st.sampled_from(_NAMES), _value), min_size=1, max_size=6),
       st.lists(st.integers(-2, 2), min_size=3, max_size=3))
def test_conditions_are_three_valued_and_a_known_answer_never_changes_with_the_unknowns(text, records, fill):
    """Over generated rules and partial records (names missing, None, NaN): a True or False answer holds
    for every value the unknowns could take (so a missing value can never make a rule fire)."""
    rule = parse(text)
    answers = [rule.evaluate(record) for record in records]
    for record, answer in zip(records, answers):
        assert answer in (True, False, None)
        if answer is None:
            continue
        known = {k: v for k, v in record.items() if isinstance(v, int)}
        for offset in range(3):  # a few completions of the unknowns
            completed = {name: known.get(name, fill[(i + offset) % 3]) for i, name in enumerate(_NAMES)}
            assert rule.evaluate(completed) is answer, (text, record, completed)


_ALPHABET = st.sampled_from(list("abxyz0123456789 .,()[]<>=!+-*/%'\"_") + ["and", "or", "not", "in", "import",
                                                                              "lambda", "__class__", "log("])


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=20).map("".join))
def test_fuzz_only_parses_or_raises_expr_error(text):
    """Any text either parses into the small language or raises ExprError; nothing else can happen."""
    try:
        expr = Expr(text)
    except ExprError:
        return
    values = {name: 1 for name in expr.names}
    try:
        expr.evaluate(values)
    except ExprError:
        pass
    except (OverflowError, ZeroDivisionError):
        pass
