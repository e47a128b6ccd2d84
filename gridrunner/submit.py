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
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from gridrunner.errors import GridError, ProfileError
from gridrunner.grid import read_resolved, saved_spec
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
}
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
        if key in ("mem_gb", "lease_s") and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ProfileError(f"{source}: {key} must be a positive number, got {value!r}")
    return dict(data)


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


class SchedulerView:
    """The scheduler's state of this grid's jobs: one ``sacct`` call, reused for ``cache_s`` seconds."""

    def __init__(self, grid_dir: Path, cache_s: float = 30.0):
        self.grid_dir = Path(grid_dir)
        self.cache_s = cache_s
        self._states: dict[str, str] = {}
        self._when = float("-inf")

    def slurm_job_ids(self) -> list[str]:
        return [job for entry in submissions(self.grid_dir) if entry.get("executor") == "slurm"
                for job in entry.get("job_ids", [])]

    def states(self, refresh: bool = False) -> dict[str, str]:
        if not refresh and time.monotonic() - self._when < self.cache_s:
            return self._states
        self._when = time.monotonic()
        ids = self.slurm_job_ids()
        if not ids or not shutil.which("sacct"):
            self._states = {}
            return self._states
        from submitit.slurm.slurm import SlurmInfoWatcher

        watcher = SlurmInfoWatcher(delay_s=0)
        for job in ids:
            watcher.register_job(job)
        watcher.update()  # one sacct call for every array
        self._states = {job: (watcher.get_info(job, mode="cache").get("State") or "UNKNOWN").split()[0]
                        for job in ids}
        return self._states

    def dead_jobs(self) -> set[str]:
        return {job for job, state in self.states().items() if state in DEAD_STATES}


