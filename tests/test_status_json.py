"""``gridrunner status --json`` against generated grid states, ``--watch`` until the grid finishes, and
status text that never breaks a line in the middle off a terminal."""
import json
import os
import pty
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridrunner.cli import main
from gridrunner.store import ERROR, RUNTIME, STARTED, STATUS, WORKER, HOST, GridStore, now_iso
from gridtools import make_grid, start_worker

LIVE = f"{HOST}:{os.getpid()}"  # this test process: alive, on this host, and its claims are recent


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


DEAD = f"{HOST}:{dead_pid()}"
# What a row can be in a generated state, and what status must make of it.
ROW_STATES = st.one_of(
    st.just(("not_run",)),
    st.just(("running", "live")),
    st.just(("running", "dead_pid")),   # its worker's pid is gone on this host: stale at once
    st.just(("running", "old_lease")),  # a worker elsewhere that stopped beating long ago: stale by the lease
    st.tuples(st.just("done"), st.floats(0.01, 1e4, allow_nan=False)),
    st.tuples(st.just("failed"), st.floats(0.01, 1e4, allow_nan=False),
              st.sampled_from(["ValueError: bad x", "rule: score < 0.2", "TaskDied: killed by SIGSEGV", "",
                               "NonFiniteMetric: value is nan"])),
    st.just(("bad",)),  # a hand edit that status must report, not count
)


def set_state(shard, i: int, state: tuple, now: float) -> None:
    kind = state[0]
    shard.set(i, STATUS, kind if kind != "bad" else "finished?")
    if kind == "running":
        worker, started = {"live": (LIVE, now), "dead_pid": (DEAD, now),
                           "old_lease": ("elsewhere.example:1", now - 10 * 3600)}[state[1]]
        shard.set(i, WORKER, worker)
        shard.set(i, STARTED, now_iso(started))
    elif kind in ("done", "failed"):
        shard.set(i, WORKER, DEAD)
        shard.set(i, STARTED, now_iso(now - state[1]))
        shard.set(i, RUNTIME, repr(state[1]))
        if kind == "failed":
            shard.set(i, ERROR, state[2])


def expected_kind(error: str) -> str:
    return error.split(":", 1)[0] or "?"


def status_json(grid: Path) -> dict:
    result = CliRunner().invoke(main, ["status", "--grid", str(grid), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states=st.lists(ROW_STATES, min_size=1, max_size=30), max_len=st.integers(1, 12))
def test_status_json_holds_every_count_shard_running_row_stale_claim_failure_kind_and_the_eta(states, max_len):
    with tempfile.TemporaryDirectory() as tmp:
        grid = make_grid(Path(tmp), {"name": "gen", "task": "gridrunner.tasks.toy:noop", "outcomes": ["value"],
                                     "grid": {"i": list(range(len(states)))}, "max_len": max_len, "lease_s": 60})
        store = GridStore(grid)
        now = time.time()
        by_row, k = {}, 0
        for path in store.shard_paths():
            with store.transaction(path) as shard:
                for i in range(len(shard)):
                    by_row[shard.cell(i, 0)] = (path.name, states[k])
                    set_state(shard, i, states[k], now)
                    k += 1
        assert k == len(states)

        doc = status_json(grid)

        valid = {rid: s for rid, s in by_row.items() if s[1][0] != "bad"}
        counts = Counter(s[1][0] for s in valid.values())
        assert doc["counts"] == {state: counts[state] for state in ("not_run", "running", "done", "failed")}
        assert doc["total"] == len(valid)
        assert doc["finished_rows"] == counts["done"] + counts["failed"]
        assert doc["finished"] == (counts["not_run"] + counts["running"] == 0)
        assert doc["bad_rows"] == len(by_row) - len(valid)
        assert [s["name"] for s in doc["shards"]] == [p.name for p in store.shard_paths()]
        for entry in doc["shards"]:
            mine = Counter(s[1][0] for s in valid.values() if s[0] == entry["name"])
            assert entry["counts"] == {state: mine[state] for state in ("not_run", "running", "done", "failed")}
            assert entry["total"] == sum(mine.values())
            assert entry["finished"] == mine["done"] + mine["failed"]
            assert len(entry["bad_rows"]) == sum(1 for s in by_row.values() if s[0] == entry["name"] and s[1][0] == "bad")
            assert all(bad["message"] and bad["line"] >= 2 for bad in entry["bad_rows"])
            assert entry["error"] is None

        running = {r["row_id"]: r for r in doc["running"]}
        assert set(running) == {rid for rid, s in valid.items() if s[1][0] == "running"}
        for rid, row in running.items():
            how = valid[rid][1][1]
            assert row["shard"] == valid[rid][0]
            assert row["stale"] == (how != "live"), (how, row)
            assert row["worker"] == {"live": LIVE, "dead_pid": DEAD, "old_lease": "elsewhere.example:1"}[how]
            assert row["age_s"] >= 0 and (row["age_s"] > 9 * 3600) == (how == "old_lease")
        assert [r["row_id"] for r in doc["running"]] == sorted(running, key=lambda r: -running[r]["age_s"])
        assert {r["row_id"] for r in doc["stale"]} == {r for r, row in running.items() if row["stale"]}
        live = 1 if any(s[1] == ("running", "live") for s in valid.values()) else 0
        assert doc["live_workers"] == live

        kinds = Counter(expected_kind(s[1][2]) for s in valid.values() if s[1][0] == "failed")
        assert doc["failures"]["by_kind"] == dict(kinds)
        runtimes = [s[1][1] for s in valid.values() if s[1][0] in ("done", "failed")]
        if runtimes:
            assert doc["median_runtime_s"] == statistics.median(runtimes)
        else:
            assert doc["median_runtime_s"] is None
        if doc["finished"] or not runtimes or not live:  # no live worker: nothing is making progress
            assert doc["eta_s"] is None
        else:
            remaining = counts["not_run"] + counts["running"]
            expected = remaining * statistics.median(runtimes) / live
            assert abs(doc["eta_s"] - expected) <= 1e-3 + 1e-9 * expected
        assert doc["jobs"] == []
        assert doc["schema"] == 1 and doc["grid"] == "gen"


def test_status_text_off_a_terminal_keeps_the_eta_on_its_line_however_narrow(tmp_path):
    grid = make_grid(tmp_path, {"name": "a-grid-with-a-rather-long-name", "task": "gridrunner.tasks.toy:noop",
                                "outcomes": ["value"], "grid": {"i": list(range(30))}})
    store = GridStore(grid)
    (path,) = store.shard_paths()
    with store.transaction(path) as shard:
        set_state(shard, 0, ("done", 119.0), time.time())
        set_state(shard, 1, ("running", "live"), time.time())
    env = {**os.environ, "COLUMNS": "40"}
    out = subprocess.run([sys.executable, "-m", "gridrunner.cli", "status", "--grid", str(grid)], env=env,
                         capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    assert first.startswith("a-grid-with-a-rather-long-name (") and first.endswith("; ETA 57m31s"), out


def finishing_grid(tmp_path, rows: int = 6, seconds: float = 0.4) -> Path:
    return make_grid(tmp_path, {"name": "w", "task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"],
                                "grid": {"i": list(range(rows))}, "fixed": {"duration": seconds}})


def test_regression_an_unreadable_shards_reason_is_one_whole_line_off_a_terminal(tmp_path):
    """The reason sat in the shard table's progress cell, which the table wrapped over 8 lines and cut."""
    grid = make_grid(tmp_path, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"],
                                "grid": {"i": list(range(4))}, "max_len": 2})
    store = GridStore(grid)
    path = store.shard_paths()[1]
    path.write_text("i,value\n1,2\n")  # no bookkeeping columns
    env = {**os.environ, "COLUMNS": "60"}
    out = subprocess.run([sys.executable, "-m", "gridrunner.cli", "status", "--grid", str(grid)], env=env,
                         capture_output=True, text=True, check=True).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("unreadable shard ")]
    assert line.startswith(f"unreadable shard {path}:1: missing column 'row_id'"), out
    assert "…" not in out, out


