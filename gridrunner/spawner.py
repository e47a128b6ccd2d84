"""The row spawner: a small process, one per worker, that forks the fresh process each row runs in.

A worker does not fork its rows itself. A fork costs in proportion to the memory of the process that
forks: the kernel copies its page tables, both sides then take copy-on-write faults on every page they
write, and the child's exit tears the copies down. A worker holds the store, the spec, the rule
language and the CLI (about 24 MB); forking it cost a no-op row 1.9 ms of CPU against 1.4 ms from this
process, which is a fresh interpreter that imports little besides the task's module (``bench/README.md``
has the figures). The worker starts it when it starts and asks it for each row over a pipe. Every row
still gets a new process, forked from the spawner, so what the README promises holds: a segfault or an
out-of-memory kill costs the row, not the worker, and a task that imports TensorFlow imports it in the
row's process, which gives the GPU's memory back when it exits.

The spawner sets :data:`ROW_ENVIRONMENT` (where the user's environment does not) before its first fork,
so every row's process starts with it.

Lifetimes: the spawner dies with its worker and a row's process with the spawner (``PR_SET_PDEATHSIG``),
so a killed worker never leaves a row running. The spawner is the subreaper of its rows (a process a row
started is orphaned to it, not to init), and when a row's process exits, the spawner kills what it left
running: a process the task started and did not end (a data loader, a forked helper) never outlives its
row, holding its GPU's memory or keeping its worker waiting. Rows stay in their worker's process group, so
a signal to the group (Ctrl-Z, a node frozen) reaches them too. The spawner installs the row's signal handlers once,
before any fork, and its row processes inherit them: SIGUSR1 and SIGTERM make ``ctx.should_stop()``
true, SIGINT and SIGUSR2 are ignored (they are the worker's, which passes a stop on as SIGUSR1). Those two
are blocked across each fork, so one that arrives while a row's process starts waits for its handler
(Python would drop it) instead of being lost.

The protocol, frames of a 4-byte length and a pickle (worker → spawner on one pipe, back on the other):

* hello ``{"sys_path", "task", "preload"}`` → ``{"preloaded": bool}``;
* a row ``{"task", "params", "row_dir", "row_id", "seed", "grid_dir", "stopped"}`` (and ``"prune", "grace_s"``
  when the grid has prune rules) → ``{"pid": pid}`` once its process runs, then ``{"payload": bytes, "code":
  exit code or None, "signal": n or None}`` when it has ended. The payload is JSON lines: a prune notice
  (:mod:`gridrunner.prune`) if a rule matched, then the task's result.

A row's process is reaped only when the next request comes (``waitid`` with ``WNOWAIT`` reads its status
and leaves it a zombie), so its pid cannot be reused while the worker may still signal it.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import json
import os
import pickle
import select
import signal
import struct
import sys
import time
from pathlib import Path

from gridrunner import outbox
from gridrunner.context import Context
from gridrunner.errors import GridError, Interrupted, SpecError

#: Modules that start threads or take a GPU on import: a task that loads one is imported in each row's
#: process, never in the spawner (forking after they start is unsafe).
HEAVY_MODULES = ("tensorflow", "torch", "jax", "cupy", "keras")
#: Set in every row's process where the user's environment does not set them. TensorFlow's C++ log then
#: shows warnings and errors, not the notices it prints at every start (its CPU-feature lines).
ROW_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2"}
_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up once, not in every row's process
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None


class SpawnerDied(GridError):
    """The spawner process ended while the worker needed it (it is started again for the next row)."""


# --------------------------------------------------------------------------- tasks

_RESOLVED: dict = {}


def resolve_task(task: str):
    """The callable for a spec's ``task``.

    ``name`` is a task bundled with gridrunner (``dncnn`` → ``gridrunner.tasks.dncnn:run``), or else an
    importable module's ``run``. ``module:function`` names any importable function. The spelling of
    earlier versions, ``tasks.toy:quadratic``, still means ``gridrunner.tasks.toy:quadratic``; a module of
    the user's own that is called ``tasks`` and has such a submodule is tried after it."""
    if task not in _RESOLVED:
        _RESOLVED[task] = _resolve_task(task)
    return _RESOLVED[task]


