"""Submission: N workers as one Slurm job array (through submitit), or N local processes.

The executor's settings come from a profile (``jobs/<name>.yaml``), overridden by the spec's
``resources``, overridden by command-line flags. Every submission is appended to
``<grid>/jobs/submissions.jsonl``; ``status`` joins the rows to the scheduler's view of those jobs with
one ``sacct`` call.

On Slurm each array task runs :class:`WorkerJob`, a submitit checkpointable: the worker runs in a
thread, and on a time-limit or preemption signal (USR2) submitit calls :meth:`WorkerJob.checkpoint`
in the main thread. That asks the running row to stop (``ctx.should_stop()``), waits for it to save its
checkpoint and be given back as ``not_run``, and returns a new submission, which submitit requeues.
Whichever worker claims the row next resumes from its checkpoint. Two submitit behaviours shape the
defaults: USR2 arrives 30–60 s earlier than asked (Slurm checks time limits every 30 s), so
``signal_delay_s`` is capped at ``60 · time_min − 35``; and for time limits under 50 minutes submitit
counts every USR2 as a timeout against ``max_requeues`` (its ``max_num_timeout``).

Locally there is no scheduler: a detached supervisor process starts the workers, at most
``max_parallel`` at a time (submitit's local executor would start all of them at once), and the
command returns unless ``--wait`` is given.
"""
from __future__ import annotations

import difflib
import functools
import getpass
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gridrunner import packing
from gridrunner.errors import GridError, ProfileError
from gridrunner.grid import read_resolved, saved_spec
from gridrunner.spec import MAX_DURATION_S
from gridrunner.store import GridStore, now_iso, pid_alive
from gridrunner.worker import Liveness, make_worker_id

JOBS_DIR = "jobs"
SUBMISSIONS = "submissions.jsonl"
PROFILE_KEYS = {
    "executor": "auto (Slurm if sbatch is on the PATH, else local), slurm or local",
    "partition": "Slurm partition",
    "account": "Slurm account to charge",
    "qos": "Slurm quality of service",
    "constraint": "Slurm node constraint, e.g. a100",
    "gpus": "GPUs per array task",
    "cpus": "CPUs per array task",
    "mem_gb": "memory per array task, in GB",
    "time_min": "time limit per array task, in minutes",
    "setup": "shell lines run before the worker starts (module load, conda activate, ...)",
    "signal_delay_s": "seconds before the time limit at which the worker is told to checkpoint",
    "max_requeues": "how many times an array task is requeued after a time limit or preemption",
    "array_parallelism": "at most this many array tasks run at once",
    "max_parallel": "local executor: at most this many worker processes at once",
    "lease_s": "heartbeat lease of the workers (default: the spec's lease_s)",
    "slurm": "a mapping of further sbatch options, passed through as they are",
    "rows_per_gpu": "run this many workers on each GPU of a task (gridrunner.packing); cpus is then per worker",
    "watcher": "the grid's watcher job: a mapping of time_min, mem_gb, partition, setup, slurm; or false "
               "(no watcher: workers linger to take over dead workers' rows)",
}
WATCHER_KEYS = ("time_min", "mem_gb", "partition", "setup", "slurm")
#: The largest lease (seconds) and memory (GB, as `submit --mem` takes) a profile may set.
MAX_SETTING = {"lease_s": MAX_DURATION_S, "mem_gb": 1e6}
SPEC_RESOURCES = {"time_min": "time_min", "gpus": "gpus", "cpus": "cpus", "mem_gb": "mem_gb", "partition": "partition"}
DEFAULTS = {"executor": "auto", "time_min": 60, "signal_delay_s": 120, "max_requeues": 3}
# Slurm states in which an array task's worker can no longer be running (PENDING: it was requeued,
# so the process that claimed the row is gone).
DEAD_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "TIMEOUT", "PENDING", "REQUEUED", "REVOKED"}


# --------------------------------------------------------------------------- profiles

def profile_dirs(grid_dir: Path | None = None) -> list[Path]:
    dirs = [Path.cwd() / JOBS_DIR]
    if grid_dir is not None:
        project = read_resolved(grid_dir).get("project_dir")
        if project and Path(project).resolve() != Path.cwd().resolve():
            dirs.append(Path(project) / JOBS_DIR)
    return dirs


def load_profile(name: str, grid_dir: Path | None = None) -> tuple[dict, str]:
    """The profile ``name`` (a path, or a name in ./jobs/ or the grid's project jobs/); returns (settings, source).

    The profile ``default`` falls back to the built-in defaults when no ``jobs/default.yaml`` exists.
    """
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) or os.sep in name else \
        [d / f"{name}.yaml" for d in profile_dirs(grid_dir)]
    for path in candidates:
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as err:
                raise ProfileError(f"{path}: invalid YAML: {err}") from None
            return validate_profile(data, str(path)), str(path)
    if name == "default":
        return {}, "built-in defaults"
    known = sorted({p.stem for d in profile_dirs(grid_dir) if d.is_dir() for p in d.glob("*.yaml")})
    raise ProfileError(f"no profile {name!r}: looked for {', '.join(str(c) for c in candidates)} "
                       f"(profiles: {', '.join(known) or 'none'})")


