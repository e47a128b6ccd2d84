"""The worker: claim a row, run it, record its result, and beat a heartbeat all the while.

Who owns a ``running`` row: the worker named in its ``worker`` cell (``host:pid`` or
``host:pid:jobid``), for as long as that worker is alive. It is judged dead, and the row claimable
again, when any of these holds:

* it ran on this host and its pid is gone;
* the scheduler says its job ended (``dead_jobs``, filled in by submission);
* its heartbeat file ``workers/<id>.hb`` has not been touched for longer than the lease.

Heartbeats never rewrite a shard: a thread touches the worker's own file every quarter lease. A
heartbeat's age is read through an ``open`` and ``fstat``: on NFS the open fetches the attributes from
the server (close-to-open), where a ``stat`` may answer with a cached, older mtime. On a ``nocto``
mount that does not hold, and a worker refuses a lease too short for the attribute cache
(:mod:`gridrunner.nfs`).

With nothing left to claim while other workers run rows, a worker either exits or *lingers* to take
over if they die (``linger``): ``True`` (``gridrunner work``, local workers), ``False``, or ``"watched"``
(Slurm array tasks): linger only while no watcher is on duty for the grid (:mod:`gridrunner.watcher`),
which takes over dead workers' rows instead, so an idle task releases its GPU. A lingering worker
``stat``s the grid's change file (``<grid>/.changed``, touched by every shard transaction) rather than
every shard, and looks at the shards again when it changed, when a holder's pid or job is gone, or
when a holder's lease may have run out.

Each row runs in a fresh child process by default, so a segfault, an ``os._exit`` or an out-of-memory
kill costs the row, not the worker, and TensorFlow's GPU memory goes back at the end of every row. The
worker's small spawner process (:mod:`gridrunner.spawner`) forks it, which is cheaper than forking the
worker; it dies with the worker, and the row's process with it (``PR_SET_PDEATHSIG``), so a killed
worker never leaves a row running behind its back. The row's process keeps what its task returned in the
row's outbox (:mod:`gridrunner.outbox`) before handing it over, so a worker killed between a row's end
and its record costs nothing: the worker that reclaims the row records that result. ``inline=True`` runs
the task in the worker itself, for debugging.

Stopping: SIGTERM, SIGINT (Ctrl-C), SIGUSR2 or :meth:`Worker.request_stop` make ``ctx.should_stop()``
true in the running row (the child gets SIGUSR1). The task saves a checkpoint and raises
:class:`gridrunner.Interrupted`, or, after ``grace_s``, the child is killed. Either way the row goes
back to ``not_run`` with its checkpoint kept, and the worker claims nothing more. A result that
arrives for a row that is no longer this worker's (it was reclaimed after a stall, or reset) is never
written to the shard: it is saved as ``rows/<id>/stale-result-<worker>.json`` and reported.

Rows the grid stops for good, each ending ``failed`` (never given back): a ``prune:`` rule that matched a
logged record (:mod:`gridrunner.prune`: decided in the row's own process, which tells the worker in its
payload), a hung row (no ``ctx.log`` for ``hang_after_min``: killed at once) and a runaway row (past
``row_time_limit_min``: asked to stop like a worker stop, killed after ``grace_s``, its checkpoint kept for
a ``reset``). The last two are watched by :mod:`gridrunner.watchdog`, only in grids that set them.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from gridrunner import outbox
from gridrunner.atomic import why_failed
from gridrunner.context import Context, seed_from_row_id
from gridrunner.errors import ExprError, GridError
from gridrunner.grid import read_resolved, saved_spec
from gridrunner.nfs import lease_problem
from gridrunner.prune import parse_payload
from gridrunner.spawner import Spawner, SpawnerDied, call_task, set_row_environment
from gridrunner.reconcile import ShardHalfWritten
from gridrunner.spec import task_params
from gridrunner.store import (CHANGED_FILE, HOST, Claim, ClaimScan, GridStore, Result, StoreWriteError, parse_iso,
                              pid_alive, remove_orphaned_breaks, shard_index)

log = logging.getLogger("gridrunner.worker")

WORKERS_DIR = "workers"
TRACEBACK_FILE = "traceback.txt"
DEFAULT_GRACE_S = 60.0
#: A scheduler's "job ended" counts for rows claimed at least this long before it was asked.
JOB_STATE_MARGIN_S = 2.0
#: How often a worker lists the shard files again (new ones come from ``make`` and ``split``).
RELIST_S = 5.0
#: A worker with nothing to claim while others run rows looks again after this, then backs off.
LINGER_FIRST_POLL_S = 0.01
#: A lingering worker looks again this long after a running row's lease runs out (it must have run out).
EXPIRY_MARGIN_S = 0.01


def current_job_id() -> str | None:
    """The Slurm job this process runs in (``arrayjob_task`` for array tasks), if any."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def make_worker_id(pid: int | None = None) -> str:
    job = current_job_id()
    base = f"{HOST}:{os.getpid() if pid is None else pid}"
    return f"{base}:{job}" if job else base


