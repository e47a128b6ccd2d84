"""Regressions for NFS's stale handles and its cache of negative lookups.

ESTALE: client b reads slowly (``read_delay``), so client a replaces the shard between b's open and b's
read, and that read fails with ``ESTALE`` as it does on NFSv3. Negative lookups: what NFS's cache of negative lookups (``lookupcache=all``, the default) did to gridrunner.

Client b first looks for a name that does not exist yet, so it caches "no such file"; then client a
creates it. Until b's entry expires, b's ``stat`` says the name is missing while ``mkdir`` and
``O_EXCL`` (which go to the server) say it exists.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

from gridrunner.store import HOST
from gridtools import make_grid, worker_cmd
from reliability_tools import rows


def test_a_worker_starts_on_a_client_that_caches_the_workers_directory_as_missing(nfs, project):
    a = nfs.mount("a", entry_ttl=10.0, attr_ttl=10.0)
    b = nfs.mount("b", entry_ttl=10.0, attr_ttl=10.0)
    grid_a = make_grid(a, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "grid": {"i": [0, 1]}})
    grid_b = b / grid_a.relative_to(a)
    assert not (grid_b / "workers").exists()  # b caches the negative lookup
    (grid_a / "workers").mkdir()  # a worker on client a made it
    assert not (grid_b / "workers").exists(), "b should still cache the negative lookup"
    result = subprocess.run(worker_cmd(grid_b), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r["status"] for r in rows(grid_a).values()} == {"done"}


def test_a_lock_that_the_lookup_cache_hides_is_waited_for_without_spinning(nfs, project):
    a = nfs.mount("a", entry_ttl=10.0, attr_ttl=10.0)
    b = nfs.mount("b", entry_ttl=10.0, attr_ttl=10.0)
    lock_b = b / "shard-000.csv.lock"
    assert not lock_b.exists()  # b caches "no such lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (a / "shard-000.csv.lock").write_text(f"{HOST} {holder.pid} {time.time():.3f} token\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        waiter = subprocess.Popen([sys.executable, "-c", "import sys; from gridrunner.store import ShardLock; "
                                   "lock = ShardLock(sys.argv[1]); lock.acquire(); lock.release()", str(lock_b)])
        time.sleep(3.0)
        assert waiter.poll() is None, "the waiter took a lock that a live holder has"
        os.unlink(a / "shard-000.csv.lock")  # the holder releases it
        assert waiter.wait(timeout=60) == 0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        holder.kill()
        holder.wait()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # Interpreter start and imports take about half a second of CPU; a spinning waiter burns every second.
    assert cpu < 1.5, f"the waiter used {cpu:.2f} s of CPU waiting about 3 s: it spun"


def test_status_load_and_glance_retry_estale_while_another_client_replaces_the_shard(nfs, project, monkeypatch):
    import errno
    import threading

    from gridrunner import atomic, store as store_module
    from gridrunner.frame import load
    from gridrunner.status import grid_status
    from gridrunner.store import GridStore

    a = nfs.mount("a", entry_ttl=1.0, attr_ttl=1.0)
    b = nfs.mount("b", entry_ttl=1.0, attr_ttl=1.0, read_delay=0.03)
    grid_a = make_grid(a, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "grid": {"i": list(range(20))}})
    grid_b = b / grid_a.relative_to(a)
    shard_a = next((grid_a / "shards").glob("shard-*.csv"))
    stop = threading.Event()
    replaced = []

    def replace_again_and_again():
        store = GridStore(grid_a)
        while not stop.is_set():
            with store.transaction(shard_a) as shard:
                shard.dirty = True  # the same rows, a new file
            replaced.append(1)
            # b's read waits 30 ms: a replacement every 30 ms would meet every read, so that b could
            # never read the shard at all (a CI run saw it). Every 50 ms or more, at most 60% do.
            time.sleep(0.05)

    met = []  # the ESTALEs that b's reads met and retried: the test is void if there were none

    def counting(err, start, retry=atomic.estale_again):
        met.append(err.errno == errno.ESTALE)
        return retry(err, start)

    monkeypatch.setattr(atomic, "estale_again", counting)
    monkeypatch.setattr(store_module, "estale_again", counting)
    writer = threading.Thread(target=replace_again_and_again)
    writer.start()
    try:
        store_b = GridStore(grid_b)
        shard_b = grid_b / "shards" / shard_a.name
        deadline = time.monotonic() + 60
        while (len(replaced) <= 10 or sum(met) < 3) and time.monotonic() < deadline:
            status = grid_status(grid_b)
            assert [s.error for s in status.shards] == [None]
            assert sum(status.shards[0].counts.values()) == 20
            frame = load(grid_b)
            assert len(frame) == 20 and frame.attrs["bad_rows"] == []
            assert store_b.glance(shard_b) == (True, False)
    finally:
        stop.set()
        writer.join()
    assert len(replaced) > 10 and sum(met) >= 3


COUNT = """
import sys
from pathlib import Path
from gridrunner.store import ShardLock, write_atomic
directory, n = Path(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    with ShardLock(directory / "counter.lock") as lock:
        value = int((directory / "counter").read_text())
        write_atomic(directory / "counter", f"{value + 1}\\n", lock)
"""


def test_the_lock_excludes_across_clients_while_reads_of_it_meet_estale(nfs, project):
    # b reads slowly, so a's holders release the lock (unlink it) between b's open of the lock file and
    # its read: b's look at the holder fails with ESTALE, which must mean "look again", not an error.
    a = nfs.mount("a", entry_ttl=1.0, attr_ttl=1.0)
    b = nfs.mount("b", entry_ttl=1.0, attr_ttl=1.0, read_delay=0.01)
    (a / "counter").write_text("0\n")
    procs = [subprocess.Popen([sys.executable, "-c", COUNT, str(client), "40"], stderr=subprocess.PIPE, text=True)
             for client in (a, b, a, b)]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, "\n".join(e[-1500:] for e in errors)
    assert (a / "counter").read_text() == "160\n"
    assert sorted(p.name for p in a.iterdir()) == ["counter"]