def validate_profile(data, source: str) -> dict:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile is a mapping of settings (valid keys: {', '.join(PROFILE_KEYS)})")
    for key, value in data.items():
        if key not in PROFILE_KEYS:
            hint = difflib.get_close_matches(str(key), PROFILE_KEYS, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ProfileError(f"{source}: unknown key {key!r}{did} (valid keys: {', '.join(PROFILE_KEYS)})")
        if key == "executor" and value not in ("auto", "slurm", "local"):
            raise ProfileError(f"{source}: executor must be auto, slurm or local, got {value!r}")
        if key == "setup" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ProfileError(f"{source}: setup must be a list of shell lines")
        if key == "slurm" and not isinstance(value, dict):
            raise ProfileError(f"{source}: slurm must be a mapping of sbatch options")
        if key in ("gpus", "cpus", "time_min", "max_requeues", "array_parallelism", "max_parallel", "signal_delay_s"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProfileError(f"{source}: {key} must be a whole number >= 0, got {value!r}")
        if key == "rows_per_gpu" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ProfileError(f"{source}: rows_per_gpu must be a whole number >= 1, got {value!r}")
        if key == "watcher":
            _validate_watcher(value, source)
        if key in ("mem_gb", "lease_s") and not _is_positive(value, MAX_SETTING[key]):
            raise ProfileError(f"{source}: {key} must be a positive number up to {MAX_SETTING[key]:g}, got {value!r}")
    return dict(data)


def _validate_watcher(value, source: str) -> None:
    if isinstance(value, bool):
        return
    if not isinstance(value, dict):
        raise ProfileError(f"{source}: watcher must be false, true or a mapping of {', '.join(WATCHER_KEYS)}; "
                           f"got {value!r}")
    for key, item in value.items():
        if key not in WATCHER_KEYS:
            raise ProfileError(f"{source}: unknown key {key!r} under watcher (valid keys: {', '.join(WATCHER_KEYS)})")
        if key == "time_min" and (isinstance(item, bool) or not isinstance(item, int) or item < 1):
            raise ProfileError(f"{source}: watcher.time_min must be a whole number >= 1, got {item!r}")
        if key == "mem_gb" and not _is_positive(item, MAX_SETTING[key]):
            raise ProfileError(f"{source}: watcher.mem_gb must be a positive number up to {MAX_SETTING[key]:g}, "
                               f"got {item!r}")
        if key == "setup" and not (isinstance(item, list) and all(isinstance(v, str) for v in item)):
            raise ProfileError(f"{source}: watcher.setup must be a list of shell lines")
        if key == "slurm" and not isinstance(item, dict):
            raise ProfileError(f"{source}: watcher.slurm must be a mapping of sbatch options")


def _is_positive(value, high: float) -> bool:
    """A number above 0 and at most ``high``: a bool, inf and nan are not (a lease of inf overflows the
    heartbeat's clock)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= high


def resolve_settings(profile: dict, resources: dict, flags: dict) -> dict:
    """Built-in defaults ← profile ← the spec's resources ← flags (None means not given)."""
    settings = dict(DEFAULTS)
    settings.update(profile)
    settings.update({SPEC_RESOURCES[k]: v for k, v in resources.items() if k in SPEC_RESOURCES})
    settings.update({k: v for k, v in flags.items() if v is not None})
    time_min = settings.get("time_min")
    if time_min:
        ceiling = max(60 * int(time_min) - 35, 10)
        if settings["signal_delay_s"] > ceiling:
            # Slurm checks time limits every 30 s, so USR2 can come up to 60 s early; a signal that
            # arrives before the job has installed its handler kills it without a checkpoint.
            settings["signal_delay_s"] = ceiling
    return settings


def choose_executor(settings: dict) -> str:
    executor = settings.get("executor", "auto")
    if executor == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if executor == "slurm" and not shutil.which("sbatch"):
        raise ProfileError("executor slurm asked for, but sbatch is not on the PATH (use --executor local)")
    return executor


# --------------------------------------------------------------------------- bookkeeping

def jobs_dir(grid_dir: Path) -> Path:
    return Path(grid_dir) / JOBS_DIR


def record_submission(grid_dir: Path, entry: dict) -> None:
    path = jobs_dir(grid_dir) / SUBMISSIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def submissions(grid_dir: Path) -> list[dict]:
    path = jobs_dir(grid_dir) / SUBMISSIONS
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class DeadJobs(frozenset):
    """Ids of scheduler jobs that can no longer run a worker, and when the scheduler was asked.

    :class:`gridrunner.worker.Liveness` applies a job's death only to rows claimed before
    ``observed_at``: a job requeued since may run again under the same id.
    """

    observed_at: float = float("-inf")

    def __new__(cls, ids=(), observed_at: float = float("-inf")):
        out = super().__new__(cls, ids)
        out.observed_at = observed_at
        return out


class SchedulerView:
    """The scheduler's state of this grid's Slurm jobs, from one ``sacct`` call (submitit's watcher), and
    one ``squeue`` call when sacct says some job ended: a job slurmctld is still ending reads COMPLETING.

    Answers are reused for ``cache_s`` seconds, and shared through ``<grid>/jobs/scheduler-states.json``
    by every process of the grid (the workers of an array included), so a grid asks sacct about once
    per ``cache_s`` however many workers it has; a lock file makes one process refresh while the others
    keep the previous answer.
    """

    SHARED = "scheduler-states.json"
    REFRESH_LOCK = "scheduler-states.lock"
    REFRESH_LOCK_STALE_S = 60.0

    def __init__(self, grid_dir: Path, cache_s: float = 30.0):
        self.grid_dir = Path(grid_dir)
        self.cache_s = cache_s
        self._states: dict[str, str] = {}
        self._observed_at = float("-inf")  # time.time() of the sacct call that gave _states
        self._checked = float("-inf")  # time.monotonic() of the last look at the shared file or sacct
        self.sacct_calls = 0

    def slurm_job_ids(self) -> list[str]:
        return [job for entry in submissions(self.grid_dir) if entry.get("executor") == "slurm"
                for job in entry.get("job_ids", [])]

    @property
    def observed_at(self) -> float:
        return self._observed_at

    def states(self, refresh: bool = False) -> dict[str, str]:
        """State of every Slurm job of the grid (``UNKNOWN`` until sacct knows it). ``refresh``: ask sacct now."""
        if not refresh and time.monotonic() - self._checked < self.cache_s:
            return self._states
        self._checked = time.monotonic()
        ids = self.slurm_job_ids()
        if not ids or not shutil.which("sacct"):
            self._states, self._observed_at = {}, time.time()
            return self._states
        if not refresh:
            shared = self._read_shared()
            fresh = shared is not None and time.time() - shared[0] < self.cache_s
            if fresh and set(ids) <= set(shared[1]):
                self._observed_at, self._states = shared
                return self._states
            if not self._lock_refresh():
                if shared is not None and shared[0] > self._observed_at:  # another process is asking sacct
                    self._observed_at, self._states = shared
                return self._states
            try:
                return self._query(ids)
            finally:
                self._unlock_refresh()
        return self._query(ids)

    def _query(self, ids: list[str]) -> dict[str, str]:
        from submitit.slurm.slurm import SlurmInfoWatcher

        watcher = SlurmInfoWatcher(delay_s=0)
        for job in ids:
            watcher.register_job(job)
        observed = time.time()
        watcher.update()  # one sacct call for every array ("-j ARRAY" lists all its tasks)
        self.sacct_calls += 1
        if watcher.num_calls and not watcher._output:  # sacct failed (submitit logged why): keep what we had
            return self._states
        # "CANCELLED by 0" reads as CANCELLED; a task sacct does not list yet is UNKNOWN.
        states = {job: (watcher.get_info(job, mode="cache").get("State") or "UNKNOWN").split()[0] for job in ids}
        if any(state in DEAD_STATES for state in states.values()):
            # sacct answers from the accounting database, which slurmctld updates after the fact, so a dead
            # verdict is checked against slurmctld's own view before a row is reclaimed on it:
            # - a cancelled, timed-out or requeued job is ended at once in sacct while slurmctld is still
            #   ending its processes (KillWait, 30 s by default), and its worker may still finish or give
            #   back its row (squeue: COMPLETING);
            # - a job that has started reads PENDING in sacct until its start reaches the database (more
            #   than a second on a loaded 2-core node), while its worker already claims rows (squeue:
            #   RUNNING).
            # Asked after sacct, so a job squeue no longer holds with processes had ended before `observed`.
            held = _jobs_with_processes()
            states.update({job: held[job] for job, state in states.items() if state in DEAD_STATES and job in held})
        self._states = states
        self._observed_at = observed
        self._write_shared()
        return self._states

    def _read_shared(self) -> tuple[float, dict] | None:
        try:
            data = json.loads((jobs_dir(self.grid_dir) / self.SHARED).read_text(encoding="utf-8"))
            return float(data["observed_at"]), dict(data["states"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_shared(self) -> None:
        path = jobs_dir(self.grid_dir) / self.SHARED
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"observed_at": self._observed_at, "states": self._states}), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass

    def _lock_refresh(self) -> bool:
        path = jobs_dir(self.grid_dir) / self.REFRESH_LOCK
        for _ in range(2):
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return True
            except FileExistsError:
                try:
                    if time.time() - path.stat().st_mtime < self.REFRESH_LOCK_STALE_S:
                        return False
                    path.unlink()  # left by a killed process
                except FileNotFoundError:
                    pass
            except OSError:
                return True  # no lock possible here (read-only directory?): ask anyway
        return False

    def _unlock_refresh(self) -> None:
        try:
            (jobs_dir(self.grid_dir) / self.REFRESH_LOCK).unlink()
        except OSError:
            pass

    def dead_jobs(self) -> DeadJobs:
        """Jobs whose worker is gone for good (ended, or waiting to be started again after a requeue)."""
        states = self.states()
        return DeadJobs((job for job, state in states.items() if state in DEAD_STATES), self._observed_at)


#: Job states in which slurmctld may still have a job's processes (squeue's names).
WITH_PROCESSES = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESIZING", "STOPPED")


def _jobs_with_processes() -> dict[str, str]:
    """Id (``array_task`` for array tasks) -> state of this user's jobs that slurmctld lists in a state
    of :data:`WITH_PROCESSES`; empty if squeue fails. (Only this user's: a grid's jobs are, and a large
    cluster's queue need not be listed.)"""
    if not shutil.which("squeue"):
        return {}
    try:
        listed = subprocess.run(["squeue", "--noheader", "--array", f"--states={','.join(WITH_PROCESSES)}",
                                 "--format=%i %T", f"--user={getpass.getuser()}"],
                                capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        logging.getLogger("gridrunner.submit").warning("squeue failed (%s); ended jobs count as gone", err)
        return {}
    return dict(line.split(None, 1) for line in listed.splitlines() if len(line.split()) == 2)


# Array tasks listed one by one in ``status`` up to this many per submission; beyond, counted by state.
STATUS_TASKS_LISTED = 20
# Scheduler states of a job that may still run (or run again).
LIVE_STATES = {"PENDING", "REQUEUED", "RUNNING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED",
               "SIGNALING", "STAGE_OUT", "COMPLETING", "CONFIGURING", "UNKNOWN", "PREEMPTED"}


def job_states(grid_dir: Path) -> list[dict]:
    """The jobs to show in ``status``, with their states from one sacct call.

    Every task of the latest submission, and the tasks of earlier ones that may still run. A
    submission of more than ``STATUS_TASKS_LISTED`` tasks is summed up by state.
    """
    entries = submissions(grid_dir)
    if not entries:
        return []
    last = entries[-1]
    # The latest user submission, and the watcher and its replacements since, are listed in full.
    recent = entries[_latest_user_index(entries):]
    out = []
    slurm = [e for e in entries if e.get("executor") == "slurm"]
    if slurm:
        states = SchedulerView(grid_dir).states(refresh=True)
        for entry in slurm:
            ids = entry.get("job_ids", [])
            if not any(entry is e for e in recent):
                ids = [j for j in ids if states.get(j, "UNKNOWN") in LIVE_STATES - {"UNKNOWN"}]
            detail = _kind_detail(grid_dir, entry)
            if len(ids) <= STATUS_TASKS_LISTED:
                out += [{"job_id": job, "state": states.get(job, "UNKNOWN"), "kind": entry.get("kind", "workers"),
                         **({"detail": detail} if detail else {})} for job in ids]
                continue
            by_state: dict[str, list[str]] = {}
            for job in ids:
                by_state.setdefault(states.get(job, "UNKNOWN"), []).append(job)
            array = ids[0].split("_")[0]
            for state, jobs in sorted(by_state.items(), key=lambda kv: -len(kv[1])):
                shown = ", ".join(jobs[:5]) + (", …" if len(jobs) > 5 else "")
                out.append({"job_id": f"array {array}", "state": state, "kind": entry.get("kind", "workers"),
                            "detail": f"{len(jobs)} task(s): {shown}" + (f" ({detail})" if detail else "")})
    for entry in entries:  # every local submission still running, and the latest one however it is
        if entry.get("executor") != "local" or entry.get("kind", "workers") != "workers":
            continue
        alive = supervisor_alive(entry)
        if alive or entry is last:
            out.append({"job_id": f"local supervisor {entry.get('supervisor_pid')}",
                        "state": "RUNNING" if alive else "ENDED",
                        "detail": f"{entry.get('workers')} workers, at most {entry.get('max_parallel')} at a time"})
    return out


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, field 22 of ``/proc/<pid>/stat``); None if it is
    not running or that cannot be read. With its pid it names one process: a pid alone may be reused."""
    from gridrunner.lock import proc_stat

    fields = proc_stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def supervisor_alive(entry: dict) -> bool:
    """Whether the local supervisor of a submission still runs: its pid is alive and, where the submission
    recorded it, the process there started when the supervisor did (so a pid reused since by another
    process, after a reboot or a long time, is not taken for it, nor signalled by ``cancel``)."""
    pid = entry.get("supervisor_pid")
    if not pid or not pid_alive(int(pid)):
        return False
    started = entry.get("supervisor_start")
    return started is None or process_start(int(pid)) == started


def _kind_detail(grid_dir: Path, entry: dict) -> str:
    """How ``status`` names a watcher's job and the replacements it submitted."""
    kind = entry.get("kind", "workers")
    if kind == "replacement":
        return "replacement submitted by the watcher"
    if kind != "watcher":
        return ""
    from gridrunner.watcher import summary

    info = summary(grid_dir)
    text = "the grid's watcher"
    if info and info.get("job") in entry.get("job_ids", []):
        text += f": {info['state']}, {info['launched']} replacement task(s) submitted"
        if info.get("reason"):
            text += f" ({info['reason']})"
    return text


# --------------------------------------------------------------------------- what can run

@dataclass
class Claimable:
    not_run: int = 0
    reclaimable: int = 0  # running rows whose worker is gone
    running: int = 0  # running rows with a live worker
    done: int = 0
    failed: int = 0

    @property
    def runnable(self) -> int:
        return self.not_run + self.reclaimable


def claimable(grid_dir: Path, dead_jobs=None) -> Claimable:
    from gridrunner.store import STARTED, STATUS, WORKER

    spec = saved_spec(grid_dir)
    judge = Liveness(grid_dir, spec.lease_s, me=make_worker_id(pid=0), dead_jobs=dead_jobs)
    out = Claimable()
    store = GridStore(grid_dir)
    for path in store.shard_paths():
        shard = store.read(path)
        p = shard.n_params
        for i in shard.valid():
            fields = shard.records[i]
            status = fields[p + STATUS]
            if status == "running":
                if judge(fields[p + WORKER], fields[p + STARTED]):
                    out.reclaimable += 1
                else:
                    out.running += 1
            else:
                setattr(out, status, getattr(out, status) + 1)
    return out


# --------------------------------------------------------------------------- the Slurm worker job

try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object


class WorkerJob(_Checkpointable):
    """One array task: a worker on shard ``SLURM_ARRAY_TASK_ID mod shards``, requeued on USR2.

    submitit installs its signal handlers in the main thread before calling this job, so the worker
    runs in a thread and the main thread only waits for it:

    * USR2 (time limit, preemption, ``scancel --signal=USR2``): submitit calls :meth:`checkpoint`,
      which asks the running row to stop, waits while it saves its checkpoint and is given back as
      ``not_run``, and returns a new ``WorkerJob``; submitit then requeues the task (``scontrol
      requeue``), counting the requeue against ``max_num_timeout`` (our ``max_requeues``).
    * SIGTERM (``scancel``, the start of a preemption): the worker stops the same way, so the row goes
      back to ``not_run`` with its checkpoint if the task stops within Slurm's KillWait. A row still
      running at the SIGKILL stays ``running`` until a worker sees that this job is dead.
    """

    def __init__(self, grid_dir: str, lease_s: float | None = None, grace_s: float = 60.0, steal: bool = True,
                 slots=None, linger="watched", homes: list | None = None):
        self.grid_dir = str(grid_dir)
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.steal = steal
        self.slots = slots  # gridrunner.packing.Slots: g·k workers in this task, k per GPU
        self.linger = linger  # "watched": exit when nothing is claimable while the grid's watcher is on duty
        self.homes = homes  # task i starts on shard homes[i mod len]; None: shard i
        self._worker = None
        self._thread = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_worker", "_thread")}

    def __setstate__(self, state):
        state.setdefault("linger", True)  # pickled before there were watchers
        state.setdefault("homes", None)
        self.__dict__.update(state)
        self.__dict__.setdefault("slots", None)
        self._worker = None
        self._thread = None

    def __call__(self) -> dict:
        import threading

        from gridrunner.worker import Worker

        _log_to_stderr()
        terminated = []
        previous_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            terminated.append(signum)
            self._stop_worker()
            if callable(previous_term):
                previous_term(signum, frame)  # submitit's: it logs the signal

        signal.signal(signal.SIGTERM, on_term)
        shard = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
        if self.homes:
            shard = int(self.homes[shard % len(self.homes)])
        view = SchedulerView(Path(self.grid_dir))
        make = functools.partial(Worker, self.grid_dir, steal=self.steal, lease_s=self.lease_s, grace_s=self.grace_s,
                                 handle_signals=False, dead_jobs=view.dead_jobs, linger=self.linger)
        self._worker = make(shard=shard) if self.slots is None else \
            packing.WorkerGroup(make, self.slots, shard, make_worker_id())
        if terminated:
            self._worker.request_stop()
        result = {}

        def body():
            result["summary"] = self._worker.run()

        self._thread = threading.Thread(target=body, name="gridrunner-worker")
        self._thread.start()
        # Python runs signal handlers in the main thread between waits: keep them short.
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)
        summary = result.get("summary")
        if summary is None:
            raise RuntimeError("the worker thread ended without a summary (see the job's log)")
        if summary.error:
            raise GridError(summary.error)
        return {"worker": summary.worker, "done": summary.done, "failed": summary.failed,
                "given_back": summary.given_back, "stale": summary.stale, "stopped": summary.stopped}

    def _stop_worker(self) -> None:
        """Ask the worker to stop once (a second request would kill the running row at once)."""
        worker = self._worker
        if worker is not None and not worker.stopping:
            worker.request_stop()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on USR2: stop the running row, let it checkpoint and give it back, requeue."""
        from submitit.helpers import DelayedSubmission

        self._stop_worker()
        if self._thread is not None and self._thread.is_alive():
            # The row is killed after grace_s; recording it takes a moment more.
            self._thread.join(timeout=self.grace_s + 15)
            if self._thread.is_alive():
                logging.getLogger("gridrunner.submit").warning(
                    "the worker did not stop within %.0f s; requeuing anyway (its row is reclaimed once "
                    "this job is seen requeued)", self.grace_s + 15)
        return DelayedSubmission(WorkerJob(self.grid_dir, self.lease_s, self.grace_s, self.steal, slots=self.slots,
                                           linger=self.linger, homes=self.homes))


def _log_to_stderr() -> None:
    """Worker logs to the job's stderr (submitit's own logger has its handler already)."""
    logger = logging.getLogger("gridrunner")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


# --------------------------------------------------------------------------- submitting

@dataclass
class Submission:
    executor: str
    job_ids: list
    settings: dict
    profile_source: str
    folder: str
    notes: list = field(default_factory=list)  # the watcher's submission, or why there is none

    def lines(self) -> list[str]:
        packed = f", {self.settings['rows_per_gpu']} per GPU" if self.settings.get("rows_per_gpu") else ""
        if self.executor == "slurm":
            first, last = self.job_ids[0], self.job_ids[-1]
            workers = f" of {self.settings['rows_per_gpu'] * self.settings['gpus']} workers{packed}" if packed else ""
            return [f"submitted {len(self.job_ids)} Slurm array task(s){workers} {first} … {last} "
                    f"({self.profile_source}); logs in {self.folder}", *self.notes]
        return [f"started {len(self.job_ids)} local worker(s){packed}, at most {self.settings['max_parallel']} at a "
                f"time ({self.profile_source}); logs in {self.folder}"]


def submit(grid_dir: Path, shards: int | None = None, profile: str = "default", executor: str | None = None,
           flags: dict | None = None) -> Submission:
    """Submit ``shards`` workers for the grid. Refuses when nothing is claimable."""
    grid_dir = Path(grid_dir)
    spec = saved_spec(grid_dir)
    n_files = len(GridStore(grid_dir).shard_paths())
    settings_profile, source = load_profile(profile, grid_dir)
    settings = resolve_settings(settings_profile, spec.resources, {**(flags or {}), "executor": executor})
    kind = choose_executor(settings)
    slots = packing.slots_from_settings(settings, local=kind == "local")
    if slots is not None and kind == "local":
        if shards not in (None, slots.workers):
            raise GridError(f"--shards {shards}: a local submission with rows_per_gpu {slots.rows_per_gpu} on "
                            f"{slots.gpus} GPU(s) runs {slots.workers} workers (leave --shards out)")
        shards = slots.workers
    if shards is None:
        shards = max(n_files, 1)
    if shards < 1:
        raise GridError(f"--shards must be at least 1, got {shards}")
    view = SchedulerView(grid_dir)
    state = claimable(grid_dir, dead_jobs=view.dead_jobs if kind == "slurm" else None)
    if state.runnable == 0:
        raise GridError(f"nothing to run in {grid_dir}: {state.done} done, {state.failed} failed, {state.running} "
                        f"running in live workers. `gridrunner reset --status failed` makes failed rows runnable; "
                        f"`gridrunner make` adds rows")
    if kind == "slurm":
        return _submit_slurm(grid_dir, spec, shards, settings, source, slots)
    return _submit_local(grid_dir, spec, shards, settings, source, slots)


def _submit_slurm(grid_dir: Path, spec, shards: int, settings: dict, source: str, slots=None, kind: str = "workers",
                  homes: list | None = None, by: str | None = None) -> Submission:
    """One array of ``shards`` workers; for a user's submission (``kind`` workers) also the grid's watcher
    job, unless one is already live. The watcher submits ``kind`` replacement arrays itself (``by``)."""
    import submitit

    folder = jobs_dir(grid_dir) / "slurm" / "%j"
    executor = slurm_executor(folder, spec.name, shards, settings, source, slots)
    # The row gets the signal delay less 20 s to checkpoint; the rest is for recording it and requeuing.
    grace = max(5.0, float(settings["signal_delay_s"]) - 20.0)
    watched = settings.get("watcher", True) is not False
    job = WorkerJob(str(grid_dir.resolve()), settings.get("lease_s"), grace, slots=slots,
                    linger="watched" if watched else True, homes=homes)
    try:
        jobs = _submit_array(executor, job, shards)
    except submitit.core.utils.FailedJobError as err:  # sbatch refused: say what it said
        message = " ".join(str(err).split()) or "no message"
        raise GridError(f"sbatch refused the job array ({source}): {message}") from None
    ids = [j.job_id for j in jobs]
    logs = str(folder.parent.resolve())
    entry = {"time": now_iso(), "executor": "slurm", "kind": kind, "job_ids": ids, "array_size": shards,
             "profile": source, "settings": settings, "command": sys.argv, "folder": logs}
    if by:
        entry["by"] = by
    record_submission(grid_dir, entry)
    notes = _submit_watcher(grid_dir, spec, shards, settings, source) if kind == "workers" and watched else []
    return Submission("slurm", ids, settings, source, logs, notes)


def watcher_settings(settings: dict) -> dict:
    """The watcher job's resources: 1 CPU, no GPU, ``watcher.mem_gb`` (1 GB), ``watcher.time_min`` (default:
    the workers' time_min × (max_requeues + 1), as long as the array's tasks can keep requeuing)."""
    own = settings.get("watcher") if isinstance(settings.get("watcher"), dict) else {}
    time_min = int(settings.get("time_min") or 60) * (int(settings.get("max_requeues") or 0) + 1)
    return {"time_min": int(own.get("time_min") or time_min), "mem_gb": float(own.get("mem_gb") or 1.0),
            "partition": own.get("partition", settings.get("partition")), "setup": own.get("setup", settings.get("setup")),
            "slurm": own.get("slurm") or {}, "account": settings.get("account"), "qos": settings.get("qos")}


def _submit_watcher(grid_dir: Path, spec, shards: int, settings: dict, source: str) -> list[str]:
    """Submit the grid's watcher job (gridrunner.watcher) unless one is live; the lines to print."""
    import submitit

    from gridrunner.watcher import WatcherJob, live_watcher

    live = live_watcher(grid_dir)
    if live:
        return [f"the grid's watcher {live} is live: it takes over dead workers' rows"]
    own = watcher_settings(settings)
    folder = jobs_dir(grid_dir) / "slurm" / "%j"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    params = {"job_name": f"gridrunner-{spec.name}-watcher", "time": own["time_min"], "cpus_per_task": 1,
              "mem": f"{max(int(own['mem_gb'] * 1024), 64)}MB"}
    for key in ("partition", "account", "qos", "setup"):
        if own.get(key) not in (None, "", []):
            params[key] = own[key]
    if own["slurm"]:
        params["additional_parameters"] = dict(own["slurm"])
    try:
        executor.update_parameters(**params)
        job = executor.submit(WatcherJob(str(grid_dir.resolve()), shards, settings, settings.get("lease_s")))
    except (ValueError, submitit.core.utils.FailedJobError) as err:
        message = " ".join(str(err).split()) or "no message"
        logging.getLogger("gridrunner.submit").warning("no watcher: %s", message)
        return [f"Warning: sbatch refused the watcher job ({message}); the workers linger to take over dead "
                f"workers' rows (set watcher: in the profile)"]
    record_submission(grid_dir, {"time": now_iso(), "executor": "slurm", "kind": "watcher", "job_ids": [job.job_id],
                                 "profile": source, "settings": own, "command": sys.argv,
                                 "folder": str(folder.parent.resolve())})
    return [f"submitted the grid's watcher, Slurm job {job.job_id} (1 CPU, no GPU, {own['time_min']} min): it "
            f"takes over dead workers' rows, so workers exit when nothing is left to claim"]


