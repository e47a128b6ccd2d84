"""The store: the CSV contract, hand edits, claims and results, and the lock."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gridrunner.errors import ShardError
from gridrunner.reconcile import ShardHalfWritten
from gridrunner.store import GridStore, Result, Shard, ShardLock, safe_cell
from gridtools import make_grid, wait_until

SPEC = {"task": "gridrunner.tasks.toy:noop", "grid": {"a": [1, 2, 3], "b": ["x", "y"]}, "max_len": 100, "outcomes": ["value"]}


@pytest.fixture
def grid(tmp_path):
    home = tmp_path / "dir with 'quotes' and spaces"
    home.mkdir()
    return make_grid(home, SPEC)


def shard_file(grid):
    return grid / "shards" / "shard-000.csv"


def edit(grid, old, new, count=1):
    path = shard_file(grid)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


# --------------------------------------------------------------------------- hand edits

def lines(grid):
    return shard_file(grid).read_text().splitlines()


@pytest.mark.parametrize("change, line, message", [
    (lambda t: t.replace(",not_run,", ",finished,", 1), 2,
     "unknown status 'finished' (valid: not_run, running, done, failed)"),
    (lambda t: t + t.splitlines()[1] + "\n", 8, "duplicate row_id {id0} (also on line 2)"),
    (lambda t: t.replace("\n1,x,", "\n1,x,", 1) + "7,x,{id0},not_run,0,,,,,,\n", 8,
     "row_id {id0!r} does not match its parameters (their id is {id7}): a parameter was edited under an existing "
     "row_id; clear the row_id cell to make it a new row"),
    (lambda t: t.replace(",not_run,0,,,,,,", ",,0,,,,,,", 1), 2, "unknown status '' (valid: not_run, running, done, failed)"),
    (lambda t: t.replace(",not_run,0,,,,,,", ",done,1,,,,1.0,,abc", 1), 2, "outcome value must be a number or empty, got 'abc'"),
    (lambda t: t.replace(",not_run,0,", ",not_run,two,", 1), 2, "attempts must be a whole number, got 'two'"),
    (lambda t: t.replace(",not_run,0,,,,,,", ",done,1,,,,fast,,", 1), 2, "runtime_s must be a number, got 'fast'"),
])
def test_bad_hand_edits_are_reported_with_line_and_the_rest_keeps_working(grid, change, line, message):
    from gridrunner.spec import row_id_of

    path = shard_file(grid)
    original = path.read_text()
    id0 = original.splitlines()[1].split(",")[2]
    id0 = original.splitlines()[1].split(",")[2]
    path.write_text(change(original).replace("{id0}", id0))
    shard = GridStore(grid).read(path)
    expected = message.format(id0=id0, id7=row_id_of({"a": 7, "b": "x"}))
    assert shard.bad_rows() == [(line, expected)]
    assert len(list(shard.valid())) == len(shard) - 1
    # A worker transaction keeps the bad row verbatim and still claims a good one.
    before_bad = path.read_text().splitlines()[line - 1]
    store = GridStore(grid)
    _, scan = store.claim(path, "h:1", lambda *a: False, 3)
    assert scan.claim is not None
    assert path.read_text().splitlines()[line - 1] == before_bad


@pytest.mark.parametrize("header, message", [
    ("a,b,row_id,status,worker,started_at,finished_at,runtime_s,error,value",
     "{path}:1: missing column 'attempts': after the parameters the header must be row_id, status, attempts, worker, "
     "started_at, finished_at, runtime_s, error"),
    ("a,b,status,attempts,worker,started_at,finished_at,runtime_s,error,value",
     "{path}:1: missing column 'row_id': the header must be the parameters, then row_id, status, attempts, worker, "
     "started_at, finished_at, runtime_s, error, then the outcomes"),
    ("", "{path}: empty file: a shard needs at least its header line"),
])
def test_a_broken_header_makes_the_shard_unreadable(grid, header, message):
    path = shard_file(grid)
    rest = path.read_text().split("\n", 1)[1]
    path.write_text(header + "\n" + rest if header else "")
    with pytest.raises(ShardError) as info:
        GridStore(grid).read(path)
    assert str(info.value) == message.format(path=path)


def test_appended_row_without_id_gets_one_and_runs(grid):
    path = shard_file(grid)
    with open(path, "a") as fh:
        fh.write("9,z,,not_run,0,,,,,,\n")
    store = GridStore(grid)
    shard = store.read(path)
    assert not shard.errors
    ids = [shard.records[i][2] for i in shard.valid()]
    from gridrunner.spec import row_id_of

    assert row_id_of({"a": 9, "b": "z"}) in ids


def test_deleted_rows_stay_deleted(grid):
    path = shard_file(grid)
    kept = path.read_text().splitlines()[:3]
    path.write_text("\n".join(kept) + "\n")
    store = GridStore(grid)
    # The file's last rows are gone: it may be an in-place rewrite paused at a line end, so it is not merged
    # until it has not changed for 5 s (reconcile._cut_at_a_line_end).
    with pytest.raises(ShardHalfWritten, match="ends before its last rows"):
        store.claim(path, "h:1", lambda *a: False, 3)
    old = time.time() - 10
    os.utime(path, (old, old))
    claimed = []
    while True:
        _, scan = store.claim(path, "h:1", lambda *a: False, 3)
        if scan.claim is None:
            break
        claimed.append(scan.claim.row_id)
        store.record(scan.claim, Result("done", {"value": 1.0}))
    assert len(claimed) == 2


# --------------------------------------------------------------------------- claims and results

def test_claim_record_and_stale_worker_cannot_overwrite(grid):
    store = GridStore(grid)
    path = shard_file(grid)
    _, scan = store.claim(path, "h:1", lambda *a: False, 3)
    first = scan.claim
    assert first.attempt == 1
    # The row looks abandoned to a second worker, which reclaims and finishes it.
    _, scan2 = store.claim(path, "h:2", lambda holder, started: holder == "h:1", 3)
    assert scan2.claim.row_id == first.row_id and scan2.claim.attempt == 2
    assert store.record(scan2.claim, Result("done", {"value": 2.0}))
    # The first worker comes back: its result is refused, the newer one stays.
    assert store.record(first, Result("done", {"value": 1.0})) is False
    shard = store.read(path)
    i = shard.find(first.row_id)
    assert shard.row_outcomes(i) == {"value": 2.0}


def test_rows_whose_workers_died_too_often_fail_with_a_reason(grid):
    store = GridStore(grid)
    path = shard_file(grid)
    dead = lambda *a: True  # noqa: E731
    _, scan = store.claim(path, "h:1", lambda *a: False, 2)
    rid = scan.claim.row_id
    _, scan = store.claim(path, "h:2", dead, 2)
    assert scan.claim.row_id == rid and scan.claim.attempt == 2
    _, scan = store.claim(path, "h:3", dead, 2)
    assert scan.gave_up == 1 and scan.claim.row_id != rid
    shard = store.read(path)
    i = shard.find(rid)
    assert shard.cell(i, 1) == "failed"
    assert shard.cell(i, 7).startswith("WorkerDied: the worker died 2 times running this row (last: h:2)")


def test_giving_a_row_back_does_not_count_as_an_attempt(grid):
    store = GridStore(grid)
    _, scan = store.claim(shard_file(grid), "h:1", lambda *a: False, 3)
    assert store.record(scan.claim, Result("not_run"))
    shard = store.read(shard_file(grid))
    i = shard.find(scan.claim.row_id)
    assert (shard.cell(i, 1), shard.cell(i, 2)) == ("not_run", "0")


def test_error_cells_are_one_line_and_never_a_formula():
    assert safe_cell("=HYPERLINK(\"x\")") == "'=HYPERLINK(\"x\")"
    assert safe_cell("-1 + 2") == "'-1 + 2"
    assert safe_cell("ValueError: bad\nsecond line") == "ValueError: bad second line"


def test_split_moves_rows_but_not_running_ones(grid):
    store = GridStore(grid)
    _, scan = store.claim(shard_file(grid), "h:1", lambda *a: False, 3)
    paths = store.split(0, 3)
    assert [p.name for p in paths] == ["shard-000.csv", "shard-001.csv", "shard-002.csv"]
    shards = [store.read(p) for p in paths]
    ids = [s.records[i][2] for s in shards for i in s.valid()]
    assert len(ids) == 6 == len(set(ids))
    assert shards[0].find(scan.claim.row_id) is not None  # its worker will look for it here
    assert store.record(scan.claim, Result("done", {"value": 1.0}))


# --------------------------------------------------------------------------- the lock

def test_lock_excludes_and_breaks_a_dead_holders_lock(tmp_path):
    path = tmp_path / "x.lock"
    a = ShardLock(path)
    a.acquire()
    b = ShardLock(path, timeout_s=0.3)
    from gridrunner.errors import LockTimeout

    with pytest.raises(LockTimeout, match="lock still held by"):
        b.acquire()
    a.release()
    # A lock file left by a dead process on this host is broken at once.
    path.write_text(f"{os.uname().nodename} 999999999 {time.time():.3f} deadbeef\n")
    with ShardLock(path, timeout_s=2) as c:
        assert c.still_held()
    assert not path.exists()


def test_a_lock_that_a_killed_breaker_left_half_broken_is_deleted_once_its_breaker_is_gone(grid):
    """A breaker SIGKILLed between renaming a stale lock and deleting it leaves the renamed file: it goes at
    the next break of that shard's lock and at every worker's start, but never while its breaker lives."""
    path = shard_file(grid)
    host = os.uname().nodename
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def leave(breaker_pid: int, tag: str, host: str = host) -> Path:
        left = Path(f"{path}.lock.broken-{host}-{breaker_pid}-{tag}")
        left.write_text(f"{host} 999999999 {time.time():.3f} deadbeef\n")
        return left

    by_dead, by_live, elsewhere = leave(dead.pid, "aaaaaaaaaaaa"), leave(os.getpid(), "bbbbbbbbbbbb"), \
        leave(4242, "cccccccccccc", host="another-node")
    store = GridStore(grid)
    assert store.recover() == [by_dead]
    assert not by_dead.exists() and by_live.exists() and elsewhere.exists()  # another host's: by age only

    # The next break of a stale lock deletes what dead breakers left beside that shard.
    by_dead = leave(dead.pid, "dddddddddddd")
    Path(f"{path}.lock").write_text(f"{host} {dead.pid} {time.time():.3f} deadbeef\n")
    _, scan = store.claim(path, "h:1", lambda *a: False, 3)
    assert scan.claim is not None
    assert not by_dead.exists() and by_live.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [p.name for p in (by_live, elsewhere)] + [p.name for p in path.parent.glob("shard-*.csv")])
    assert GridStore(grid, lock_stale_s=0.0).recover() == [elsewhere]


def test_killed_lock_holder_in_the_middle_of_a_write_does_not_block_others(grid):
    """SIGKILL a process that holds the shard lock and has half-written its temp file."""
    path = shard_file(grid)
    before = path.read_text()
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from gridrunner.store import ShardLock
        lock = ShardLock({str(path) + '.lock'!r})
        lock.acquire()
        tmp = Path({str(path)!r}).with_name('.shard-000.csv.half.tmp')
        with open(tmp, 'w') as fh:
            fh.write(Path({str(path)!r}).read_text()[:40])
            fh.flush()
        print('holding', flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    proc.kill()
    proc.wait()
    assert Path(str(path) + ".lock").exists()
    store = GridStore(grid)
    start = time.monotonic()
    _, scan = store.claim(path, "h:1", lambda *a: False, 3)
    assert scan.claim is not None and time.monotonic() - start < 5
    assert not Path(str(path) + ".lock").exists()
    text = path.read_text()
    assert text.splitlines()[0] == before.splitlines()[0] and len(text.splitlines()) == len(before.splitlines())
