import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridrunner.errors import SpecError
from gridrunner.spec import decode_cell, encode_cell, expand, load_spec, row_id_of, validate
from gridtools import write_spec

BASE = {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"]}


def spec_of(grid, **extra):
    return validate({**BASE, "grid": grid, **extra})


# --------------------------------------------------------------------------- expansion

def test_product_order_ids_and_columns():
    spec = spec_of({"depth": [1, 2], "loss": ["l1", "ssim"]}, fixed={"steps": 10})
    rows = list(expand(spec))
    assert [r.params for r in rows] == [
        {"depth": 1, "loss": "l1"}, {"depth": 1, "loss": "ssim"},
        {"depth": 2, "loss": "l1"}, {"depth": 2, "loss": "ssim"},
    ]
    assert [r.row_id for r in rows] == [row_id_of(r.params) for r in rows]
    assert spec.columns[:3] == ["depth", "loss", "row_id"]
    assert spec.columns[-1] == "value"


def test_list_valued_and_linked_parameters():
    spec = spec_of({
        "filters": [[100, 100, 100], [125, 100, 50]],
        "arch": [{"reps": [3, 3], "kernel": 5}, {"reps": [2, 2], "kernel": 9}],
    })
    rows = list(expand(spec))
    assert len(rows) == 4
    assert rows[0].params == {"filters": [100, 100, 100], "reps": [3, 3], "kernel": 5}
    assert spec.params == ["filters", "reps", "kernel"]
    assert rows[0].cells == ("[100, 100, 100]", "[3, 3]", "5")


def test_subgrids_union_with_different_keys():
    spec = spec_of([{"depth": [5], "filters": [[100] * 5]}, {"depth": [7], "filters": [[314] * 7], "extra": [1, 2]}])
    rows = list(expand(spec))
    assert len(rows) == 3
    assert "extra" not in rows[0].params
    assert rows[0].cells[spec.params.index("extra")] == ""


def test_repeat_random_exclude():
    spec = spec_of({"loss": ["l1", "ssim"], "skip": ["dncnn", "resnet"]},
                   exclude=[{"loss": "ssim", "skip": "resnet"}, "loss == 'l1' and skip == 'dncnn' and seed == 1"],
                   repeat=2, random={"n": 3, "seed": 7, "params": {"lr": {"loguniform": [1e-4, 1e-2]},
                                                                      "width": {"int": [1, 4]},
                                                                      "act": {"choice": ["relu", "tanh"]}}})
    rows = list(expand(spec))
    # 4 combinations x 3 samples x 2 seeds = 24; minus ssim/resnet (6) and l1/dncnn/seed 1 (3)
    assert len(rows) == 24 - 6 - 3
    assert all(1e-4 <= r.params["lr"] <= 1e-2 and 1 <= r.params["width"] <= 4 for r in rows)
    assert {r.params["seed"] for r in rows} == {0, 1}
    again = [r.row_id for r in expand(spec_of({"loss": ["l1", "ssim"], "skip": ["dncnn", "resnet"]},
                                              exclude=spec.raw["exclude"], repeat=2, random=spec.raw["random"]))]
    assert again == [r.row_id for r in rows]


def test_exclude_does_not_confuse_true_and_one():
    spec = spec_of({"flag": [True, False, 1, 0]}, exclude=[{"flag": 1}])
    assert [r.params["flag"] for r in expand(spec)] == [True, False, 0]


def test_duplicate_combinations_from_overlapping_subgrids_appear_once():
    spec = spec_of([{"a": [1, 2]}, {"a": [2, 3]}])
    assert [r.params["a"] for r in expand(spec)] == [1, 2, 3]
    assert spec.size() == 4


_values = st.one_of(
    st.integers(-10**6, 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 500), max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_cell_round_trip_gives_back_typed_values(value):
    text = encode_cell(value)
    back = decode_cell(text)
    assert back == value and type(back) is type(value)
    assert not text.startswith(("=", "+", "@", "\t", "\r")), text
    assert not (text.startswith("-") and isinstance(value, str)), text


_grids = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]),
    st.lists(st.one_of(st.integers(0, 9), st.sampled_from(["x", "y", "z"])), min_size=1, max_size=4, unique=True),
    min_size=1, max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_grids, min_size=1, max_size=3), st.integers(1, 3))