def _latest_user_index(entries: list[dict]) -> int:
    """Index of the latest submission of workers by a user (not the watcher's), or of the last entry."""
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].get("kind", "workers") == "workers":
            return i
    return max(len(entries) - 1, 0)


def user_submission(grid_dir: Path) -> dict | None:
    """The grid's latest submission of workers by a user (not the watcher's replacements), if any."""
    entries = submissions(grid_dir)
    return entries[_latest_user_index(entries)] if entries else None


def submit_replacement(grid_dir: Path, n: int, homes: list[int], by: str | None = None) -> list[str]:
    """The watcher's replacement workers: ``n`` array tasks with the settings of the latest user submission
    (its profile, resources and flags as they were resolved then), task i starting on shard homes[i mod len]."""
    grid_dir = Path(grid_dir)
    last = user_submission(grid_dir)
    if last is None or last.get("executor") != "slurm":
        raise GridError(f"{grid_dir}: no Slurm submission of workers to replace")
    spec = saved_spec(grid_dir)
    n = max(1, min(int(n), int(last.get("array_size") or n)))
    settings = dict(last["settings"])
    done = _submit_slurm(grid_dir, spec, n, settings, last.get("profile", "?"),
                         packing.slots_from_settings(settings, local=False), kind="replacement", homes=list(homes), by=by)
    return done.job_ids


