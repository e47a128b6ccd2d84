"""Fast toy tasks for tests, benchmarks and trying gridrunner out (no TensorFlow).

* ``tasks.toy:noop``: returns at once (orchestration benchmarks).
* ``tasks.toy:sleep``: sleeps ``duration`` seconds.
* ``tasks.toy:quadratic``: a metric that is a known function of the parameters plus noise, and a
  failure probability that depends on known parameters, so the analysis can be checked against the
  truth (:func:`quadratic_truth`).
* ``tasks.toy:crash``: fails in the way ``mode`` names: ``raise``, ``nan``, ``exit``, ``segfault``,
  ``memory`` (allocates until a cap of ``cap_mb``), ``none`` (returns None), or ``ok``.
* ``tasks.toy:steps``: "trains" for ``steps`` steps of ``step_s`` seconds, checkpointing every
  ``checkpoint_every`` steps and when asked to stop, and resumes from its checkpoint. It logs
  ``loss`` = max(1 / step, ``plateau``) each step; ``hang_at: k`` makes it hang after logging step k
  (a sleep that never ends), ``ignore_stop: true`` makes it never look at ``ctx.should_stop()``, and
  ``startup_s`` sleeps before the first step (a slow start-up: loading data, building a model).

Every task takes an optional ``record_to`` parameter (put it in ``fixed``): a file to which it
appends ``<event> <row_id> <pid>`` lines (``start``, ``finish``, ``step``), so tests can count
executions across processes. Appends of one short line with ``O_APPEND`` do not interleave.
"""
from __future__ import annotations

import math
import os
import random
import time

QUADRATIC_LOSS_EFFECT = {"l1": 0.10, "l2": 0.0, "ssim": -0.10}


def _record(params: dict, ctx, event: str) -> None:
    path = params.get("record_to")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{event} {ctx.row_id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


def noop(params: dict, ctx) -> dict:
    """Does nothing; ``value`` is 1."""
    _record(params, ctx, "start")
    _record(params, ctx, "finish")
    return {"value": 1.0}


def sleep(params: dict, ctx) -> dict:
    """Sleeps ``duration`` seconds (default 0.05); returns how long it slept."""
    _record(params, ctx, "start")
    duration = float(params.get("duration", 0.05))
    if duration < 0:
        raise ValueError(f"duration must be >= 0, got {duration}")
    start = time.perf_counter()
    time.sleep(duration)
    _record(params, ctx, "finish")
    return {"slept": time.perf_counter() - start}


def quadratic_truth(params: dict) -> tuple[float, float]:
    """The noise-free metric and the failure probability of a ``quadratic`` row.

    score  = 0.5 + 0.3·x − 0.2·x² + 0.05·depth + {l1: +0.1, l2: 0, ssim: −0.1}[loss]     (z has no effect)
    P(fail) = logistic(−3 + 3·[loss = ssim] + 0.15·depth)
    """
    x = float(params.get("x", 0.0))
    depth = float(params.get("depth", 0.0))
    loss = params.get("loss", "l2")
    if loss not in QUADRATIC_LOSS_EFFECT:
        raise ValueError(f"loss must be one of {sorted(QUADRATIC_LOSS_EFFECT)}, got {loss!r}")
    score = 0.5 + 0.3 * x - 0.2 * x * x + 0.05 * depth + QUADRATIC_LOSS_EFFECT[loss]
    logit = -3.0 + 3.0 * (loss == "ssim") + 0.15 * depth
    return score, 1.0 / (1.0 + math.exp(-logit))


def quadratic(params: dict, ctx) -> dict:
    """A metric with planted effects plus Gaussian noise (``noise``, default 0.05); fails at random.

    Parameters: ``x``, ``depth``, ``loss`` (l1, l2, ssim) and ``z`` (no effect), all optional.
    The noise and the failure draw are seeded by the row id and ``ctx.seed``, so a row is reproducible.
    """
    _record(params, ctx, "start")
    score, p_fail = quadratic_truth(params)
    rng = random.Random(f"{ctx.row_id}/{ctx.seed}")  # independent noise per row, reproducible
    noise = float(params.get("noise", 0.05))
    if rng.random() < p_fail:
        raise FloatingPointError("loss became NaN (planted failure)")
    value = score + noise * rng.gauss(0.0, 1.0)
    for step in range(1, 4):
        ctx.log(step, loss=1.0 - value * step / 3.0)
    _record(params, ctx, "finish")
    return {"score": value, "runtime_proxy": 1.0 + float(params.get("depth", 0.0))}


def crash(params: dict, ctx) -> dict:
    """Fails the way ``mode`` says (see the module docstring)."""
    _record(params, ctx, "start")
    mode = params.get("mode", "raise")
    if mode == "raise":
        raise RuntimeError("planted failure from the crash task")
    if mode == "nan":
        return {"value": float("nan")}
    if mode == "exit":
        os._exit(3)
    if mode == "segfault":
        import ctypes
        import faulthandler

        faulthandler.disable()  # a planted crash: no stack dump from a faulthandler the caller enabled (pytest's)
        ctypes.string_at(0)
    if mode == "memory":
        cap_mb = int(params.get("cap_mb", 256))
        if ctx.isolated:  # never cap the worker itself (inline mode)
            import resource

            cap = cap_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        hoard = []
        while True:
            hoard.append(bytearray(64 * 1024 * 1024))
    if mode == "none":
        return None
    if mode == "ok":
        _record(params, ctx, "finish")
        return {"value": 1.0}
    raise ValueError(f"unknown crash mode {mode!r} (valid: raise, nan, exit, segfault, memory, none, ok)")


def steps(params: dict, ctx) -> dict:
    """Counts to ``steps`` (default 20) at ``step_s`` seconds a step, checkpointing as a trainer would.

    The checkpoint is ``ctx.checkpoint_dir / "step"``; a resumed row continues from it. Returns the
    final step and how many steps this run executed (``steps_run``) and how many were resumed.
    """
    from gridrunner.errors import Interrupted

    total = int(params.get("steps", 20))
    step_s = float(params.get("step_s", 0.05))
    every = int(params.get("checkpoint_every", 5))
    path = ctx.checkpoint_dir / "step"
    start = int(path.read_text()) if path.exists() else 0
    _record(params, ctx, f"start@{start}")

    def save(step: int) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(step))
        os.replace(tmp, path)

    plateau = float(params.get("plateau", 0.0))
    hang_at = params.get("hang_at")
    ignore_stop = bool(params.get("ignore_stop", False))
    time.sleep(float(params.get("startup_s", 0.0)))
    step = start
    while step < total:
        if not ignore_stop and ctx.should_stop():
            save(step)
            _record(params, ctx, f"interrupted@{step}")
            raise Interrupted(f"stopped at step {step}")
        time.sleep(step_s)
        step += 1
        _record(params, ctx, "step")
        ctx.log(step, loss=max(1.0 / step, plateau))
        if hang_at is not None and step >= int(hang_at):
            _record(params, ctx, f"hang@{step}")
            while True:
                time.sleep(3600)
        if step % every == 0:
            save(step)
    save(step)
    _record(params, ctx, "finish")
    return {"final_step": float(step), "steps_run": float(step - start), "resumed_from": float(start)}