def test_sizes_multiply_and_subgrids_add(subgrids, repeat):
    spec = spec_of(subgrids, repeat=repeat)
    sizes = [math.prod(len(v) for v in sub.values()) * repeat for sub in subgrids]
    assert spec.size() == sum(sizes)
    rows = list(expand(spec))
    distinct = {tuple(sorted(r.params.items(), key=lambda kv: kv[0])) for r in rows}
    assert len(rows) == len(distinct) == len({r.row_id for r in rows})
    if len(subgrids) == 1:
        assert len(rows) == sizes[0]


# --------------------------------------------------------------------------- bad specs: the exact errors

GOOD = "task: gridrunner.tasks.toy:noop\ngrid: {x: [1, 2]}\noutcomes: [value]\n"
BAD_SPECS = [
    ("", "g.yaml: the spec is empty; it needs at least `task`, `grid` and `outcomes`"),
    ("task: [unclosed\n", "g.yaml:2: invalid YAML: expected ',' or ']', but got '<stream end>'"),
    ("- just\n- a list\n", "g.yaml:1: the spec must be a mapping of keys (name, task, grid, fixed, exclude, repeat, "
                           "random, max_len, outcomes, failure, resources, cost, lease_s, max_attempts, metric, goal, prune, hang_after_min, "
                           "row_time_limit_min), got a list"),
    (GOOD + "outcome: [x]\n", "g.yaml:4, at key outcome: unknown key 'outcome'; did you mean 'outcomes'? (valid: "
                              "name, task, grid, fixed, exclude, repeat, random, max_len, outcomes, failure, "
                              "resources, cost, lease_s, max_attempts, metric, goal, prune, "
                              "hang_after_min, row_time_limit_min)"),
    ("task: gridrunner.tasks.toy:noop\noutcomes: [value]\n", "g.yaml:1: missing required key 'grid'"),
    ("task: no_such_module:run\ngrid: {x: [1]}\noutcomes: [value]\n",
     "g.yaml:1, at key task: cannot import task 'no_such_module:run': no module 'no_such_module' in the current "
     "directory, on the Python path or among gridrunner's tasks (valid: 'module:function', or the name of a "
     "bundled task: dncnn, unet, toy:<function>)"),
    ("task: gridrunner.tasks.toy:nothing_here\ngrid: {x: [1]}\noutcomes: [value]\n",
     "g.yaml:1, at key task: module 'gridrunner.tasks.toy' has no function 'nothing_here'"),
    ("task: gridrunner.tasks.toy:noop\ngrid: {x: 3}\noutcomes: [value]\n",
     "g.yaml:2, at key grid.x: expected a list of candidate values, got int 3; write [3] for one value, or move it "
     "to `fixed`"),
    ("task: gridrunner.tasks.toy:noop\ngrid: {}\noutcomes: [value]\n",
     "g.yaml:2, at key grid: the grid is empty: give at least one parameter with a list of values"),
    ("task: gridrunner.tasks.toy:noop\ngrid: {x: []}\noutcomes: [value]\n",
     "g.yaml:2, at key grid.x: the list of candidates is empty; give at least one value"),
    ("task: gridrunner.tasks.toy:noop\ngrid:\n  x: [1]\n  x: [2]\noutcomes: [value]\n",
     "g.yaml:4, at key grid.x: duplicate key 'x' (first at line 3)"),
    ("task: gridrunner.tasks.toy:noop\ngrid:\n  arch: [{a: 1, b: 2}, {a: 3}]\noutcomes: [value]\n",
     "g.yaml:3, at key grid.arch[1]: linked candidates must all set the same parameters: ['a', 'b'] vs ['a']"),
    ("task: gridrunner.tasks.toy:noop\ngrid:\n  arch: [{a: 1}, 2]\noutcomes: [value]\n",
     "g.yaml:3, at key grid.arch[1]: mix of linked (mapping) and plain candidates; use one kind per key"),
    (GOOD + "failure: value <\n",
     "g.yaml:4, at key failure: expected a number, string, name or '(', found the end at column 8 in 'value <'"),
    (GOOD + "failure: m_ssim < 0.5\n",
     "g.yaml:4, at key failure: unknown outcome or parameter 'm_ssim' (valid: value, x) in 'm_ssim < 0.5'"),
    (GOOD + "failure: __import__('os').system('x')\n",
     "g.yaml:4, at key failure: unexpected character '.' at column 17 in \"__import__('os').system('x')\""),
    (GOOD + "max_len: 0\n", "g.yaml:4, at key max_len: expected a positive integer, got 0"),
    (GOOD + "repeat: two\n", "g.yaml:4, at key repeat: expected a positive integer, got 'two'"),
    (GOOD + "failure: value + 1\n",  # regression: accepted, and every row ended failed
     "g.yaml:4, at key failure: a rule must be a condition (a comparison, 'in', 'and', 'or', 'not'), such as "
     "'m_ssim < 0.5' in 'value + 1'"),
    (GOOD + "exclude: [x]\n",
     "g.yaml:4, at key exclude[0]: a rule must be a condition (a comparison, 'in', 'and', 'or', 'not'), such as "
     "\"loss == 'ssim' and depth > 15\" in 'x'"),
    (GOOD + "exclude: [{y: 1}]\n",
     "g.yaml:4, at key exclude[0].y: unknown parameter 'y' (parameters: x)"),
    (GOOD + "random: {n: 3, params: {lr: {loguniform: [0, 1]}}}\n",
     "g.yaml:4, at key random.params.lr.loguniform: loguniform needs 0 < low"),
    (GOOD + "resources: {gpu: 1}\n",
     "g.yaml:4, at key resources.gpu: unknown resource 'gpu'; did you mean 'gpus'? (valid: time_min, gpus, cpus, "
     "mem_gb, partition)"),
    ("task: gridrunner.tasks.toy:noop\ngrid: {status: [1]}\noutcomes: [value]\n",
     "g.yaml:2, at key grid: 'status' is both a parameter and a bookkeeping or outcome column; rename it"),
    (GOOD + "fixed: {x: 1}\n", "g.yaml:4, at key fixed.x: 'x' is both in `fixed` and in the grid; keep one"),
    ("task: gridrunner.tasks.toy:noop\ngrid: {seed: [1, 2]}\nrepeat: 2\noutcomes: [value]\n",
     "g.yaml:3, at key repeat: `repeat` adds a `seed` column, but the grid already has a `seed` parameter"),
    ("task: gridrunner.tasks.toy:noop\ngrid: {x: [!!python/object/apply:os.system [echo hi]]}\noutcomes: [value]\n",
     "g.yaml:2: invalid YAML: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    (GOOD + "metric: m_ssim\n", "g.yaml:4, at key metric: the metric to analyse must be one of the outcomes (value), "
                               "got 'm_ssim'"),
    (GOOD + "goal: maximise\n", "g.yaml:4, at key goal: expected max (larger is better) or min, got 'maximise'"),
    (GOOD + "lease_s: -5\n", "g.yaml:4, at key lease_s: expected a positive number of seconds, got -5"),
    ("task: gridrunner.tasks.toy:noop\ngrid: {x: [1]}\noutcomes: [value, value]\n", "g.yaml:3, at key outcomes: metric names repeat"),
]


