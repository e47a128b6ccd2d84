"""The watcher: one cheap, CPU-only process per grid that takes over the rows of dead workers.

A worker with nothing left to claim used to linger until the grid's last row ended, so that it could
take over a row whose worker died. In a Slurm array task that holds a GPU, lingering keeps the GPU idle
for as long as the longest row still running. So in Slurm a worker exits when it finds nothing to claim
while a watcher is on duty (:func:`on_duty`), its array task ends, and the watcher keeps the duty the
worker gave up: when rows become claimable again (their worker died, its lease ran out, a reset or a
hand edit), it launches replacement workers for them.

What it looks at, and what that costs in file-system metadata operations on the grid's directory
(measured in ``bench/bench_metadata.py``):

* ``<grid>/.changed``, which every shard transaction touches (:func:`gridrunner.store.mark_changed`):
  one ``stat`` every ``TICK_S``. When it changed, the watcher reads every shard once (:meth:`Watcher.scan`),
  unless as many worker tasks as the array had are still pending or running (then no replacement can
  be due, and a busy grid, whose file changes with every row, costs no reads).
* one shard file in turn, by ``stat``, every ``ROTATE_TICKS`` ticks: an edit made in place by hand does
  not touch the change file, and is seen after at most shards · ``ROTATE_TICKS`` · ``TICK_S`` seconds.
* the holders of the running rows of the last scan, without touching files: a pid on this host
  (``kill 0``), the scheduler's queue (one ``squeue`` every ``QUEUE_S`` while Slurm jobs hold rows), and
  the soonest heartbeat expiry (:class:`gridrunner.worker.Liveness`): when it passes, a scan judges again.
* its own state file ``jobs/watcher.json``: written when its state changes, touched every ``BEAT_S``
  (the workers' sign that a watcher is on duty: fresher than ``STALE_S``).

Idle, that is about 0.7 operations a second whatever the number of shards.

Launching: when a scan finds ``k`` claimable rows, it launches ``min(k, array size − busy) − coming``
workers, where ``busy`` counts the live workers (array tasks) that hold rows and ``coming`` those that
hold none yet (pending or starting array tasks). In
Slurm, :func:`gridrunner.submit.submit_replacement` submits them as one array with the settings of the
grid's latest user submission (profile, resources and flags as they were resolved then), recorded in
``submissions.jsonl`` as ``kind: replacement``; locally the supervisor starts processes. It launches at
most ``MAX_LAUNCH_FACTOR`` × the array size workers in all, so rows that kill every worker cannot make
it submit forever.

It ends when the grid is finished (no valid row ``not_run`` or ``running``), when it is stopped
(``gridrunner cancel``, SIGTERM), at its time limit (in Slurm its own job's, the profile's
``watcher.time_min``), or at the launch cap. It writes its final state on the way out; a watcher whose
state file is no longer fresh (killed) counts as gone. Without a watcher on duty, workers linger as
they always did.

Where compute nodes may not run ``sbatch`` (no command, or the controller refuses them), the watcher
finds out at its start with ``sbatch --test-only``, writes the state ``no-sbatch`` with the reason,
logs a warning and ends: the workers then linger, as without a watcher.
"""
from __future__ import annotations

import getpass
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gridrunner.store import CHANGED_FILE, HOST, STARTED, STATUS, WORKER, GridStore, now_iso, pid_alive

log = logging.getLogger("gridrunner.watcher")

STATE_FILE = "watcher.json"
#: How often the change file is looked at.
TICK_S = 2.0
#: Every this many ticks, one more shard file is looked at (hand edits made in place).
ROTATE_TICKS = 4
#: How often the state file is touched while on duty.
BEAT_S = 15.0
#: A state file older than this means its watcher is gone (killed without writing its end).
STALE_S = 60.0
#: How often the scheduler's queue is asked while Slurm jobs hold running rows.
QUEUE_S = 5.0
#: A launched worker that holds no row yet counts as coming for this long at most.
STARTING_S = 120.0
#: At most this many times the array size workers are launched in all.
MAX_LAUNCH_FACTOR = 10

