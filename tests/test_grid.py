"""`make`: shards, idempotent re-make, extension that keeps results, the study's DnCNN grid."""
import csv
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridrunner.errors import GridError, SpecError
from gridrunner.grid import find_grid, make, saved_spec
from gridrunner.spec import BOOK_COLUMNS, expand
from gridrunner.store import GridStore, Result
from gridtools import write_spec

ROOT = Path(__file__).resolve().parents[1]


def shard_rows(grid_dir):
    out = {}
    for path in sorted((grid_dir / "shards").glob("shard-*.csv")):
        with open(path, newline="") as fh:
            out[path.name] = list(csv.DictReader(fh))
    return out


def test_make_writes_spec_copy_and_shards(tmp_path):
    spec = {"task": "gridrunner.tasks.toy:noop", "grid": {"a": [1, 2, 3], "b": ["x", "y"]}, "max_len": 4, "outcomes": ["value"]}
    report = make(write_spec(tmp_path, spec), tmp_path / "runs")
    grid = tmp_path / "runs" / "g"
    assert report.grid_dir == grid and report.new == 6 and report.kept == 0
    assert (grid / "spec.yaml").exists() and (grid / "spec.source.yaml").exists()
    shards = shard_rows(grid)
    assert list(shards) == ["shard-000.csv", "shard-001.csv"]
    assert [len(rows) for rows in shards.values()] == [4, 2]
    header = list(shards["shard-000.csv"][0])
    assert header == ["a", "b", *BOOK_COLUMNS, "value"]
    assert all(row["status"] == "not_run" and row["attempts"] == "0" for rows in shards.values() for row in rows)
    resolved = yaml.safe_load((grid / "spec.yaml").read_text())
    assert resolved["max_len"] == 4 and resolved["lease_s"] == 60.0
    assert not list((tmp_path / "runs").glob(".*"))  # no staging directory left behind


_grid = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.lists(st.integers(0, 20), min_size=1, max_size=5,
                                                                    unique=True), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_grid, st.integers(1, 7))
def test_shards_are_disjoint_cover_the_grid_and_remake_is_idempotent(tmp_path_factory, grid, max_len):
    tmp = tmp_path_factory.mktemp("g")
    spec = {"task": "gridrunner.tasks.toy:noop", "grid": grid, "max_len": max_len, "outcomes": ["value"]}
    path = write_spec(tmp, spec)
    make(path, tmp / "runs")
    shards = shard_rows(tmp / "runs" / "g")
    ids = [row["row_id"] for rows in shards.values() for row in rows]
    expected = [r.row_id for r in expand(saved_spec(tmp / "runs" / "g"))]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert all(len(rows) <= max_len for rows in shards.values())
    before = {p.name: p.read_bytes() for p in (tmp / "runs" / "g" / "shards").iterdir()}
    again = make(path, tmp / "runs")
    assert again.new == 0 and again.kept == len(ids) and again.orphans == []
    after = {p.name: p.read_bytes() for p in (tmp / "runs" / "g" / "shards").iterdir()}
    assert before == after


def test_extending_a_grid_keeps_results_and_reports_orphans(tmp_path):
    spec = {"task": "gridrunner.tasks.toy:noop", "grid": {"a": [1, 2], "b": ["x"]}, "max_len": 10, "outcomes": ["value"]}
    path = write_spec(tmp_path, spec)
    grid = make(path, tmp_path / "runs").grid_dir
    store = GridStore(grid)
    _, scan = store.claim(store.shard_paths()[0], "h:1", lambda *a: False, 3)
    store.record(scan.claim, Result("done", {"value": 0.25}, runtime_s=1.5))
    first = shard_rows(grid)["shard-000.csv"]

    spec["grid"] = {"a": [2, 3, 4], "b": ["x"]}  # drops a=1, keeps a=2, adds 3 and 4
    report = make(write_spec(tmp_path, spec), tmp_path / "runs")
    assert (report.total, report.kept, report.new) == (3, 1, 2)
    assert len(report.orphans) == 1
    shards = shard_rows(grid)
    assert shards["shard-000.csv"] == first  # untouched, results included
    assert [r["a"] for r in shards["shard-001.csv"]] == ["3", "4"]
    done = [r for r in first if r["status"] == "done"]
    assert done and done[0]["value"] == "0.25"