def test_watch_off_a_terminal_prints_each_change_and_ends_when_the_grid_finishes(tmp_path):
    grid = finishing_grid(tmp_path)
    worker = start_worker(grid)
    try:
        watched = subprocess.run([sys.executable, "-m", "gridrunner.cli", "status", "--grid", str(grid), "--watch", "0.2"],
                                 capture_output=True, text=True, timeout=120)
    finally:
        worker.wait(timeout=60)
    assert watched.returncode == 0, watched.stderr
    blocks = watched.stdout.split("\n\n")
    assert len(blocks) >= 2, watched.stdout  # it showed the grid while it ran, then finished
    assert blocks[-1].startswith("w (") and "6/6 finished" in blocks[-1] and "ETA done" in blocks[-1]


def test_watch_json_prints_one_document_per_look_until_finished(tmp_path):
    grid = finishing_grid(tmp_path)
    worker = start_worker(grid)
    try:
        watched = subprocess.run([sys.executable, "-m", "gridrunner.cli", "status", "--grid", str(grid), "--json",
                                  "--watch", "0.2"], capture_output=True, text=True, timeout=120)
    finally:
        worker.wait(timeout=60)
    assert watched.returncode == 0, watched.stderr
    docs = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(docs) >= 2 and docs[-1]["finished"] and docs[-1]["counts"]["done"] == 6
    assert not any(doc["finished"] for doc in docs[:-1])
    finished = [doc["finished_rows"] for doc in docs]
    assert finished == sorted(finished)


def test_watch_on_a_terminal_redraws_in_place_and_ends_when_the_grid_finishes(tmp_path):
    grid = finishing_grid(tmp_path)
    worker = start_worker(grid)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "gridrunner.cli", "status", "--grid", str(grid), "--watch", "0.2"],
                                stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm", "COLUMNS": "300"})
        os.close(slave)
        output = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                output += data
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(master)
        worker.wait(timeout=60)
    text = output.decode(errors="replace")
    assert "\x1b[1A" in text or "\x1b[2K" in text, text  # the cursor went back up: redrawn in place
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "6/6 finished" in plain and "ETA done" in plain


def test_watch_of_a_finished_grid_shows_it_once_and_ends(tmp_path):
    grid = finishing_grid(tmp_path, rows=2, seconds=0)
    assert subprocess.run([sys.executable, "-m", "gridrunner.cli", "work", "--grid", str(grid), "--quiet"]).returncode == 0
    result = CliRunner().invoke(main, ["status", "--grid", str(grid), "--watch"])
    assert result.exit_code == 0
    assert result.output.count("2/2 finished") == 1


def test_a_bad_watch_interval_is_a_usage_error_that_names_the_option(tmp_path):
    grid = finishing_grid(tmp_path, rows=1, seconds=0)
    for value, message in (("0", "0.0 is not in the range x>=0.1."), ("soon", "'soon' is not a valid float range.")):
        result = CliRunner().invoke(main, ["status", "--grid", str(grid), "--watch", value])
        assert result.exit_code == 2, result.output
        assert result.output.endswith(f"Error: Invalid value for '--watch': {message}\n"), result.output
