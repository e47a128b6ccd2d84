"""Tasks for the reliability tests.

* ``run``: every execution draws a unique 48-bit token, appends ``start <row_id> <token> <pid> <ppid>``
  to the ``record_to`` file when it starts and ``finish ...`` just before it returns, and returns the
  token as the ``token`` metric. The shard's ``token`` cell then says exactly which execution's result
  was recorded, and ``ppid`` says which worker ran each execution.
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


def run(params: dict, ctx) -> dict:
    token = secrets.randbits(48)
    where = params["record_to"]
    ids = f"{ctx.row_id} {token} {os.getpid()} {os.getppid()}"
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