def slurm_executor(folder: Path, name: str, shards: int, settings: dict, source: str, slots=None):
    """The submitit executor of a grid's job array, from resolved settings (its sbatch options included)."""
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(settings["max_requeues"]))
    params = {
        "job_name": f"gridrunner-{name}",
        "time": int(settings["time_min"]),
        "signal_delay_s": int(settings["signal_delay_s"]),
        "array_parallelism": int(settings.get("array_parallelism") or shards),
    }
    for key, target in (("partition", "partition"), ("account", "account"), ("qos", "qos"),
                        ("constraint", "constraint"), ("gpus", "gpus_per_node"), ("cpus", "cpus_per_task"),
                        ("setup", "setup")):
        if settings.get(key) not in (None, "", []):
            params[target] = settings[key]
    if settings.get("mem_gb"):
        params["mem"] = f"{int(float(settings['mem_gb']) * 1024)}MB"
    params.update(packing.slurm_parameters(slots, settings))  # g GPUs and cpus · g · k CPUs per task
    if settings.get("slurm"):
        params["additional_parameters"] = dict(settings["slurm"])
    try:
        executor.update_parameters(**params)
    except ValueError as err:  # an option submitit does not know
        raise ProfileError(f"{source}: {str(err).splitlines()[0]}") from None
    return executor