def parse_worker_id(worker: str) -> tuple[str, int, str | None]:
    parts = worker.split(":")
    try:
        pid = int(parts[1])
    except (IndexError, ValueError):
        pid = -1
    return parts[0], pid, (parts[2] if len(parts) > 2 and parts[2] else None)


def heartbeat_path(grid_dir: Path, worker: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker)
    return Path(grid_dir) / WORKERS_DIR / f"{safe}.hb"


class Heartbeat:
    """A daemon thread that touches this worker's heartbeat file every ``lease_s / 4`` seconds."""

    def __init__(self, grid_dir: Path, worker: str, lease_s: float):
        self.path = heartbeat_path(grid_dir, worker)
        self.interval = max(lease_s / 4.0, 0.05)
        self.info = {"worker": worker, "host": HOST, "pid": os.getpid(), "lease_s": lease_s, "job": current_job_id()}
        self._stop = threading.Event()
        self._written = False
        self._thread = threading.Thread(target=self._beat, name="gridrunner-heartbeat", daemon=True)

    def start(self) -> None:
        """Write the heartbeat file and start beating; a GridError if the file cannot be written (a read-only
        grid, a full disk): the worker has claimed nothing yet, and without a heartbeat it must not."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.info) + "\n", encoding="utf-8")
        except OSError as err:
            raise GridError(f"{self.path.parent}: cannot write this worker's heartbeat file ({why_failed(err)}); "
                            f"no row was claimed") from None
        self._written = True
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    self.path.write_text(json.dumps(self.info) + "\n", encoding="utf-8")
            except OSError as err:  # a full or flaky disk must not kill the worker; the lease decides
                log.warning("heartbeat %s: %s", self.path, err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if not self._written:
            return  # start failed: there is no file of ours to remove
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class Liveness:
    """Judges whether the worker holding a ``running`` row is gone (see the module docstring)."""

    def __init__(self, grid_dir: Path, lease_s: float, me: str, dead_jobs: Callable[[], set] | None = None):
        self.grid_dir = Path(grid_dir)
        self.lease_s = lease_s
        self.me = me
        self.dead_jobs = dead_jobs
        self._cache: dict[str, tuple[float, bool, float]] = {}  # holder -> (valid until, stale, expiry)
        #: The earliest time (``time.time()``) at which a holder judged alive runs out of its lease, unless
        #: it beats again: the worker looks again then. Whoever reads it sets it back to infinity.
        self.next_expiry = math.inf
        #: The holders last judged alive, with the start of their row: what a lingering worker watches.
        self.alive: dict[str, str] = {}

    def __call__(self, holder: str, started_at: str) -> bool:
        now = time.time()
        cached = self._cache.get(holder)
        if cached and now < cached[0]:
            stale, expiry = cached[1], cached[2]
        else:
            stale, expiry = self._judge(holder, started_at, now)
            # A verdict is reused for a second at most, and an "alive" never past the holder's lease.
            self._cache[holder] = (now + 1.0 if stale else min(now + 1.0, expiry), stale, expiry)
        if not stale:
            self.next_expiry = min(self.next_expiry, expiry)
            self.alive[holder] = started_at
        else:
            self.alive.pop(holder, None)
        return stale

    def any_gone(self) -> bool:
        """Whether a holder judged alive is now gone by its pid (this host) or its job, looking at no file
        (the scheduler's answer is shared and cached: see ``dead_jobs``). Leases are watched by expiry.
        A holder found gone is forgotten, so that it wakes a lingering worker once."""
        gone = []
        for holder, started_at in self.alive.items():
            host, pid, job = parse_worker_id(holder)
            if (host == HOST and not pid_alive(pid)) or (
                    job and self.dead_jobs is not None and self._job_dead(job, started_at)):
                gone.append(holder)
        for holder in gone:
            del self.alive[holder]
            self._cache.pop(holder, None)
        return bool(gone)

    def _job_dead(self, job: str, started_at: str) -> bool:
        """True if the scheduler says ``job`` ended after this row was claimed.

        A collection from ``dead_jobs`` may carry ``observed_at`` (when the scheduler was asked, epoch
        seconds). A job requeued since then runs again under the same id and may hold new rows, so its
        death only counts for rows claimed before that moment (with a margin for the claim time's
        whole seconds and clock skew between nodes); later claims wait for a newer answer or the lease.
        """
        dead = self.dead_jobs()
        if job not in dead:
            return False
        observed = getattr(dead, "observed_at", None)
        claimed = parse_iso(started_at)
        return observed is None or claimed is None or claimed + JOB_STATE_MARGIN_S < observed

    def _judge(self, holder: str, started_at: str, now: float) -> tuple[bool, float]:
        """(whether ``holder`` is gone, when its lease runs out if it beats no more)."""
        if holder == self.me:
            return True, now  # a previous life of this very id: this process is not running it
        host, pid, job = parse_worker_id(holder)
        if host == HOST and not pid_alive(pid):
            return True, now
        if job and self.dead_jobs is not None and self._job_dead(job, started_at):
            return True, now
        path = heartbeat_path(self.grid_dir, holder)
        lease = self.lease_s
        try:
            # open, then fstat: on NFS an open fetches the attributes from the server (close-to-open),
            # where a stat may answer from the attribute cache (acregmax, up to 60 s) with an old mtime.
            with open(path, "rb") as fh:
                last = os.fstat(fh.fileno()).st_mtime
                try:
                    lease = max(lease, float(json.loads(fh.read().decode("utf-8")).get("lease_s", lease)))
                except (ValueError, OSError, AttributeError):
                    pass
        except FileNotFoundError:
            last = parse_iso(started_at) or 0.0
        except OSError as err:
            if err.errno != errno.ESTALE:
                raise
            return False, now + 1.0  # NFS: replaced as we looked (a restarted worker); judge it again soon
        return now - last > lease, last + lease


@dataclass
class Summary:
    worker: str
    done: int = 0
    failed: int = 0
    given_back: int = 0
    stale: int = 0
    elapsed_s: float = 0.0
    stopped: bool = False
    error: str | None = None
    rows: list = field(default_factory=list)

    def line(self) -> str:
        how = "stopped" if self.stopped else "finished"
        text = (f"worker {self.worker} {how} after {self.elapsed_s:.1f} s: {self.done} done, {self.failed} failed, "
                f"{self.given_back} given back")
        if self.stale:
            text += f", {self.stale} stale result(s) kept aside"
        return text


class Worker:
    """Claims and runs rows of one grid until none are left (or it is asked to stop)."""

    def __init__(
        self,
        grid_dir: str | Path,
        shard: int | None = None,
        steal: bool = True,
        lease_s: float | None = None,
        inline: bool = False,
        linger: bool | str = True,
        max_rows: int | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        worker_id: str | None = None,
        dead_jobs: Callable[[], set] | None = None,
        handle_signals: bool = True,
        preload: bool = True,
        env: dict | None = None,
    ):
        self.grid_dir = Path(grid_dir)
        resolved = read_resolved(self.grid_dir)
        self.spec = saved_spec(self.grid_dir, resolved=resolved)
        self.project_dir = resolved.get("project_dir")
        self.store = GridStore(self.grid_dir)
        self.home = shard
        self.steal = steal
        self.lease_s = float(lease_s if lease_s is not None else self.spec.lease_s)
        self.inline = inline
        self.linger = linger
        self.max_rows = max_rows
        self.grace_s = grace_s
        self.worker_id = worker_id or make_worker_id()
        self.liveness = Liveness(self.grid_dir, self.lease_s, self.worker_id, dead_jobs)
        self.rule = self.spec.failure_rule()
        self.handle_signals = handle_signals
        self.preload = preload
        self.env = env  # set in the spawner's environment, so in every row's (gridrunner.packing)
        self._stop = threading.Event()
        self._child_pid: int | None = None
        self._spawner: Spawner | None = None
        self._ctx: Context | None = None
        self._kill_timer: threading.Timer | None = None
        self._skip: dict[Path, tuple] = {}
        self._paths: list[Path] = []
        self._listed_at = -math.inf
        self._tour: list[Path] = []
        self._unusable: set[str] = set()  # the errors of unreadable shards, reported once each
        # Shards of the last pass that looked half-written: never remembered as exhausted, and while there are
        # any a linger lasts a second only.
        self._unsettled: set[Path] = set()
        self.prune = tuple(self.spec.prune)
        self.hang_s = self.spec.hang_after_min * 60.0 if self.spec.hang_after_min else None
        self.time_limit = self.spec.time_limit()
        self._watchdog = None  # a RowWatchdog, made for the first row that needs one
        self._row_end: str | None = None  # why the watchdog ended the running row (Hung: / TimeLimit: ...)
        self._row_limit_min: float | None = None
        self._ctx_row_dir: Path | None = None  # the watched row's directory
        self._row_claim: dict | None = None  # the watched row's claim identity, for its outbox (outbox.identity)
        self._row_started = 0.0  # when the watched row's process started (time.monotonic())

    # ---- stopping

    def request_stop(self, *_args) -> None:
        """Stop after the running row: it is asked to checkpoint and is given back. Signal-safe."""
        first = not self._stop.is_set()
        self._stop.set()
        if self._ctx is not None:
            self._ctx.request_stop()
        pid = self._child_pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGUSR1 if first else signal.SIGKILL)
            except ProcessLookupError:
                pass
            if first and self._kill_timer is None:
                self._kill_timer = threading.Timer(self.grace_s, self._kill_child)
                self._kill_timer.daemon = True
                self._kill_timer.start()

    def _kill_child(self) -> None:
        pid = self._child_pid
        if pid is not None:
            log.warning("row did not stop within %.0f s of the request; killing it", self.grace_s)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ---- the loop

    def run(self) -> Summary:
        problem = lease_problem(self.grid_dir, self.lease_s)
        if problem is not None:
            raise GridError(problem)  # before anything is claimed: its rows would be reclaimed while it runs
        summary = Summary(self.worker_id)
        start = time.monotonic()
        if self.project_dir and self.project_dir not in sys.path:
            sys.path.insert(0, self.project_dir)
        previous = {}
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
                previous[sig] = signal.signal(sig, self.request_stop)
        heartbeat = Heartbeat(self.grid_dir, self.worker_id, self.lease_s)
        try:
            if self.inline:
                set_row_environment()  # the rows run in this process
            else:
                self._spawner = Spawner(self.spec.task, preload=self.preload, env=self.env)
                self._spawner.start()  # before claiming anything: a spawner that cannot start costs no row
            heartbeat.start()
            self.store.recover()
            self._loop(summary)
        except StoreWriteError as err:
            summary.error = str(err)
            log.error("%s; stopping", err)
        finally:
            heartbeat.stop()
            if self._watchdog is not None:
                self._watchdog.close()
            if self._spawner is not None:
                self._spawner.close()
                self._spawner = None
            try:
                # Locks that breakers killed in the middle of a break left meanwhile (see ShardLock).
                remove_orphaned_breaks(self.store.shard_dir, stale_s=self.store.lock_stale_s)
            except OSError as err:
                log.warning("cleaning up after killed processes: %s", err)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            summary.elapsed_s = time.monotonic() - start
            summary.stopped = self._stop.is_set()
        return summary

    def _loop(self, summary: Summary) -> None:
        finish = None
        current = None
        while True:
            if self._stop.is_set() or (self.max_rows is not None and len(summary.rows) >= self.max_rows):
                if finish is not None:
                    self._note(summary, finish, self.store.record(*finish))
                return
            claim, running_elsewhere, finish_recorded = self._next_claim(current, finish)
            if finish is not None:
                self._note(summary, finish, finish_recorded)
                finish = None
            if claim is None:
                if self._relist():
                    continue  # shards were added (make, split) since the list was read: look at them too
                if self._lingers() and running_elsewhere and not self._stop.is_set():
                    self._linger_quietly()
                    continue
                return
            current = claim.path
            result = self.execute(claim)
            summary.rows.append(claim.row_id)
            finish = (claim, result)

    def _change_signature(self):
        try:
            st = os.stat(self.grid_dir / CHANGED_FILE)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def _linger_quietly(self) -> None:
        """Wait, looking at no shard, until something may have changed since the last pass began: the
        change file was touched (a row ended or was given back, a reset, new shards), a holder's pid on
        this host or its job is gone, or the soonest lease of a holder may have run out. One ``stat`` per
        poll; polls start 10 ms apart (the last rows of a grid often end within milliseconds) and back off
        to 2 s. A hand edit made in place touches nothing: it is seen at the next pass."""
        poll = LINGER_FIRST_POLL_S
        if self._unsettled:  # a half-written shard: look again in a second
            self._stop.wait(1.0)
            return
        while not self._stop.is_set():
            wake = self._soonest_expiry() + EXPIRY_MARGIN_S
            self._stop.wait(max(min(poll, wake - time.time()), EXPIRY_MARGIN_S))
            poll = min(poll * 2, self.lease_s / 4.0, 2.0)
            if self._change_signature() != self._pass_signature:
                return
            if time.time() >= wake or self.liveness.any_gone():
                # Look again at every shard with running rows, changed or not.
                self._skip = {path: seen for path, seen in self._skip.items() if not seen[2]}
                return

    def _lingers(self) -> bool:
        """Whether to wait for other workers' rows (to take over if they die) rather than exit. ``linger``
        "watched": only while no watcher is on duty for the grid (:mod:`gridrunner.watcher`)."""
        if self.linger == "watched":
            from gridrunner.watcher import on_duty

            return not on_duty(self.grid_dir)
        return bool(self.linger)

    def _list_paths(self) -> list[Path]:
        """The shard files, listed again at most every ``RELIST_S`` (a glob costs O(shards) per row)."""
        if time.monotonic() - self._listed_at > RELIST_S:
            self._relist()
        return self._paths

    def _relist(self) -> bool:
        """List the shard files now; True if the list changed."""
        paths = self.store.shard_paths()
        self._listed_at = time.monotonic()
        if paths == self._paths:
            return False
        self._paths = paths
        # Each worker tours the other shards in its own order, so workers whose shards run out spread
        # over the rest instead of queueing on the same lock one shard after another.
        self._tour = random.Random(self.worker_id).sample(paths, len(paths))
        return True

    def _order(self, current: Path | None) -> Iterator[Path]:
        """The shards to try: the current one (else the home shard), then, when stealing, every other."""
        paths = self._list_paths()
        if not paths:
            return
        if current is not None and current in paths:
            first = current
        elif self.home is not None:
            indexes = [shard_index(p) for p in paths]
            first = paths[self.home % len(paths) if self.home not in indexes else indexes.index(self.home)]
        elif self.steal:
            first = self._tour[0]
        else:
            first = paths[0]
        yield first
        if not self.steal:
            return
        for path in self._tour:
            if path != first:
                yield path

    def _next_claim(self, current: Path | None, finish):
        """Record ``finish`` (in its own shard's transaction) and claim the next row, home shard first.

        Other shards are first looked at without their lock (:meth:`GridStore.glance`): finished ones
        are passed over, and shards another worker is on (they have running rows) are tried last.
        """
        running_elsewhere = 0
        recorded = None
        pending = finish
        busy = []
        self._pass_signature = self._change_signature()  # before looking: a change during the pass wakes a linger
        self._unsettled = set()
        for k, path in enumerate(self._order(current)):
            if pending is not None and path != pending[0].path:
                recorded = self.store.record(*pending)
                pending = None
            if pending is None:
                remembered = self._skippable(path)
                if remembered is not None:
                    running_elsewhere += remembered
                    continue
                if k > 0:
                    try:
                        may_open, may_run = self.store.glance(path)
                    except OSError:
                        continue  # deleted by hand, or unreadable: the claim below would say why
                    if not may_open and not may_run:
                        self._remember_exhausted(path, 0)
                        continue
                    if may_open and may_run:
                        busy.append(path)
                        continue
            if self._stop.is_set():
                if pending is not None:
                    recorded = self.store.record(*pending)
                return None, 0, recorded
            attempt = self._try_claim(path, pending)
            if attempt is None:
                continue
            rec, scan = attempt
            if pending is not None:
                recorded, pending = rec, None
            if scan.claim is not None:
                return scan.claim, running_elsewhere, recorded
            running_elsewhere += scan.running_elsewhere
            self._remember_exhausted(path, scan.running_elsewhere)
        if pending is not None:
            recorded = self.store.record(*pending)
        for path in busy:
            if self._stop.is_set():
                break
            attempt = self._try_claim(path, None)
            if attempt is None:
                continue
            scan = attempt[1]
            if scan.claim is not None:
                return scan.claim, running_elsewhere, recorded
            running_elsewhere += scan.running_elsewhere
            self._remember_exhausted(path, scan.running_elsewhere)
        return None, running_elsewhere, recorded

    def _try_claim(self, path: Path, pending):
        """One claim transaction on ``path`` (recording ``pending`` first); None if the shard is unusable."""
        self.liveness.next_expiry = math.inf  # so that _remember_exhausted learns this shard's soonest expiry
        try:
            rec, scan = self.store.claim(path, self.worker_id, self.liveness, self.spec.max_attempts,
                                         finish=pending)
        except FileNotFoundError:
            return None  # a shard deleted by hand
        except ShardHalfWritten as err:
            if str(err) not in self._unusable:
                self._unusable.add(str(err))
                log.warning("%s", err)
            rec, scan = None, ClaimScan(half_written=True)
        except GridError as err:
            if isinstance(err, StoreWriteError):
                raise
            if str(err) not in self._unusable:  # once: a lingering worker looks at every shard again and again
                self._unusable.add(str(err))
                log.error("%s (skipping this shard)", err)
            return None
        if scan.half_written:
            # A save in progress (or a result recorded in the journal only): its settling touches no change
            # file, so look again in a second, as for a shard with running rows, until it is whole.
            scan.running_elsewhere = max(scan.running_elsewhere, 1)
            self._unsettled.add(path)
            return rec, scan
        if scan.gave_up:
            log.warning("%s: %d row(s) failed after their workers died %d times", path.name, scan.gave_up,
                        self.spec.max_attempts)
        return rec, scan

    def _signature(self, path: Path):
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _remember_exhausted(self, path: Path, running: int) -> None:
        if path in self._unsettled:
            return  # looked at again at the next pass, a second from now (_linger_quietly)
        expiry = self.liveness.next_expiry if running else math.inf
        self._skip[path] = (self._signature(path), time.monotonic(), running, expiry)

    def _skippable(self, path: Path) -> int | None:
        """For a shard seen exhausted and unchanged since: how many rows other workers were running in it
        then; None if it must be looked at again. A shard with such rows is looked at again after
        min(lease / 2, 5 s) (to notice a dead pid or an ended job) and when the first of their workers can
        have run out of its lease. A finished shard stays skipped until its file changes, so a worker
        looking for rows late in a grid of thousands of shards pays a ``stat`` per finished shard."""
        seen = self._skip.get(path)
        if seen is None:
            return None
        signature, when, running, expiry = seen
        if ((running and (time.monotonic() - when > min(self.lease_s / 2.0, 5.0) or time.time() > expiry))
                or self._signature(path) != signature):
            del self._skip[path]
            return None
        return running

    def _soonest_expiry(self) -> float:
        """The earliest lease expiry among the rows of the shards remembered as exhausted. One that is past
        already (it ran out between the pass and the linger: tests/test_worker.py) wakes the linger at once."""
        return min((seen[3] for seen in self._skip.values()), default=math.inf)

    def _note(self, summary: Summary, finish, recorded: bool | None) -> None:
        claim, result = finish
        if (result.runtime_s or 0.0) >= outbox.KEEP_AFTER_S:
            outbox.discard(self.store.row_dir(claim.row_id))  # recorded, or kept aside below
        if recorded:
            if result.status == "done":
                summary.done += 1
            elif result.status == "failed":
                summary.failed += 1
            else:
                summary.given_back += 1
            log.info("%s %s %s%s", claim.row_id, claim.path.name, result.status,
                     f" ({result.error})" if result.error else f" in {result.runtime_s or 0:.1f} s")
            return
        summary.stale += 1
        row_dir = self.store.row_dir(claim.row_id)
        row_dir.mkdir(parents=True, exist_ok=True)
        aside = row_dir / f"stale-result-{heartbeat_path(self.grid_dir, self.worker_id).stem}.json"
        aside.write_text(json.dumps({"worker": claim.worker, "attempt": claim.attempt, "status": result.status,
                                     "metrics": result.metrics, "error": result.error,
                                     "runtime_s": result.runtime_s}, indent=1), encoding="utf-8")
        if not self.store.holds(claim.path, claim.row_id):
            message = (f"{claim.row_id}: the row was deleted from the shard by hand while this worker ran it; its "
                       f"result was not written to the shard and is kept in {aside}")
            log.warning("%s", message)
            self.store.note(message)
            return
        log.warning("%s: the row was reclaimed or reset while this worker ran it (a stall past the lease?); "
                    "its result was not written to the shard and is kept in %s", claim.row_id, aside)

    # ---- running one row

    def execute(self, claim: Claim) -> Result:
        """Run one claimed row and classify how it ended."""
        row_dir = self.store.row_dir(claim.row_id)  # made by the row's context if the task uses it
        params = task_params(self.spec.fixed, claim.params)
        kept = outbox.take(row_dir, claim.previous)
        if kept is not None:
            log.info("%s %s: its previous worker %s finished it but was gone before recording the result; "
                     "recording that result (the row is not run again)", claim.row_id, claim.path.name,
                     claim.previous[0])
            # Kept again under this claim: if this worker is gone before recording it too, the next one
            # records it (tests/reliability/test_stale_worker.py).
            outbox.keep(row_dir, outbox.identity(claim), *kept)
            return self._classify(kept[0], params, row_dir, kept[1], claim)
        seed = params["seed"] if isinstance(params.get("seed"), int) else seed_from_row_id(claim.row_id)
        self._row_end = None
        self._row_limit_min = None
        if self.time_limit is not None:
            self._row_limit_min, bad = self.time_limit(params)
            if bad is not None:
                return Result("failed", error=bad, runtime_s=0.0)
        started = time.monotonic()
        if self.inline:
            payload = self._run_inline(params, row_dir, claim.row_id, seed)
            outbox.keep(row_dir, outbox.identity(claim), payload, time.monotonic() - started)
        else:
            payload = self._run_forked(params, row_dir, claim, seed)
        runtime = time.monotonic() - started
        return self._classify(payload, params, row_dir, runtime, claim)

    # ---- rows the grid stops: hung and runaway rows (the watchdog's callbacks, on its thread)

    def _watch(self, row_dir: Path, before) -> None:
        if self._watchdog is None:
            from gridrunner.watchdog import RowWatchdog

            self._watchdog = RowWatchdog(self._hung, self._over_time)
        limit_s = self._row_limit_min * 60.0 if self._row_limit_min is not None else None
        self._watchdog.watch(row_dir / "history.jsonl", self.hang_s, limit_s, before)

    def _hung(self) -> None:
        from gridrunner.watchdog import last_step

        if self._child_pid is not None:
            self._end_row(f"Hung: no progress for {self.spec.hang_after_min:g} min "
                          f"({_last_step_text(last_step(self._ctx_row_dir / 'history.jsonl'))})",
                          "killing it", signal.SIGKILL)

    def _over_time(self) -> None:
        from gridrunner.watchdog import last_step

        if self._child_pid is None:
            return
        asked = self._end_row(f"TimeLimit: ran past its limit of {self._row_limit_min:g} min "
                              f"({_last_step_text(last_step(self._ctx_row_dir / 'history.jsonl'))}); checkpoint kept",
                              "asking it to stop", signal.SIGUSR1)
        if asked and self._kill_timer is None:
            self._kill_timer = threading.Timer(self.grace_s, self._kill_child)
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def _end_row(self, why: str, doing: str, sig: int) -> bool:
        """The grid ends the running row (hung, runaway) for ``why``: record that, keep it in the row's outbox
        (a worker gone before recording it leaves it for the next), and send its process ``sig``. False if no
        row's process runs (any more)."""
        pid = self._child_pid
        if pid is None:
            return False
        self._row_end = why
        outbox.keep(self._ctx_row_dir, self._row_claim, {"ended": why}, time.monotonic() - self._row_started,
                    replace=False)
        log.warning("%s; %s", why, doing)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _context(self, row_dir: Path, row_id: str, seed: int, isolated: bool) -> Context:
        return Context(row_dir=row_dir, row_id=row_id, seed=seed, grid_dir=self.grid_dir, isolated=isolated)

    def _run_inline(self, params, row_dir, row_id, seed) -> dict:
        ctx = self._context(row_dir, row_id, seed, isolated=False)
        if self.prune:
            ctx.watch_prune(self.prune, params)
        self._ctx = ctx
        if self._stop.is_set():
            ctx.request_stop()
        try:
            payload = call_task(self.spec.task, params, ctx)
        finally:
            self._ctx = None
        if ctx.pruned:
            payload["pruned"] = ctx.pruned
        return payload

    def _run_forked(self, params, row_dir, claim: Claim, seed) -> dict:
        if self._spawner is None:
            self._spawner = Spawner(self.spec.task, preload=self.preload, env=self.env)
        sys.stdout.flush()
        sys.stderr.flush()
        request = {"task": self.spec.task, "params": params, "row_dir": str(row_dir), "row_id": claim.row_id,
                   "seed": seed, "grid_dir": str(self.grid_dir), "stopped": self._stop.is_set(),
                   "outbox": outbox.identity(claim)}
        if self.prune:
            request["prune"], request["grace_s"] = self.prune, self.grace_s
        watched = self.hang_s is not None or self._row_limit_min is not None
        if watched:
            from gridrunner.watchdog import history_signature

            before = history_signature(row_dir / "history.jsonl")  # before the row can log
        try:
            pid = self._spawner.begin(request)
        except SpawnerDied as err:
            return {"error": f"TaskDied: {err} before the row's process started"}
        self._child_pid = pid
        if watched:
            self._ctx_row_dir = row_dir
            self._row_claim, self._row_started = request["outbox"], time.monotonic()
            self._watch(row_dir, before)
        try:
            if self._stop.is_set():
                os.kill(pid, signal.SIGUSR1)  # a stop asked for while the request was on its way
            ended = self._spawner.end()
        except SpawnerDied as err:
            return {"error": f"TaskDied: {err} while the row ran (its process dies with it)"}
        finally:
            if watched:
                self._watchdog.clear()
            self._child_pid = None
            if self._kill_timer is not None:
                self._kill_timer.cancel()
                self._kill_timer = None
        raw = ended["payload"]
        payload = parse_payload(raw) if raw else None
        if payload and ("metrics" in payload or "error" in payload or "interrupted" in payload):
            return payload
        if payload and payload.get("pruned"):
            return {"pruned": payload["pruned"], "note": "killed after the stop grace period"}
        if self._row_end is not None:
            return {"interrupted": True, "note": "killed by gridrunner"}
        sig = ended.get("signal")
        if sig is not None:
            if self._stop.is_set() and sig == signal.SIGKILL:
                return {"interrupted": True, "note": "killed after the stop grace period"}
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            hint = " (out of memory?)" if sig == signal.SIGKILL else ""
            return {"error": f"TaskDied: the task process was killed by {name}{hint}"}
        return {"error": f"TaskDied: the task process exited with code {ended.get('code')} without a result"}

    def _classify(self, payload: dict, params: dict, row_dir: Path, runtime: float, claim: Claim) -> Result:
        if payload.get("pruned"):  # final, however the task ended after the rule matched
            metrics = {k: v for k, v in (payload.get("metrics") or {}).items() if math.isfinite(v)}
            return Result("failed", metrics=metrics, runtime_s=runtime, error=payload["pruned"])
        if payload.get("ended") and not ("metrics" in payload or "error" in payload):
            # the verdict a worker kept on a hung or runaway row, then was gone before recording it
            return Result("failed", runtime_s=runtime, error=payload["ended"])
        if self._row_end is not None and payload.get("interrupted"):  # hung or runaway; a real result still wins
            return Result("failed", runtime_s=runtime, error=self._row_end)
        if payload.get("interrupted"):
            return Result("not_run", runtime_s=runtime)
        if "error" in payload:
            _save_traceback(row_dir, claim, payload.get("traceback") or payload["error"])
            return Result("failed", error=payload["error"], runtime_s=runtime)
        metrics = payload.get("metrics")
        outcomes = self.spec.outcomes
        missing = [name for name in outcomes if name not in metrics]
        if missing:
            got = ", ".join(sorted(metrics)) or "nothing"
            return Result("failed", metrics=metrics, runtime_s=runtime,
                          error=f"MissingMetric: the task returned no {missing[0]!r} (it returned {got})")
        bad = [name for name in outcomes if not math.isfinite(metrics[name])]
        if bad:
            return Result("failed", metrics={k: v for k, v in metrics.items() if math.isfinite(v)}, runtime_s=runtime,
                          error=f"NonFiniteMetric: {bad[0]} is {metrics[bad[0]]}")
        if self.rule is not None:
            try:
                fired = self.rule.evaluate({**params, **metrics})
            except ExprError as err:
                # The rule cannot be evaluated on this row (log of 0, len of a number): record that as the
                # row's failure. Raising here would stop the worker and leave the row running, to be run again.
                return Result("failed", metrics=metrics, runtime_s=runtime, error=f"RuleError: {err}")
            if fired:
                return Result("failed", metrics=metrics, runtime_s=runtime, error=f"rule: {self.rule.text}")
        return Result("done", metrics=metrics, runtime_s=runtime)


def _last_step_text(step) -> str:
    return "nothing logged" if step is None else f"last step {step}"


def _save_traceback(row_dir: Path, claim: Claim, text: str) -> None:
    row_dir.mkdir(parents=True, exist_ok=True)
    with open(row_dir / TRACEBACK_FILE, "a", encoding="utf-8") as fh:
        fh.write(f"--- attempt {claim.attempt} by {claim.worker} at {claim.started_at}\n{text.rstrip()}\n")