def task_module_candidates(task: str) -> list[str]:
    """The module names that ``task`` may mean, in the order they are tried."""
    module_name = task.partition(":")[0]
    bundled = f"gridrunner.tasks.{module_name}"
    if module_name.startswith("tasks."):
        return [f"gridrunner.{module_name}", module_name]
    return [module_name, bundled] if ":" in task else [bundled, module_name]


def _resolve_task(task: str):
    module_name, _, func_name = task.partition(":")
    func_name = func_name or "run"
    for name in task_module_candidates(task):
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is None:
            continue
        module = importlib.import_module(name)
        func = getattr(module, func_name, None)
        if not callable(func):
            raise SpecError(None, "task", f"module {name!r} has no function {func_name!r}")
        return func
    raise SpecError(None, "task", f"cannot import task {task!r}: no module {module_name!r} in the current "
                                  f"directory, on the Python path or among gridrunner's tasks (valid: "
                                  f"'module:function', or the name of a bundled task: dncnn, unet, toy:<function>)")


def set_row_environment() -> None:
    """Give this process (and the rows it forks) :data:`ROW_ENVIRONMENT`, keeping what the user set."""
    for name, value in ROW_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def call_task(task: str, params: dict, ctx: Context) -> dict:
    """Run the task and turn every ending into a JSON-able payload: ``{"metrics": {...}}``,
    ``{"interrupted": True}`` or ``{"error": "Type: message", "traceback": ...}``."""
    try:
        func = resolve_task(task)
        metrics = func(params, ctx)
        if not isinstance(metrics, dict):
            raise TypeError(f"the task must return a dict of metrics, got {type(metrics).__name__}")
        clean = {}
        for key, value in metrics.items():
            try:
                clean[str(key)] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} is not a number: {value!r}") from None
        return {"metrics": clean}
    except Interrupted:
        return {"interrupted": True}
    except BaseException as err:  # every failure is data: recorded, never lost
        if isinstance(err, KeyboardInterrupt) and ctx.should_stop():
            return {"interrupted": True}
        import traceback

        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return {"error": f"{type(err).__name__}: {message}" if message else type(err).__name__,
                "traceback": traceback.format_exc()}


# --------------------------------------------------------------------------- the worker's end


class Spawner:
    """The worker's handle on its spawner process: :meth:`begin` a row, then :meth:`end` it."""

    def __init__(self, task: str, preload: bool = True, env: dict | None = None):
        self.task = task
        self.preload = preload
        self.env = env  # added to the spawner's environment (and so its rows'), e.g. CUDA_VISIBLE_DEVICES
        self.preloaded = False
        self.proc = None
        self._to = self._from = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the spawner process and wait for it to import the task (if the task is light)."""
        import subprocess

        self.close()
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # The worker's own gridrunner, wherever it was imported from; the rest of sys.path comes in the hello.
        code = (f"import sys; sys.path.insert(0, {package_parent!r}); from gridrunner.spawner import main; "
                f"main({request_r}, {reply_w}, {os.getpid()})")
        try:
            self.proc = subprocess.Popen([sys.executable, *subprocess._args_from_interpreter_flags(), "-c", code],
                                         pass_fds=(request_r, reply_w),
                                         env={**os.environ, **self.env} if self.env else None)
        except OSError as err:
            for fd in (request_r, request_w, reply_r, reply_w):
                os.close(fd)
            raise GridError(f"cannot start the process that forks the rows ({sys.executable}: {err.strerror or err}); "
                            f"`gridrunner work --inline` runs rows without it") from err
        finally:
            if self.proc is not None:
                os.close(request_r)
                os.close(reply_w)
        self._to = os.fdopen(request_w, "wb", buffering=0)
        self._from = os.fdopen(reply_r, "rb", buffering=0)
        try:
            self._send({"sys_path": list(sys.path), "task": self.task, "preload": self.preload})
            self.preloaded = bool(self._receive()["preloaded"])
        except SpawnerDied as err:
            code = self.proc.wait()
            self.close()
            raise GridError(f"the process that forks the rows exited at its start (exit status {code}; {err})")

    def begin(self, request: dict) -> int:
        """Ask for a row's process; its pid, once it runs. Raises :class:`SpawnerDied`."""
        if not self.alive:
            self.start()
        self._send(request)
        return self._receive()["pid"]

    def end(self) -> dict:
        """Wait for the row's process to end: ``{"payload": bytes, "code": ..., "signal": ...}``."""
        return self._receive()

    def close(self) -> None:
        """End the spawner (it exits when its request pipe closes) and reap it."""
        for fh in (self._to, self._from):
            if fh is not None:
                fh.close()
        self._to = self._from = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - a spawner that hangs at exit must not hang the worker
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _send(self, message: dict) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._to.write(_HEADER.pack(len(data)) + data)
        except (BrokenPipeError, ValueError, AttributeError) as err:
            raise SpawnerDied(f"the process that forks the rows has died ({type(err).__name__})") from None

    def _receive(self) -> dict:
        if self._from is None:
            raise SpawnerDied("the process that forks the rows is not running")
        message = _read_frame(self._from.fileno())
        if message is None:
            code = self.proc.wait() if self.proc is not None else None
            how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   and -code in signal.Signals._value2member_map_ else f"exit status {code}")
            raise SpawnerDied(f"the process that forks the rows died ({how})")
        return message


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        data = os.read(fd, left)
        if not data:
            return None
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def _read_frame(fd: int):
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    data = _read_exactly(fd, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _write_frame(fd: int, message: dict) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, _HEADER.pack(len(data)) + data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --------------------------------------------------------------------------- the spawner process

_CURRENT: Context | None = None  # the row being started or run: what SIGUSR1 and SIGTERM ask to stop
_STOP_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}