def test_changing_fixed_or_outcomes_of_a_made_grid_is_refused(tmp_path):
    spec = {"task": "gridrunner.tasks.toy:noop", "grid": {"a": [1]}, "fixed": {"steps": 1}, "outcomes": ["value"]}
    make(write_spec(tmp_path, spec), tmp_path / "runs")
    before = shard_rows(tmp_path / "runs" / "g")
    spec["fixed"] = {"steps": 2}
    with pytest.raises(SpecError, match=r"at key fixed: the fixed constants changed since this grid was made"):
        make(write_spec(tmp_path, spec), tmp_path / "runs")
    assert shard_rows(tmp_path / "runs" / "g") == before


def test_dry_run_writes_nothing(tmp_path):
    spec = {"task": "gridrunner.tasks.toy:noop", "grid": {"a": list(range(25))}, "max_len": 10, "outcomes": ["value"]}
    report = make(write_spec(tmp_path, spec), tmp_path / "runs", dry_run=True)
    assert report.new == 25 and len(report.shards) == 3
    assert not (tmp_path / "runs").exists()


def test_cost_orders_rows_expensive_first_across_shards(tmp_path):
    spec = {"task": "gridrunner.tasks.toy:sleep", "grid": {"duration": [0.1, 0.5, 0.2, 0.4, 0.3, 0.6]}, "max_len": 3,
            "cost": "duration", "outcomes": ["slept"]}
    grid = make(write_spec(tmp_path, spec), tmp_path / "runs").grid_dir
    shards = shard_rows(grid)
    assert [[float(r["duration"]) for r in rows] for rows in shards.values()] == [[0.6, 0.4, 0.2], [0.5, 0.3, 0.1]]


def test_a_directory_that_is_not_a_grid_is_never_overwritten(tmp_path):
    (tmp_path / "runs" / "g").mkdir(parents=True)
    (tmp_path / "runs" / "g" / "notes.txt").write_text("mine")
    spec = {"task": "gridrunner.tasks.toy:noop", "grid": {"a": [1]}, "outcomes": ["value"]}
    with pytest.raises(GridError, match="exists but holds no spec.yaml"):
        make(write_spec(tmp_path, spec), tmp_path / "runs")
    assert (tmp_path / "runs" / "g" / "notes.txt").read_text() == "mine"


def test_find_grid_takes_the_newest(tmp_path):
    for name in ("one", "two"):
        make(write_spec(tmp_path, {"task": "gridrunner.tasks.toy:noop", "grid": {"a": [1]}, "outcomes": ["v"]}, name),
             tmp_path / "runs")
    assert find_grid(None, tmp_path / "runs").name == "two"
    with pytest.raises(GridError, match="no grid under"):
        find_grid(None, tmp_path / "elsewhere")


@pytest.mark.parametrize("name, rows, shards", [("dncnn", 504, [72] * 7), ("unet", 200, [40] * 5), ("demo", 24, [12, 12]), ("toy", 450, [75] * 6)])
def test_the_study_grids(tmp_path, name, rows, shards):
    path = ROOT / "grids" / f"{name}.yaml"
    if not path.exists():
        pytest.fail(f"{path} is missing")
    report = make(path, tmp_path / "runs")
    assert report.new == rows
    if shards:
        assert [len(r) for r in shard_rows(report.grid_dir).values()] == shards
    again = make(path, tmp_path / "runs")
    assert again.new == 0 and again.kept == rows


_cell_values = st.one_of(
    st.integers(-10**9, 10**9), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10),
    st.lists(st.one_of(st.integers(-5, 500), st.text(max_size=3)), max_size=4),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_cell_values, min_size=1, max_size=6, unique_by=lambda v: (type(v).__name__, repr(v))))
def test_rows_read_back_from_a_shard_give_the_task_the_typed_values(tmp_path_factory, values):
    tmp = tmp_path_factory.mktemp("rt")
    spec = {"task": "gridrunner.tasks.toy:noop", "grid": {"v": values, "w": [1]}, "outcomes": ["value"]}
    grid = make(write_spec(tmp, spec), tmp / "runs").grid_dir
    store = GridStore(grid)
    got = []
    for path in store.shard_paths():
        while True:
            _, scan = store.claim(path, "h:1", lambda *a: False, 3)
            if scan.claim is None:
                break
            got.append(scan.claim.params)
            store.record(scan.claim, Result("done", {"value": 1.0}))
    expected = [r.params for r in expand(saved_spec(grid))]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a == b and all(type(a[k]) is type(b[k]) for k in a)


