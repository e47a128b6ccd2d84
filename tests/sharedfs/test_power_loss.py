"""Power loss at random moments of a running grid, then a restart: no recorded result is lost.

One client in nfsmodel's power-loss mode (as LazyFS): at the crash, every write that was not fsynced
and every directory change (a new name, a rename) whose directory was not fsynced after it is dropped.
A result is *recorded* when the worker has logged it ("<row_id> <shard> done in ..."), which it does
only after the transaction that wrote it returned. It is lost if, after the restarts, the row's final
result comes from an execution that started after that crash (the executions log, outside the
filesystem, orders them). The store may restore a shard from its journal after the crash: what counts
is the state the restarted workers leave.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest

from gridtools import make_grid, wait_until, worker_cmd
from reliability_tools import executions, leftovers, rows

DONE = re.compile(r"^\S+ ([0-9a-f]{12}) shard-\d+\.csv done", re.M)


@pytest.mark.slow
def test_a_power_loss_at_a_random_moment_never_loses_a_recorded_result(nfs, project, reaper, tmp_path):
    side = project / "executions.log"
    n_rows, n_crashes = 150, 3
    # The grid is made on the server before the first mount, so everything in it is durable.
    grid = make_grid(nfs.server, {"task": "reliability_tasks:run", "outcomes": ["token", "value"],
                                  "grid": {"i": list(range(n_rows))}, "max_len": 50, "lease_s": 5,
                                  "fixed": {"record_to": str(side), "duration": 0.1}})
    relative = grid.relative_to(nfs.server)
    control = tmp_path / "control"
    control.mkdir()
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    print(f"power-loss seed {seed}")
    recorded: dict[str, int] = {}  # row id -> lines of the executions log at the crash after its record
    for crash in range(n_crashes + 1):
        mount = nfs.mount(f"boot{crash}", entry_ttl=1.0, attr_ttl=1.0, power_loss=control)
        workers = []
        for k in range(3):
            log = project / f"boot{crash}-worker{k}.log"
            with open(log, "w") as fh:
                workers.append((reaper(subprocess.Popen([c for c in worker_cmd(mount / relative, "--shard", str(k)) if c != "--quiet"],
                                                        stdout=fh, stderr=fh)), log))
        if crash == n_crashes:  # the last boot runs the grid to its end
            for proc, log in workers:
                assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
            nfs.get(mount).unmount()
            break
        # The power goes at a random moment after the first result of this boot was recorded.
        assert wait_until(lambda: any(DONE.search(log.read_text()) for _, log in workers), 120), \
            "no result was recorded in this boot: " + " | ".join(log.read_text()[-500:] for _, log in workers)
        # At most about 1 s of 0.1 s rows per worker and boot: the three crashes never reach the grid's end
        # (3 workers x 3 boots x ~12 rows < 150), so every boot has rows left to record.
        time.sleep(rng.uniform(0.0, 1.0))
        for proc, _ in workers:  # every process dies at once
            proc.send_signal(signal.SIGKILL)
        for proc, _ in workers:
            proc.wait()
        before = len(recorded)
        for _, log in workers:
            for row_id in DONE.findall(log.read_text()):
                recorded.setdefault(row_id, len(side.read_text().splitlines()))  # executions started so far
        assert len(recorded) > before
        nfs.get(mount).unmount(power_loss=True)
    final = rows(nfs.server / relative)
    assert {r["status"] for r in final.values()} == {"done"} and len(final) == n_rows
    runs = executions(side)
    started_at = {int(line.split()[2]): k for k, line in enumerate(side.read_text().splitlines())
                  if line.startswith("start ")}
    lost = []
    for row_id, row in final.items():
        token = int(float(row["token"]))
        run = runs.get(token)
        assert run is not None and run.row_id == row_id and run.finished
        if row_id in recorded and started_at[token] >= recorded[row_id]:
            lost.append(row_id)  # recorded before a crash, yet its final result is from a run after it
    assert not lost, f"{len(lost)} of {len(recorded)} recorded results were lost and the rows ran again: {lost[:5]}"
    assert leftovers(nfs.server / relative) == [], "a lock or temporary file outlived the restart"
    print(f"power loss: {n_crashes} crashes, {len(recorded)} results recorded before them, none lost")