def _submit_array(executor, job: WorkerJob, shards: int):
    """One job array: ``executor.batch()`` turns the submissions into array tasks 0..shards-1."""
    with executor.batch():
        futures = [executor.submit(job) for _ in range(shards)]
    return futures


def _submit_local(grid_dir: Path, spec, shards: int, settings: dict, source: str, slots=None) -> Submission:
    max_parallel = int(settings.get("max_parallel") or min(shards, os.cpu_count() or 1))
    if slots is not None:
        max_parallel = slots.workers  # every slot at once: a slot's worker holds its share of a GPU
    settings["max_parallel"] = max_parallel
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (jobs_dir(grid_dir) / "local").mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):  # a folder of its own, even for two submissions in the same second
        folder = jobs_dir(grid_dir) / "local" / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    command = [sys.executable, "-m", "gridrunner.submit", "supervise", str(grid_dir), str(shards), str(max_parallel),
               str(folder)]
    if settings.get("lease_s"):
        command.append(f"--lease={settings['lease_s']}")
    if slots is not None:
        command.append("--slots=" + json.dumps(packing.slot_environments(slots)))
    # Workers that hold GPUs do not linger; the supervisor takes over dead workers' rows instead.
    watch = bool(settings.get("gpus")) and settings.get("watcher", True) is not False
    if watch:
        command.append("--watch")
    log = open(folder / "supervisor.log", "ab")
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                close_fds=True)
    finally:
        log.close()
    ids = [f"local-{proc.pid}_{i}" for i in range(shards)]
    record_submission(grid_dir, {"time": now_iso(), "executor": "local", "kind": "workers", "watch": watch,
                                 "job_ids": ids, "workers": shards,
                                 "max_parallel": max_parallel, "supervisor_pid": proc.pid,
                                 "supervisor_start": process_start(proc.pid), "profile": source,
                                 "settings": settings, "command": sys.argv, "folder": str(folder)})
    return Submission("local", ids, settings, source, str(folder))


