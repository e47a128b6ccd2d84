"""Tasks for the reliability tests.

* ``run``: every execution draws a unique 48-bit token, appends ``start <row_id> <token> <pid> <worker> <ppid>``
  to the ``record_to`` file when it starts and ``finish ...`` just before it returns, and returns the
  token as the ``token`` metric. The shard's ``token`` cell then says exactly which execution's result
  was recorded, and ``worker`` says which worker ran each execution: the parent of the spawner (``ppid``)
  that forked the row's process (read from ``/proc``, not from anything gridrunner says).
* ``fail``: raises an exception whose type name and message are the row's ``kind`` and ``message``
  parameters (nasty text for the CSV-safety tests), or returns a metric named ``message`` when
  ``kind`` is ``metric``.
"""
from __future__ import annotations

import os
import secrets
import time


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _worker_pid() -> int:
    """The worker running this row: the spawner's parent when the row has its own process (``ctx.isolated``).

    A worker killed a moment ago has left the spawner to init (the spawner and this process are being
    killed, as their parents died): such a row waits for its SIGKILL and records nothing."""
    try:
        with open(f"/proc/{os.getppid()}/stat", "rb") as fh:
            pid = int(fh.read().rsplit(b")", 1)[1].split()[1])
    except FileNotFoundError:
        pid = 0
    if pid <= 1:
        time.sleep(60)
        raise RuntimeError("the row's worker is gone but the row was not killed")
    return pid


def run(params: dict, ctx) -> dict:
    token = secrets.randbits(48)
    where = params["record_to"]
    worker, spawner = (_worker_pid(), os.getppid()) if ctx.isolated else (os.getpid(), os.getpid())
    ids = f"{ctx.row_id} {token} {os.getpid()} {worker} {spawner}"
    _append(where, f"start {ids}")
    duration = float(params.get("duration", 0.0))
    if duration:
        time.sleep(duration)
    _append(where, f"finish {ids}")
    return {"token": float(token), "value": 1.0}


def fail(params: dict, ctx) -> dict:
    kind = params.get("kind", "RuntimeError")
    message = params.get("message", "")
    if kind == "metric":
        return {str(message): 1.0}
    raise type(str(kind), (Exception,), {})(str(message))