def job_states(grid_dir: Path) -> list[dict]:
    """The jobs of the latest submission with their states (for ``status``)."""
    entries = submissions(grid_dir)
    if not entries:
        return []
    last = entries[-1]
    if last.get("executor") == "slurm":
        states = SchedulerView(grid_dir).states(refresh=True)
        return [{"job_id": job, "state": states.get(job, "UNKNOWN")} for job in last.get("job_ids", [])]
    out = [{"job_id": f"local supervisor {last.get('supervisor_pid')}",
            "state": "RUNNING" if pid_alive(int(last.get("supervisor_pid") or -1)) else "ENDED",
            "detail": f"{last.get('workers')} workers, at most {last.get('max_parallel')} at a time"}]
    return out


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
    """One array task: a worker on shard ``SLURM_ARRAY_TASK_ID mod shards``, requeued on USR2."""

    def __init__(self, grid_dir: str, lease_s: float | None = None, grace_s: float = 60.0, steal: bool = True):
        self.grid_dir = str(grid_dir)
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.steal = steal
        self._worker = None
        self._thread = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_worker", "_thread")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._worker = None
        self._thread = None

    def __call__(self) -> dict:
        import logging
        import threading

        from gridrunner.worker import Worker

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
        shard = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
        view = SchedulerView(Path(self.grid_dir))
        self._worker = Worker(self.grid_dir, shard=shard, steal=self.steal, lease_s=self.lease_s,
                              grace_s=self.grace_s, handle_signals=False, dead_jobs=view.dead_jobs)
        result = {}

        def body():
            result["summary"] = self._worker.run()

        # The worker runs in a thread so that the main thread stays free for submitit's signal handler.
        self._thread = threading.Thread(target=body, name="gridrunner-worker")
        self._thread.start()
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)
        summary = result.get("summary")
        if summary is None:
            raise RuntimeError("the worker thread ended without a summary (see the job's log)")
        if summary.error:
            raise GridError(summary.error)
        return {"worker": summary.worker, "done": summary.done, "failed": summary.failed,
                "given_back": summary.given_back, "stale": summary.stale}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on USR2: stop the running row, let it checkpoint and give it back, requeue."""
        from submitit.helpers import DelayedSubmission

        if self._worker is not None:
            self._worker.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=self.grace_s + 15)
        return DelayedSubmission(WorkerJob(self.grid_dir, self.lease_s, self.grace_s, self.steal))


# --------------------------------------------------------------------------- submitting

@dataclass
class Submission:
    executor: str
    job_ids: list
    settings: dict
    profile_source: str
    folder: str

    def lines(self) -> list[str]:
        if self.executor == "slurm":
            first, last = self.job_ids[0], self.job_ids[-1]
            return [f"submitted {len(self.job_ids)} Slurm array task(s) {first} … {last} "
                    f"({self.profile_source}); logs in {self.folder}"]
        return [f"started {len(self.job_ids)} local worker(s), at most {self.settings['max_parallel']} at a time "
                f"({self.profile_source}); logs in {self.folder}"]


def submit(grid_dir: Path, shards: int | None = None, profile: str = "default", executor: str | None = None,
           flags: dict | None = None) -> Submission:
    """Submit ``shards`` workers for the grid. Refuses when nothing is claimable."""
    grid_dir = Path(grid_dir)
    spec = saved_spec(grid_dir)
    n_files = len(GridStore(grid_dir).shard_paths())
    if shards is None:
        shards = max(n_files, 1)
    if shards < 1:
        raise GridError(f"--shards must be at least 1, got {shards}")
    settings_profile, source = load_profile(profile, grid_dir)
    settings = resolve_settings(settings_profile, spec.resources, {**(flags or {}), "executor": executor})
    kind = choose_executor(settings)
    view = SchedulerView(grid_dir)
    state = claimable(grid_dir, dead_jobs=view.dead_jobs if kind == "slurm" else None)
    if state.runnable == 0:
        raise GridError(f"nothing to run in {grid_dir}: {state.done} done, {state.failed} failed, {state.running} "
                        f"running in live workers. `gridrunner reset --status failed` makes failed rows runnable; "
                        f"`gridrunner make` adds rows")
    if kind == "slurm":
        return _submit_slurm(grid_dir, spec, shards, settings, source)
    return _submit_local(grid_dir, spec, shards, settings, source)


def _submit_slurm(grid_dir: Path, spec, shards: int, settings: dict, source: str) -> Submission:
    import submitit

    folder = jobs_dir(grid_dir) / "slurm" / "%j"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(settings["max_requeues"]))
    params = {
        "job_name": f"gridrunner-{spec.name}",
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
    if settings.get("slurm"):
        params["additional_parameters"] = dict(settings["slurm"])
    executor.update_parameters(**params)
    grace = max(5.0, float(settings["signal_delay_s"]) - 20.0)
    job = WorkerJob(str(grid_dir.resolve()), settings.get("lease_s"), grace)
    jobs = _submit_array(executor, job, shards)
    ids = [j.job_id for j in jobs]
    record_submission(grid_dir, {"time": now_iso(), "executor": "slurm", "job_ids": ids, "array_size": shards,
                                 "profile": source, "settings": settings, "command": sys.argv,
                                 "folder": str(folder.parent)})
    return Submission("slurm", ids, settings, source, str(folder.parent))


def _submit_array(executor, job: WorkerJob, shards: int):
    """One job array: ``executor.batch()`` turns the submissions into array tasks 0..shards-1."""
    with executor.batch():
        futures = [executor.submit(job) for _ in range(shards)]
    return futures


def _submit_local(grid_dir: Path, spec, shards: int, settings: dict, source: str) -> Submission:
    max_parallel = int(settings.get("max_parallel") or min(shards, os.cpu_count() or 1))
    settings["max_parallel"] = max_parallel
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = jobs_dir(grid_dir) / "local" / stamp
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "gridrunner.submit", "supervise", str(grid_dir), str(shards), str(max_parallel),
               str(folder)]
    if settings.get("lease_s"):
        command.append(f"--lease={settings['lease_s']}")
    log = open(folder / "supervisor.log", "ab")
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                close_fds=True)
    finally:
        log.close()
    ids = [f"local-{proc.pid}_{i}" for i in range(shards)]
    record_submission(grid_dir, {"time": now_iso(), "executor": "local", "job_ids": ids, "workers": shards,
                                 "max_parallel": max_parallel, "supervisor_pid": proc.pid, "profile": source,
                                 "settings": settings, "command": sys.argv, "folder": str(folder)})
    return Submission("local", ids, settings, source, str(folder))


def supervise(grid_dir: str, shards: int, max_parallel: int, folder: str, lease: str | None = None) -> int:
    """The detached local supervisor: run ``shards`` workers, at most ``max_parallel`` at a time.

    SIGTERM (``gridrunner cancel``) is passed on to the running workers, which give their rows back.
    """
    stopping = False
    running: dict[int, subprocess.Popen] = {}

    def stop(*_):
        nonlocal stopping
        stopping = True
        for proc in running.values():
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    next_index = 0
    codes = {}
    while (next_index < shards and not stopping) or running:
        while not stopping and next_index < shards and len(running) < max_parallel:
            cmd = [sys.executable, "-m", "gridrunner.cli", "work", "--grid", grid_dir, "--shard", str(next_index)]
            if lease:
                cmd.append(lease)
            out = open(Path(folder) / f"worker-{next_index}.log", "ab")
            running[next_index] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            out.close()
            next_index += 1
        time.sleep(0.2)
        for index, proc in list(running.items()):
            if proc.poll() is not None:
                codes[index] = proc.returncode
                del running[index]
    (Path(folder) / "exit-codes.json").write_text(json.dumps(codes), encoding="utf-8")
    return 0 if all(code == 0 for code in codes.values()) else 1


def cancel(grid_dir: Path) -> list[str]:
    """Cancel the jobs of this grid's submissions that may still run. Returns what was cancelled."""
    done = []
    slurm_ids = SchedulerView(grid_dir).slurm_job_ids()
    if slurm_ids:
        arrays = sorted({job.split("_")[0] for job in slurm_ids})
        if shutil.which("scancel"):
            subprocess.run(["scancel", *arrays], check=False)
            done += [f"Slurm job {a}" for a in arrays]
    for entry in submissions(grid_dir):
        pid = entry.get("supervisor_pid")
        if entry.get("executor") == "local" and pid and pid_alive(int(pid)):
            try:
                os.kill(int(pid), signal.SIGTERM)
                done.append(f"local supervisor {pid}")
            except ProcessLookupError:
                pass
    return done


def wait(grid_dir: Path, poll_s: float = 2.0, on_progress=None) -> None:
    """Block until the latest submission has ended (local) or the grid has no runnable rows left (Slurm)."""
    from gridrunner.status import grid_status

    last = submissions(grid_dir)[-1]
    view = SchedulerView(grid_dir, cache_s=max(poll_s, 10.0))
    while True:
        status = grid_status(grid_dir)
        if on_progress is not None:
            on_progress(status)
        if last["executor"] == "local":
            if not pid_alive(int(last["supervisor_pid"])):
                return
        else:
            states = view.states()
            alive = [j for j in last["job_ids"] if states.get(j, "UNKNOWN") not in DEAD_STATES - {"PENDING", "REQUEUED"}]
            if status.finished or not alive:
                return
        time.sleep(poll_s)


def _main(argv: list[str]) -> int:
    if len(argv) >= 5 and argv[0] == "supervise":
        return supervise(argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5] if len(argv) > 5 else None)
    print("usage: python -m gridrunner.submit supervise GRID SHARDS MAX_PARALLEL FOLDER [--lease=S]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