def supervise(grid_dir: str, shards: int, max_parallel: int, folder: str, lease: str | None = None,
              slots: list | None = None, watch: bool = False) -> int:
    """The detached local supervisor: run ``shards`` workers, at most ``max_parallel`` at a time.

    ``slots``: one environment update per worker (``rows_per_gpu``: its GPU, :mod:`gridrunner.packing`).
    With ``watch`` (workers that hold GPUs), the workers do not linger and the supervisor takes the
    watcher's duty (:mod:`gridrunner.watcher`): it starts new workers for rows that become claimable,
    until the grid is finished. SIGTERM (``gridrunner cancel``) is passed on to the running workers,
    which give their rows back.
    """
    import threading

    from gridrunner.watcher import LocalLauncher, Watcher

    stopping = False
    running: dict[int, subprocess.Popen] = {}
    launcher = LocalLauncher(list(range(shards)))
    watcher = None

    def stop(*_):
        nonlocal stopping
        stopping = True
        if watcher is not None:
            watcher.request_stop()
        for proc in running.values():
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    thread = None
    if watch:
        _log_to_stderr()
        watcher = Watcher(grid_dir, max_parallel, launcher, lease_s=float(lease.split("=", 1)[1]) if lease else None,
                          job=f"local-{os.getpid()}")
        thread = threading.Thread(target=watcher.run, name="gridrunner-watcher", daemon=True)
    started = 0
    codes = {}
    while (launcher.waiting() and not stopping) or running or (thread is not None and thread.is_alive()):
        while not stopping and len(running) < max_parallel:
            home = launcher.next_home()
            if home is None:
                break
            cmd = [sys.executable, "-m", "gridrunner.cli", "work", "--grid", grid_dir, "--shard", str(home)]
            if lease:
                cmd.append(lease)
            if watch:
                cmd.append("--no-linger")
            out = open(Path(folder) / f"worker-{started}.log", "ab")
            env = {**os.environ, **slots[started % len(slots)]} if slots else None
            running[started] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
            out.close()
            started += 1
        launcher.running({proc.pid for proc in running.values()})
        if thread is not None and thread.ident is None and not stopping and started:
            thread.start()  # once the first workers run, so that it counts them
        time.sleep(0.2)
        for index, proc in list(running.items()):
            if proc.poll() is not None:
                codes[index] = proc.returncode
                del running[index]
        launcher.running({proc.pid for proc in running.values()})
    (Path(folder) / "exit-codes.json").write_text(json.dumps(codes), encoding="utf-8")
    return 0 if all(code == 0 for code in codes.values()) else 1