def test_the_readme_spec_example_validates():
    import re

    from gridrunner.spec import validate

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(# grids/example.yaml.*?)```", text, re.S).group(1)
    spec = validate(yaml.safe_load(block), check_task=False)
    assert spec.size() == 3 * 3 * 2 * 2 * 3 * 10


# ============================================================================
# A grid that lost its shards or its spec.yaml: make never hides a result, and leads to the fix
# ============================================================================

SMALL = {"name": "small", "task": "gridrunner.tasks.toy:noop", "grid": {"a": [1, 2, 3, 4], "b": ["x", "y", "z"]},
         "outcomes": ["value"], "max_len": 5}


def _cli(*args):
    from click.testing import CliRunner

    from gridrunner.cli import main

    return CliRunner().invoke(main, list(args))


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small(tmp_path, monkeypatch):
    """``runs/small`` made from ``small.yaml`` in the current directory: shards of 5, 5 and 2 rows, with
    3 rows of shard-000 and every row of shard-001 done."""
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, SMALL, "small")
    assert _cli("make", "small.yaml").exit_code == 0
    grid = Path("runs/small")
    store = GridStore(grid)
    for path, n in zip(store.shard_paths(), (3, 5)):
        for _ in range(n):
            _, scan = store.claim(path, "h:1", lambda *a: False, 3)
            store.record(scan.claim, Result("done", {"value": 1.0}))
    return grid


def test_regression_make_refuses_a_grid_whose_shards_folder_was_deleted_until_recover_rebuilt_it(small, tmp_path):
    """`make` after `rm -rf shards/` wrote 12 new rows and replaced shard-000's journal by an all-not_run
    one, so that `recover` brought its rows back without their results. The journals hold the rows: make
    now changes nothing and says to run `recover`, which rebuilds every shard."""
    before = shard_rows(small)
    shutil.rmtree(small / "shards")
    files = _files(tmp_path)
    message = ("Error: runs/small/shards/ is missing, but the journals of its 3 shard(s) are in runs/small/journal/; "
               "run `gridrunner recover --grid runs/small` first (it rebuilds shards from their journals, or says "
               "why it cannot), then `gridrunner make small.yaml` again; nothing was written\n")
    for args in (["make", "small.yaml", "--dry-run"], ["make", "small.yaml"]):
        result = _cli(*args)
        assert (result.exit_code, result.output) == (1, message)
        assert _files(tmp_path) == files  # no shard, and no journal replaced
    result = _cli("recover")
    assert result.exit_code == 0, result.output
    assert shard_rows(small) == before
    result = _cli("make", "small.yaml")
    assert (result.exit_code, result.output) == (
        0, "runs/small: 12 rows in the spec; 12 already there, wrote 0 new in 0 shard file(s)\n")
    assert shard_rows(small) == before
    assert sorted(p.name for p in (small / "journal").iterdir() if ".replaced-" in p.name) == []


def test_regression_make_refuses_a_grid_with_one_shard_file_deleted_instead_of_adding_its_rows_as_new(small, tmp_path):
    before = shard_rows(small)
    (small / "shards" / "shard-001.csv").unlink()  # its 5 rows are done
    files = _files(tmp_path)
    result = _cli("make", "small.yaml")
    assert (result.exit_code, result.output) == (
        1, "Error: shard-001.csv is missing from runs/small/shards/, but its journal is still in runs/small/journal/; "
           "run `gridrunner recover --grid runs/small` first (it rebuilds shards from their journals, or says why "
           "it cannot), then `gridrunner make small.yaml` again; nothing was written\n")
    assert _files(tmp_path) == files
    assert _cli("recover").exit_code == 0
    assert shard_rows(small) == before
    assert _cli("make", "small.yaml").output.startswith("runs/small: 12 rows in the spec; 12 already there")


def test_regression_split_never_takes_the_name_and_journal_of_a_deleted_shard(small):
    """A new shard is numbered past every journal too: the last shard deleted by hand keeps its journal."""
    (small / "shards" / "shard-002.csv").unlink()
    journal = (small / "journal" / "shard-002.csv.jsonl").read_bytes()
    result = _cli("split", "--shard", "0", "--into", "2")
    assert result.exit_code == 0, result.output
    assert [p.name for p in GridStore(small).shard_paths()] == ["shard-000.csv", "shard-001.csv", "shard-003.csv"]
    assert (small / "journal" / "shard-002.csv.jsonl").read_bytes() == journal
    assert _cli("recover").exit_code == 0
    assert len(shard_rows(small)["shard-002.csv"]) == 2


GARBLED = "{{{ : [\n"


