"""The outbox: a finished row's result, kept in its row directory until the shard has recorded it.

Between a row's end and the transaction that records its result, a worker can be killed: a Slurm job
cancelled or timed out sends SIGKILL ``KillWait`` seconds after SIGTERM, and a row that ends in that
window would otherwise run again. So the row's own process, as soon as its task has returned, writes
what it returned to ``rows/<id>/outbox.json`` (one small write and a rename) before it hands it to the
worker, which records it and then removes the file.

A worker that reclaims the row from a dead holder looks there before running it: a result that this
very claim of the row produced (the same holder, claim time and attempt) is recorded as it is, and the
row is not run again. It keeps the result again under its own claim first, so a chain of workers each
gone before recording it still runs the row once. Any other file is ignored, so a leftover can never
stand in for a run the user asked for (a reset clears the row's holder), and a result the shard already
holds is never written twice (its row is no longer running).

The verdicts that end a row without a result are kept the same way, as soon as they are made: the row's
process keeps a prune (``{"pruned": ...}``) when the rule matches, before the task checkpoints, and the
worker keeps ``{"ended": "Hung: ..."}`` or ``{"ended": "TimeLimit: ..."}`` before it signals the row. A
worker gone while the row winds down (or before recording) so leaves the verdict for the next one, and the
row is not run again; a task that still returns its result after a time-limit stop replaces the verdict.

Rows shorter than ``KEEP_AFTER_S`` are not kept: running them again costs less than the write.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from gridrunner.atomic import write_atomic

OUTBOX_FILE = "outbox.json"
#: Results of rows that ran at least this long are kept until recorded.
KEEP_AFTER_S = 1.0

log = logging.getLogger("gridrunner.outbox")


def identity(claim) -> dict:
    """What ties a kept result to the one claim that produced it."""
    return {"worker": claim.worker, "started_at": claim.started_at, "attempt": claim.attempt}


def final(payload: dict) -> bool:
    """Whether a row's payload ends the row (a result, a failure, a prune, the grid's verdict on a hung or
    runaway row): a row given back runs again."""
    return bool(payload.get("pruned")) or bool(payload.get("ended")) or (
        ("metrics" in payload or "error" in payload) and not payload.get("interrupted"))


def keep(row_dir: Path, claim: dict, payload: dict, runtime_s: float, replace: bool = True) -> bool:
    """Keep the row's ``payload`` (as its process returned it) for ``claim`` (:func:`identity`) until it is
    recorded; False if it is not worth keeping or cannot be kept. Called by the row's own process when its
    task ends or a prune rule matches, and by the worker for its verdict on a hung or runaway row, with
    ``replace`` False: a result the row's process kept for the same claim stays."""
    if runtime_s < KEEP_AFTER_S or not final(payload):
        return False
    if not replace and take(row_dir, (claim["worker"], claim["started_at"], claim["attempt"])) is not None:
        return False
    try:
        row_dir.mkdir(parents=True, exist_ok=True)
        # No fsync: the file guards against a killed process, not a power loss (the row then runs again).
        write_atomic(row_dir / OUTBOX_FILE, json.dumps({**claim, "payload": payload, "runtime_s": runtime_s}),
                     fsync=False)
    except (OSError, TypeError, ValueError) as err:
        log.warning("%s: could not keep the result until it is recorded (%s)", row_dir.name, err)
        return False
    return True


def take(row_dir: Path, previous: tuple[str, str, int] | None) -> tuple[dict, float] | None:
    """The payload and runtime that the claim ``previous`` (holder, claim time, attempt) left unrecorded;
    None if there is none."""
    if previous is None:
        return None
    try:
        entry = json.loads((row_dir / OUTBOX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or (entry.get("worker"), entry.get("started_at"), entry.get("attempt")) \
            != tuple(previous):
        return None
    payload, runtime = entry.get("payload"), entry.get("runtime_s")
    if not isinstance(payload, dict) or not final(payload) or not isinstance(runtime, (int, float)):
        return None
    return payload, float(runtime)


def discard(row_dir: Path) -> None:
    """Remove the kept result: the shard holds it now."""
    try:
        os.unlink(row_dir / OUTBOX_FILE)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("%s: could not remove %s (%s); it is never used for another claim", row_dir.name,
                    OUTBOX_FILE, err)