def cancel(grid_dir: Path) -> list[str]:
    """Cancel the jobs of this grid's submissions that may still run. Returns what was cancelled."""
    done = []
    watchers = sorted({job for e in submissions(grid_dir) if e.get("kind") == "watcher" and e.get("executor") == "slurm"
                       for job in e.get("job_ids", [])})
    if watchers and shutil.which("scancel"):
        # The watcher first, so that it submits nothing more (one caught mid-sbatch cancels what it submitted).
        subprocess.run(["scancel", *watchers], check=False)
    slurm_ids = SchedulerView(grid_dir).slurm_job_ids()  # read again: replacements the watcher just recorded
    if slurm_ids:
        arrays = sorted({job.split("_")[0] for job in slurm_ids})
        if shutil.which("scancel"):
            subprocess.run(["scancel", *arrays], check=False)
            done += [f"Slurm job {a}" + (" (the watcher)" if a in watchers else "") for a in arrays]
    for entry in submissions(grid_dir):
        pid = entry.get("supervisor_pid")
        if entry.get("executor") == "local" and supervisor_alive(entry):
            try:
                os.kill(int(pid), signal.SIGTERM)
                done.append(f"local supervisor {pid}")
            except ProcessLookupError:
                pass
    return done


def wait(grid_dir: Path, poll_s: float = 2.0, on_progress=None) -> bool:
    """Block until the latest submission's work is over; True if the grid is finished.

    Local: until the supervisor has ended. Slurm: until no row is left to run, or every task of the
    latest submission has ended for good (a requeued task is waiting, not ended) — then rows that are
    still open need another ``submit``. Job states are asked of sacct at most every 10 s.
    """
    from gridrunner.status import grid_status

    entries = submissions(grid_dir)
    first = _latest_user_index(entries)
    last = entries[first]
    view = SchedulerView(grid_dir, cache_s=max(poll_s, 10.0))
    ended_since = None
    while True:
        status = grid_status(grid_dir)
        if on_progress is not None:
            on_progress(status)
        if last["executor"] == "local":
            if not supervisor_alive(last):
                return grid_status(grid_dir).finished
        else:
            if status.finished:
                return True
            states = view.states()
            # The latest user submission, and the watcher and the replacements it submitted since.
            recent = submissions(grid_dir)[first:]
            if all(states.get(job, "UNKNOWN") not in LIVE_STATES for e in recent for job in e["job_ids"]):
                # Every task ended. A worker records its last row just before it exits, so look once more.
                if ended_since is not None and time.monotonic() - ended_since > poll_s:
                    return grid_status(grid_dir).finished
                ended_since = ended_since or time.monotonic()
            else:
                ended_since = None
        time.sleep(poll_s)


def _main(argv: list[str]) -> int:
    if len(argv) >= 5 and argv[0] == "supervise":
        options = argv[5:]
        lease = next((o for o in options if o.startswith("--lease=")), None)
        slots = next((json.loads(o.partition("=")[2]) for o in options if o.startswith("--slots=")), None)
        return supervise(argv[1], int(argv[2]), int(argv[3]), argv[4], lease, slots, watch="--watch" in options)
    print("usage: python -m gridrunner.submit supervise GRID SHARDS MAX_PARALLEL FOLDER [--lease=S] [--slots=JSON] "
          "[--watch]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