# States of a job in squeue after which its worker will not claim a row (it is ending, or requeued).
_NOT_COMING = {"COMPLETING", "CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}


def state_path(grid_dir: Path) -> Path:
    return Path(grid_dir) / "jobs" / STATE_FILE


def read_state(grid_dir: Path) -> dict | None:
    """The watcher's state file with its age (``age_s``), or None if there is none."""
    path = state_path(grid_dir)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.loads(fh.read())
            age = time.time() - os.fstat(fh.fileno()).st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    data["age_s"] = age
    return data


def on_duty(grid_dir: Path) -> bool:
    """True if a watcher is watching this grid now (its state says so and is fresh)."""
    state = read_state(grid_dir)
    return bool(state) and state.get("state") == "watching" and state["age_s"] < STALE_S


def summary(grid_dir: Path) -> dict | None:
    """What ``status`` shows of the watcher (JSON-ready): its state, job, replacements; None if none ran."""
    state = read_state(grid_dir)
    if state is None:
        return None
    fresh = state.get("state") != "watching" or state["age_s"] < STALE_S
    return {"state": state.get("state") if fresh else "gone", "job": state.get("job"), "host": state.get("host"),
            "pid": state.get("pid"), "since": state.get("since"), "launched": state.get("launched", 0),
            "reason": state.get("reason") or ("its state file is stale: it was killed" if not fresh else "")}


def live_watcher(grid_dir: Path) -> str | None:
    """The Slurm job of the grid's watcher if it is pending or running (so a new submit adds none)."""
    from gridrunner.submit import submissions

    jobs = [job for e in submissions(grid_dir) if e.get("kind") == "watcher" and e.get("executor") == "slurm"
            for job in e.get("job_ids", [])]
    if not jobs or not shutil.which("squeue"):
        return None
    queue = SlurmLauncher(Path(grid_dir)).queue() or {}
    live = [job for job in jobs if job in queue and queue[job] not in _NOT_COMING]
    return live[-1] if live else None


def write_state(grid_dir: Path, **fields) -> None:
    path = state_path(grid_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(fields) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def sbatch_refusal(settings: dict) -> str | None:
    """Why this node cannot submit jobs (None if it can): ``sbatch --test-only`` with the grid's partition."""
    if not shutil.which("sbatch"):
        return "sbatch is not on this node's PATH"
    command = ["sbatch", "--test-only", "--wrap=true", "--time=1"]
    for key in ("partition", "account", "qos"):
        if settings.get(key):
            command.append(f"--{key}={settings[key]}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"sbatch --test-only failed: {err}"
    if done.returncode != 0:
        return f"sbatch --test-only exited {done.returncode}: {' '.join((done.stderr or done.stdout).split())}"
    return None


# --------------------------------------------------------------------------- launchers

class SlurmLauncher:
    """Replacement array tasks through :func:`gridrunner.submit.submit_replacement`; the queue through squeue."""

    def __init__(self, grid_dir: Path, own_job: str | None = None):
        self.grid_dir = Path(grid_dir)
        self.own_job = own_job
        self.launched: list[str] = []
        self._jobs: tuple = (None, [])  # (read yet, the worker jobs of submissions.jsonl)

    def queue(self) -> dict[str, str] | None:
        """State of each of this user's jobs in slurmctld (array tasks one by one); None if squeue failed."""
        try:
            out = subprocess.run(["squeue", "--noheader", "--array", "--format=%i %T", f"--user={getpass.getuser()}"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError) as err:
            log.warning("squeue failed (%s); asking again later", err)
            return None
        states = {}
        for line in out.splitlines():
            job, _, state = line.partition(" ")
            states[job] = state.strip()
        return states

    def worker_jobs(self) -> list[tuple[str, float]]:
        """(job id, submitted at) of every worker task of the grid, user's and replacements; the file is read
        again only when its ``stat`` changed."""
        if self._jobs[0] is None:
            self.refresh()
        return self._jobs[1]

    def refresh(self) -> None:
        """Read ``submissions.jsonl`` again (at every scan and launch, not every tick)."""
        from gridrunner.store import parse_iso
        from gridrunner.submit import submissions

        jobs = [(job, parse_iso(e.get("time", "")) or 0.0) for e in submissions(self.grid_dir)
                if e.get("executor") == "slurm" and e.get("kind", "workers") != "watcher" for job in e.get("job_ids", [])]
        self._jobs = (True, jobs)

    def live(self, queue: dict[str, str] | None) -> int | None:
        """How many of the grid's worker tasks are pending or running (None if the queue is unknown)."""
        return None if queue is None else self.coming(set(), queue)

    def coming(self, holders: set[str], queue: dict[str, str] | None) -> int:
        """Worker tasks that may still claim a row: listed in the queue, not ending, holding no row."""
        if queue is None:
            return 0
        now = time.time()
        n = 0
        for job, submitted in self.worker_jobs():
            state = queue.get(job)
            if state is None:
                # A pending array's tasks may be listed as one range until they start.
                array = job.split("_")[0]
                if not any(key.startswith(f"{array}_[") for key in queue) or now - submitted > STARTING_S * 10:
                    continue
                state = "PENDING"
            if state in _NOT_COMING or job in holders:
                continue
            n += 1
        return n

    def launch(self, n: int, homes: list[int]) -> list[str]:
        from gridrunner.submit import submit_replacement

        ids = submit_replacement(self.grid_dir, n, homes, by=self.own_job)
        self.launched += ids
        self.refresh()
        return ids

    def cancel(self, ids: list[str]) -> None:
        if ids and shutil.which("scancel"):
            subprocess.run(["scancel", *sorted({j.split("_")[0] for j in ids})], check=False)


class LocalLauncher:
    """The local supervisor's side: the watcher queues home shards, the supervisor's loop starts the workers."""

    def __init__(self, homes: list[int]):
        self._lock = threading.Lock()
        self._to_start = list(homes)
        self._pids: set[int] = set()

    def next_home(self) -> int | None:
        with self._lock:
            return self._to_start.pop(0) if self._to_start else None

    def waiting(self) -> int:
        with self._lock:
            return len(self._to_start)

    def running(self, pids: set[int]) -> None:
        with self._lock:
            self._pids = set(pids)

    def queue(self) -> None:
        return None

    def refresh(self) -> None:
        pass

    def live(self, queue) -> int:
        with self._lock:
            return len(self._to_start) + len(self._pids)

    def coming(self, holders: set[str], queue) -> int:
        from gridrunner.worker import parse_worker_id

        held = {parse_worker_id(h)[1] for h in holders if ":" in h and parse_worker_id(h)[0] == HOST}
        with self._lock:
            return len(self._to_start) + len(self._pids - held)

    def launch(self, n: int, homes: list[int]) -> list[str]:
        with self._lock:
            new = [homes[i % len(homes)] for i in range(n)]
            self._to_start += new
        return [f"local worker on shard {h}" for h in new]

    def cancel(self, ids: list[str]) -> None:
        with self._lock:
            self._to_start.clear()


@dataclass
class Scan:
    """One read of every shard."""

    not_run: int = 0
    reclaimable: int = 0
    running: int = 0
    finished: bool = False
    holders: set = field(default_factory=set)  # workers holding running rows, judged alive
    homes: list = field(default_factory=list)  # shard indexes with claimable rows, most first
    next_expiry: float = math.inf
    started: dict = field(default_factory=dict)  # holder -> the start of its row

    @property
    def claimable(self) -> int:
        return self.not_run + self.reclaimable


class Watcher:
    """Watches one grid and launches workers for rows that became claimable; see the module docstring.

    ``launcher`` has ``coming(holders, queue) -> int``, ``launch(n, homes) -> ids``, ``queue()`` and
    ``cancel(ids)``: :class:`SlurmLauncher`, or the local supervisor's.
    """

    def __init__(self, grid_dir: str | Path, array_size: int, launcher, lease_s: float | None = None,
                 job: str | None = None, tick_s: float = TICK_S, dead_jobs: Callable | None = None):
        from gridrunner.grid import saved_spec

        self.grid_dir = Path(grid_dir)
        self.store = GridStore(self.grid_dir)
        self.spec = saved_spec(self.grid_dir)
        self.array_size = max(int(array_size), 1)
        self.launcher = launcher
        self.lease_s = float(lease_s or self.spec.lease_s)
        self.job = job
        self.tick_s = tick_s
        self.launched = 0
        self.scans = 0
        self._stop = threading.Event()
        self._queue: dict[str, str] | None = None
        self._queue_at = -math.inf
        self._queue_at_epoch = float("-inf")
        self._hb_expiry = math.inf  # the soonest lease expiry of the last scan's holders, as last seen
        self._since = now_iso()

    def request_stop(self, *_args) -> None:
        self._stop.set()

    # ---- looking

    def _dead_jobs(self):
        from gridrunner.submit import DeadJobs

        queue = self._queue or {}
        if self._queue is None:
            return DeadJobs((), float("-inf"))
        ours = {job for job, _ in getattr(self.launcher, "worker_jobs", lambda: [])()}
        # Ended (no longer listed), or requeued (pending again): the process that claimed the row is gone.
        dead = {job for job in ours if job not in queue or queue[job] in ("PENDING", "REQUEUED")}
        return DeadJobs(dead, self._queue_at_epoch)

    def _ask_queue(self) -> None:
        self._queue_at_epoch = time.time()
        self._queue = self.launcher.queue()
        self._queue_at = time.monotonic()

    def scan(self) -> Scan:
        """Read every shard once: counts, the live holders, the shards with claimable rows."""
        from gridrunner.errors import ShardError
        from gridrunner.worker import Liveness, make_worker_id

        self.scans += 1
        self.launcher.refresh()
        judge = Liveness(self.grid_dir, self.lease_s, me=make_worker_id(pid=0), dead_jobs=self._dead_jobs)
        out = Scan()
        per_shard = []
        bad_rows = 0
        for path in self.store.shard_paths():
            try:
                shard = self.store.read(path)
            except (ShardError, FileNotFoundError, OSError):
                continue
            bad_rows += len(shard.errors)
            p = shard.n_params
            open_rows = 0
            for i in shard.valid():
                fields = shard.records[i]
                status = fields[p + STATUS]
                if status == "not_run":
                    out.not_run += 1
                    open_rows += 1
                elif status == "running":
                    holder = fields[p + WORKER]
                    if judge(holder, fields[p + STARTED]):
                        out.reclaimable += 1
                        open_rows += 1
                    else:
                        out.running += 1
                        out.holders.add(holder)
            if open_rows:
                per_shard.append((open_rows, path))
        out.finished = out.not_run == 0 and out.running == 0 and out.reclaimable == 0
        out.next_expiry = judge.next_expiry
        out.started = dict(judge.alive)
        from gridrunner.store import shard_index

        out.homes = [shard_index(path) for _, path in sorted(per_shard, key=lambda t: -t[0])]
        return out

    def _holder_jobs(self, holders: set[str]) -> set[str]:
        from gridrunner.worker import parse_worker_id

        return {parse_worker_id(h)[2] for h in holders if parse_worker_id(h)[2]}

    def _holder_gone(self, scan: Scan) -> bool:
        """Whether a holder of the last scan may be gone, looking at no shard: a pid on this host (no file),
        a job that the latest queue (``squeue``, every ``QUEUE_S``) no longer lists or lists as pending
        again, and, once the soonest lease may have run out, the holders' heartbeat files (one ``stat``
        each, about once a lease)."""
        from gridrunner.store import parse_iso
        from gridrunner.worker import JOB_STATE_MARGIN_S, heartbeat_path, parse_worker_id

        for holder in scan.holders:
            host, pid, job = parse_worker_id(holder)
            if job is None and host == HOST and not pid_alive(pid):
                return True
            if job and self._queue is not None and (job not in self._queue or self._queue[job] in ("PENDING", "REQUEUED")):
                claimed = parse_iso(scan.started.get(holder, "")) or 0.0
                if claimed + JOB_STATE_MARGIN_S < self._queue_at_epoch:  # a claim after the question waits for the next
                    return True
        if time.time() < self._hb_expiry:
            return False
        soonest = math.inf
        for holder in scan.holders:
            try:
                beat = os.stat(heartbeat_path(self.grid_dir, holder)).st_mtime
            except OSError:
                return True
            if time.time() - beat > self.lease_s:
                return True
            soonest = min(soonest, beat + self.lease_s)
        self._hb_expiry = soonest
        return False

    # ---- the loop

    def run(self) -> str:
        """Watch until the grid is finished (or a stop, or the launch cap); returns why it ended."""
        self._state("watching")
        reason = "stopped"
        try:
            reason = self._loop()
        finally:
            self._state("finished" if reason == "finished" else "ended", reason=reason)
        log.info("watcher ends: %s (%d scans, %d workers launched)", reason, self.scans, self.launched)
        return reason

    def _state(self, state: str, reason: str = "") -> None:
        try:
            write_state(self.grid_dir, state=state, job=self.job, host=HOST, pid=os.getpid(), since=self._since,
                        launched=self.launched, reason=reason, time=now_iso())
        except OSError as err:
            log.warning("cannot write the watcher's state file: %s", err)

    def _loop(self) -> str:
        changed_file = self.grid_dir / CHANGED_FILE
        last_change = None
        last_live = None
        beat_at = time.monotonic()
        rotate = 0
        ticks = 0
        seen_shards: dict[Path, tuple] = {}  # signatures seen by the rotation since the last scan
        paths: list[Path] = []
        scan = None
        while not self._stop.is_set():
            try:
                st = os.stat(changed_file)
                signature = (st.st_mtime_ns, st.st_ino)
            except OSError:
                signature = None
            changed = signature != last_change
            ticks += 1
            if not changed and ticks % ROTATE_TICKS == 0 and paths:
                path = paths[rotate % len(paths)]
                rotate += 1
                try:
                    st = os.stat(path)
                    sig = (st.st_mtime_ns, st.st_size, st.st_ino)
                except OSError:
                    sig = None
                changed = path in seen_shards and seen_shards[path] != sig  # edited in place since the last look
                seen_shards[path] = sig
            if time.monotonic() - self._queue_at > QUEUE_S:
                self._ask_queue()
            live = self.launcher.live(self._queue)
            gone = scan is not None and self._holder_gone(scan)
            dropped = live is not None and last_live is not None and live < last_live
            # A change while as many worker tasks as the array had still run or wait cannot call for a
            # replacement: read no shard then (a busy grid's change file changes with every row).
            crowded = live is not None and live >= self.array_size
            if scan is None or gone or dropped or (changed and not crowded):
                scan = self.scan()
                last_change, last_live = signature, live
                self._hb_expiry = scan.next_expiry
                paths = self.store.shard_paths()
                seen_shards = {}
                if scan.finished:
                    return "finished"
                if scan.claimable:
                    reason = self._launch(scan)
                    if reason:
                        return reason
            elif changed:
                last_change = signature
            if live is not None and (last_live is None or live > last_live):
                last_live = live  # launched tasks entered the queue
            if time.monotonic() - beat_at >= BEAT_S:
                beat_at = time.monotonic()
                try:
                    os.utime(state_path(self.grid_dir))
                except OSError:
                    self._state("watching")
            self._stop.wait(self.tick_s)
        return "stopped"

    def _launch(self, scan: Scan) -> str | None:
        jobs = self._holder_jobs(scan.holders)
        coming = self.launcher.coming(jobs | scan.holders, self._queue)
        busy = len(jobs) if jobs else len(scan.holders)
        # As many as there are open rows, with no more workers live than the array had.
        want = min(scan.claimable, self.array_size - busy) - coming
        if want <= 0:
            return None
        cap = MAX_LAUNCH_FACTOR * self.array_size
        if self.launched >= cap:
            log.warning("the watcher launched %d workers in all, its cap; rows still open: %d", self.launched,
                        scan.claimable)
            return f"launched {self.launched} workers, the cap (MAX_LAUNCH_FACTOR × array size)"
        want = min(want, cap - self.launched)
        try:
            ids = self.launcher.launch(want, scan.homes or [0])
        except Exception as err:  # noqa: BLE001 - a refused sbatch must leave the workers to linger
            log.warning("the watcher could not launch workers (%s); workers linger from now on", err)
            return f"could not launch workers: {' '.join(str(err).split())}"
        self.launched += want
        log.info("%d claimable row(s), %d worker(s) coming: launched %d (%s)", scan.claimable, coming, want,
                 ", ".join(ids[:3]) + (" …" if len(ids) > 3 else ""))
        self._state("watching")
        if self._stop.is_set():  # cancelled while submitting: take back what was just launched
            self.launcher.cancel(ids)
        # Their tasks are pending now: ask the queue again before counting them.
        self._queue_at = -math.inf
        return None


# --------------------------------------------------------------------------- the Slurm job

class WatcherJob:
    """The watcher as a small Slurm job of its own (submitit): 1 CPU, no GPU, its own time limit."""

    def __init__(self, grid_dir: str, array_size: int, settings: dict, lease_s: float | None = None):
        self.grid_dir = str(grid_dir)
        self.array_size = array_size
        self.settings = dict(settings)
        self.lease_s = lease_s

    def __call__(self) -> dict:
        from gridrunner.submit import _log_to_stderr
        from gridrunner.worker import current_job_id

        _log_to_stderr()
        job = current_job_id()
        refusal = sbatch_refusal(self.settings)
        if refusal is not None:
            log.warning("this node cannot submit jobs (%s): no watcher; workers linger to take over dead "
                        "workers' rows, as without one", refusal)
            write_state(Path(self.grid_dir), state="no-sbatch", job=job, host=HOST, pid=os.getpid(),
                        since=now_iso(), launched=0, reason=refusal, time=now_iso())
            return {"ended": "no-sbatch", "reason": refusal}
        watcher = Watcher(self.grid_dir, self.array_size, SlurmLauncher(Path(self.grid_dir), job), self.lease_s,
                          job=job)
        signal.signal(signal.SIGTERM, watcher.request_stop)
        signal.signal(signal.SIGUSR2, watcher.request_stop)  # its time limit: end, and say so
        reason = watcher.run()
        return {"ended": reason, "launched": watcher.launched, "scans": watcher.scans}


def _main(argv: list[str]) -> int:
    """``python -m gridrunner.watcher GRID ARRAY_SIZE``: watch a grid in the foreground (Slurm launcher)."""
    if len(argv) != 2:
        print("usage: python -m gridrunner.watcher GRID ARRAY_SIZE", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    watcher = Watcher(argv[0], int(argv[1]), SlurmLauncher(Path(argv[0])))
    signal.signal(signal.SIGTERM, watcher.request_stop)
    print(watcher.run())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