def _ask_to_stop(*_args) -> None:
    if _CURRENT is not None:
        _CURRENT.request_stop()


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); exit if it already has."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def main(request_fd: int, reply_fd: int, worker: int) -> None:
    """The spawner's loop (run by :meth:`Spawner.start` in a fresh interpreter)."""
    global _CURRENT
    _die_with_parent(worker)
    if _PRCTL is not None:  # what a row leaves running is orphaned to this process, not to init
        _PRCTL(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    set_row_environment()
    signal.signal(signal.SIGUSR1, _ask_to_stop)
    signal.signal(signal.SIGTERM, _ask_to_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which asks the row via SIGUSR1
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    hello = _read_frame(request_fd)
    if hello is None:
        os._exit(0)
    sys.path[:] = hello["sys_path"]
    preloaded = hello["preload"] and _preload_if_light(hello["task"])
    gc.freeze()  # what exists now is never scanned again: the collector does not touch (and copy) its pages
    _write_frame(reply_fd, {"preloaded": preloaded})
    me = os.getpid()
    ended = None
    while True:
        request = _read_frame(request_fd)
        if ended is not None:
            os.waitpid(ended, 0)
            ended = None
        if request is None:
            os._exit(0)
        ctx = Context(row_dir=request["row_dir"], row_id=request["row_id"], seed=request["seed"],
                      grid_dir=request["grid_dir"], isolated=True)
        if request["stopped"]:
            ctx.request_stop()
        _CURRENT = ctx  # before the fork: a stop that reaches the row's process at once finds it
        read_fd, write_fd = os.pipe()
        started = time.monotonic()
        if request.get("prune"):
            ctx.watch_prune(request["prune"], request["params"], request.get("grace_s"), notice_fd=write_fd,
                            on_match=_keeper(request, started))
        # Python drops the signals a child gets before its after-fork bookkeeping is done, and the worker
        # may signal the pid as soon as it has it: blocked across the fork, such a signal waits instead.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            os.close(request_fd)
            os.close(reply_fd)
            _row(write_fd, me, request["task"], request["params"], ctx, mask, request["row_dir"],
                 request.get("outbox"), started)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write_fd)
        _write_frame(reply_fd, {"pid": pid})
        chunks = _collect(read_fd, pid)
        os.close(read_fd)
        status = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        _end_descendants(me, pid)
        ended = pid
        _CURRENT = None
        killed = status.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
        _write_frame(reply_fd, {"payload": b"".join(chunks), "code": None if killed else status.si_status,
                                "signal": status.si_status if killed else None})


def _collect(read_fd: int, pid: int) -> list:
    """What the row's process ``pid`` writes to ``read_fd``, until it exits. Not until end of file: a child
    the task forked inherits the pipe's write end, and one still running after the row would hold the row
    open (and its worker waiting) for as long as it lives."""
    try:
        pidfd = os.pidfd_open(pid)  # readable once the process has exited (Linux 5.3)
    except (AttributeError, OSError):
        pidfd = None
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    chunks = []
    try:
        while True:
            events = dict(poller.poll(None if pidfd is not None else 100))
            if events.get(read_fd):
                data = os.read(read_fd, 1 << 16)
                if not data:
                    return chunks  # every writer has closed it
                chunks.append(data)
                continue
            exited = pidfd in events if pidfd is not None else \
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            if exited:  # it wrote all it will write before it exited: take what the pipe holds
                os.set_blocking(read_fd, False)
                try:
                    while data := os.read(read_fd, 1 << 16):
                        chunks.append(data)
                except BlockingIOError:
                    pass
                return chunks
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _children(me: int) -> set[int]:
    """The pids of this process's children (``/proc``; the spawner has one thread)."""
    try:
        with open(f"/proc/{me}/task/{me}/children", encoding="ascii") as fh:
            return {int(pid) for pid in fh.read().split()}
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: look through every process
        from gridrunner.lock import proc_stat

        found = set()
        for entry in os.listdir("/proc"):
            fields = proc_stat(entry) if entry.isdigit() else None
            if fields is not None and len(fields) > 1 and fields[1] == str(me).encode():  # its parent's pid
                found.add(int(entry))
        return found


def _end_descendants(me: int, row_pid: int, wait_s: float = 5.0) -> None:
    """Kill what the row's process ``row_pid`` (exited, not yet reaped) left running: processes the task
    started and did not end, which would hold a GPU's memory, the row's pipe or its files after the row.
    The spawner is their subreaper, so each one orphaned is its child now; killing them orphans theirs in
    turn, until none is left (or ``wait_s`` is over: a process stuck in the kernel cannot hold the row)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        left = _children(me) - {row_pid}
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in left:
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG) != (0, 0):
                        break
                except ChildProcessError:
                    break
                time.sleep(0.001)


def _keeper(request: dict, started: float):
    """For a row whose grid has prune rules: keeps a prune in the row's outbox the moment a rule matches (in the
    row's process), so a worker gone while the task winds down leaves the prune for the next worker."""
    claim = request.get("outbox")
    if claim is None:
        return None
    row_dir = Path(request["row_dir"])
    return lambda pruned: outbox.keep(row_dir, claim, {"pruned": pruned}, time.monotonic() - started)


def _row(write_fd: int, spawner: int, task: str, params: dict, ctx: Context, mask, row_dir: str,
         claim: dict | None, started: float) -> None:
    """Body of a row's process: run the task, keep its payload in ``row_dir``'s outbox for ``claim`` (the
    claim's identity, :mod:`gridrunner.outbox`), send it up the pipe, exit without cleanup. It starts with
    SIGUSR1 and SIGTERM blocked and unblocks them (restoring ``mask``) first: one sent meanwhile reaches its
    handler now."""
    code = 0
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _die_with_parent(spawner)
        payload = call_task(task, params, ctx)
        if ctx.pruned:
            payload["pruned"] = ctx.pruned  # kept with it: however the task ended, the row ends pruned
        if claim is not None:
            outbox.keep(Path(row_dir), claim, payload, time.monotonic() - started)
        _write_all(write_fd, json.dumps(payload).encode())
    except BaseException:  # noqa: BLE001 - nothing may escape a forked process
        code = 70
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _preload_if_light(task: str) -> bool:
    """Import the task's module here, so each row's process skips the import, but only if doing so loads
    none of ``HEAVY_MODULES``. A throwaway process imports it first and reports what it loaded."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            before = set(sys.modules)
            resolve_task(task)
            heavy = any(name.split(".")[0] in HEAVY_MODULES for name in set(sys.modules) - before)
            os.write(write_fd, b"heavy" if heavy else b"light")
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        answer = os.read(read_fd, 16)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    if answer == b"light":
        try:
            resolve_task(task)
        except Exception:  # noqa: BLE001 - the row's own run reports the import error
            return False
        return True
    return False