@pytest.mark.parametrize("text, message", BAD_SPECS, ids=[m.split(": ", 1)[-1][:40] for _, m in BAD_SPECS])
def test_bad_spec_gives_one_exact_error(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec("g.yaml")
    assert str(info.value) == message


def test_spec_error_survives_pickling():
    import pickle

    err = SpecError("g.yaml", "grid.x", "bad", 3)
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.line == 3


def test_task_as_a_module_of_tasks_or_any_importable_module(tmp_path, monkeypatch):
    assert validate({**BASE, "task": "toy:sleep", "grid": {"x": [1]}}).task == "toy:sleep"
    (tmp_path / "mytrain.py").write_text("def fit(params, ctx):\n    return {'value': 1.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert validate({**BASE, "task": "mytrain:fit", "grid": {"x": [1]}}).task == "mytrain:fit"


@pytest.mark.parametrize("text, message", [
    (GOOD + "lease_s: .inf\n", "g.yaml:4, at key lease_s: expected at most 1e+09 seconds (about 32 years), got inf"),
    (GOOD + "lease_s: .nan\n", "g.yaml:4, at key lease_s: expected a positive number of seconds, got nan"),
    (GOOD + "lease_s: 1.0e+308\n",
     "g.yaml:4, at key lease_s: expected at most 1e+09 seconds (about 32 years), got 1e+308"),
    (GOOD + "hang_after_min: .nan\n", "g.yaml:4, at key hang_after_min: expected a positive number of minutes, got nan"),
    (GOOD + "hang_after_min: 1.0e+300\n",
     "g.yaml:4, at key hang_after_min: expected at most 16666667 minutes (about 32 years), got 1e+300"),
    (GOOD + "row_time_limit_min: .inf\n", "g.yaml:4, at key row_time_limit_min: expected a positive number of "
                                          "minutes or a rule over the parameters such as '2 * depth', got inf"),
    (GOOD + "row_time_limit_min: 1.0e+200\n",
     "g.yaml:4, at key row_time_limit_min: expected at most 16666667 minutes (about 32 years), got 1e+200"),
    (GOOD + "resources: {time_min: .inf}\n", "g.yaml:4, at key resources.time_min: expected a non-negative number, got inf"),
    (GOOD + "resources: {mem_gb: .nan}\n", "g.yaml:4, at key resources.mem_gb: expected a non-negative number, got nan"),
    (GOOD + "resources: {time_min: 1.0e+12}\n",
     "g.yaml:4, at key resources.time_min: expected at most 16666667 minutes (about 32 years), got 1000000000000.0"),
])
def test_regression_non_finite_or_huge_durations_in_a_spec_are_refused(tmp_path, monkeypatch, text, message):
    # was: accepted; a lease of inf then killed every worker's heartbeat thread (OverflowError), and a time
    # limit of inf or 1e200 minutes overflowed the clocks it is added to
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec("g.yaml")
    assert str(info.value) == message


def test_regression_a_time_limit_rule_too_large_for_a_row_is_that_rows_rule_error():
    # was: 1e300 minutes for a row was accepted, and the watchdog's wait on it overflowed
    limit = spec_of({"depth": [1]}, row_time_limit_min="depth * 1e300").time_limit()
    assert limit({"depth": 1}) == (None, "RuleError: row_time_limit_min 'depth * 1e300' is 1e+300 for this row; "
                                         "expected at most 16666667 minutes")
    assert limit({"depth": 1e-299}) == (pytest.approx(10.0), None)


def test_regression_make_warns_of_a_number_that_yaml_reads_as_a_string(tmp_path, monkeypatch):
    """`lr: [1.0e-4, 1e-3]` made '1e-3' a string parameter, silently: `lr > 0.005` then excluded nothing and a
    cost over lr was None. make says so on stderr, with the spellings that mean the number; a quoted '1e-3'
    is a string on purpose and gets no warning."""
    from click.testing import CliRunner

    from gridrunner.cli import main

    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, "task: gridrunner.tasks.toy:noop\ngrid: {x: [1, 2], lr: [1.0e-4, 1e-3], tag: ['5e2']}\n"
                         "outcomes: [value]\n")
    result = CliRunner().invoke(main, ["make", "g.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: g.yaml:2, at key grid.lr[1]: 1e-3 is read as the string '1e-3': YAML 1.1, "
                             "which PyYAML follows, needs a dot and a signed exponent in a number; write 0.001 or "
                             "1.0e-3 for the number, or '1e-3' in quotes to keep the string\n")
    assert result.stdout.startswith("runs/g: 4 rows in the spec")