@pytest.mark.parametrize("damage, line", [
    ("garbled", "runs/small/spec.yaml:1: invalid YAML: expected the node content, but found ':'; {verb} it from "
                "small.yaml, which runs/small/spec.source.yaml vouches for"),
    ("deleted", "runs/small/spec.yaml is missing; {verb} it from small.yaml, which runs/small/spec.source.yaml "
                "vouches for"),
    ("deleted with spec.source.yaml garbled",
     "runs/small/spec.yaml is missing; {verb} it from small.yaml, whose parameters and outcomes are the shards' "
     "columns (runs/small/spec.source.yaml:1: invalid YAML: expected the node content, but found ':'; the task and "
     "the fixed values cannot be checked)"),
])
def test_regression_make_restores_a_lost_spec_yaml_from_the_grids_own_spec(small, tmp_path, damage, line):
    """A garbled or deleted spec.yaml made every command fail, `make` included, with the grid's results
    unreachable. `make SPEC` restores it when spec.source.yaml (or, failing that, the shards' columns)
    vouches for SPEC; `--dry-run` says so and writes nothing."""
    before = shard_rows(small)
    if damage == "garbled":
        (small / "spec.yaml").write_text(GARBLED)
        result = _cli("status")
        assert (result.exit_code, result.output) == (
            1, "Error: runs/small/spec.yaml:1: invalid YAML: expected the node content, but found ':'; re-run "
               "`gridrunner make` on the source spec to restore it\n")
    else:
        (small / "spec.yaml").unlink()
        if "garbled" in damage:
            (small / "spec.source.yaml").write_text(GARBLED)
    files = _files(tmp_path)
    result = _cli("make", "small.yaml", "--dry-run")
    assert (result.exit_code, result.output) == (
        0, line.format(verb="would restore") + "\nruns/small: 12 rows in the spec; 12 already there, would write 0 "
                                                "new in 0 shard file(s)\n")
    assert _files(tmp_path) == files
    result = _cli("make", "small.yaml")
    assert (result.exit_code, result.output.splitlines()[0]) == (0, line.format(verb="restored"))
    assert yaml.safe_load((small / "spec.yaml").read_text())["outcomes"] == ["value"]
    assert (small / "spec.source.yaml").read_text() == (tmp_path / "small.yaml").read_text()
    assert _cli("status").exit_code == 0
    assert shard_rows(small) == before


@pytest.mark.parametrize("change, source, message", [
    ({"task": "gridrunner.tasks.toy:sleep"}, "intact",
     "Error: other.yaml, at key task: the task changed since this grid was made ('gridrunner.tasks.toy:noop' → "
     "'gridrunner.tasks.toy:sleep'); finished rows would no longer match. Make a new grid (another `name:` or "
     "--runs DIR), or change it back"),
    ({"outcomes": ["loss"]}, "garbled",
     "Error: runs/small/spec.yaml is missing, and nothing in runs/small vouches for other.yaml: "
     "runs/small/spec.source.yaml:1: invalid YAML: expected the node content, but found ':'; the shards' parameters "
     "and outcomes are a, b; value, not the spec's a, b; loss. Restore runs/small/spec.yaml from a backup, or make "
     "other.yaml as a new grid (another `name:` or --runs DIR); nothing was written"),
])
def test_regression_make_restores_no_spec_yaml_from_a_spec_the_grid_does_not_vouch_for(small, tmp_path, change,
                                                                                       source, message):
    (small / "spec.yaml").unlink()
    if source == "garbled":
        (small / "spec.source.yaml").write_text(GARBLED)
    write_spec(tmp_path, {**SMALL, **change}, "other")
    files = _files(tmp_path)
    result = _cli("make", "other.yaml")
    assert (result.exit_code, result.output) == (1, message + "\n")
    assert _files(tmp_path) == files


def test_regression_a_grid_that_lost_its_spec_yaml_and_its_shards_folder_comes_back_whole(small, tmp_path):
    """`make` restores spec.yaml only once the shards are back, and `recover --grid` needs no spec.yaml."""
    before = shard_rows(small)
    (small / "spec.yaml").unlink()
    shutil.rmtree(small / "shards")
    files = _files(tmp_path)
    result = _cli("make", "small.yaml")
    assert (result.exit_code, result.output) == (
        1, "Error: runs/small/shards/ is missing, but the journals of its 3 shard(s) are in runs/small/journal/; "
           "run `gridrunner recover --grid runs/small` first (it rebuilds shards from their journals, or says why "
           "it cannot), then `gridrunner make small.yaml` again; nothing was written\n")
    assert _files(tmp_path) == files
    result = _cli("recover", "--grid", "runs/small")
    assert result.exit_code == 0, result.output
    assert shard_rows(small) == before
    result = _cli("make", "small.yaml")
    assert result.exit_code == 0 and result.output.startswith("runs/small/spec.yaml is missing; restored it"), \
        result.output
    assert _cli("status").exit_code == 0 and shard_rows(small) == before
