"""Several rows per GPU: ``rows_per_gpu: k`` runs g·k workers in a task that holds g GPUs.

A model that uses a fraction of a GPU (the study's small DnCNNs) leaves the rest idle for the whole
row. With ``rows_per_gpu: k`` (a profile key, or ``submit --rows-per-gpu k``) each Slurm array task,
or a local submission, that holds g GPUs runs g·k workers, k on each GPU:

* **Slots.** Worker j gets slot j: the GPU ``devices[j // k]``, where ``devices`` are the entries of
  ``CUDA_VISIBLE_DEVICES`` when it is set (Slurm sets it to the task's GPUs), else ``0 .. g-1``.
  Its spawner, and so every row it runs, sees only that GPU (``CUDA_VISIBLE_DEVICES`` is that one
  entry) and learns k from ``GRIDRUNNER_ROWS_PER_GPU``.
* **Memory.** A row whose ``GRIDRUNNER_ROWS_PER_GPU`` is above 1 gives TensorFlow a hard limit of
  :func:`row_memory_mb` (the GPU's memory less a CUDA context per row, divided by k) through a logical
  device (:func:`configure_gpu_memory`, which the MRI tasks call when they start). Memory growth,
  what a row gets alone, is not enough when rows share a GPU: it lets whichever row grows first take
  the memory that a neighbour needs, so the neighbour fails. With a limit each row's allocator stops
  at its share, an out-of-memory error is a ``ResourceExhaustedError`` in the row that ran out, and
  that row alone fails. Memory outside TensorFlow's allocator (the CUDA context, cuDNN's and
  cuBLAS's handles) is what :data:`CONTEXT_MB` reserves per row.
* **CPUs.** With ``rows_per_gpu``, the profile's ``cpus`` are per worker: a task asks Slurm for
  ``cpus · g · k`` CPUs (1 per worker when ``cpus`` is not set).

In a Slurm array task the workers are threads of the task's process (:class:`WorkerGroup`), so
submitit's checkpoint-and-requeue handles all of them as it handles one: a stop reaches every worker,
and each gives its row back with its checkpoint. Each has its own id (the task's ``host:pid:job``
and ``:<slot>``; ``host:pid::<slot>`` outside Slurm), heartbeat and spawner. Locally, the supervisor starts g·k ``gridrunner work``
processes, each with its slot's environment (:func:`slot_environments`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass

from gridrunner.errors import GridError, ProfileError

ROWS_PER_GPU_ENV = "GRIDRUNNER_ROWS_PER_GPU"
#: Memory per row that TensorFlow's allocator does not manage (CUDA context, cuDNN and cuBLAS handles).
CONTEXT_MB = 768
#: The smallest share a row is given; a GPU too small for k rows gets this and the rows fail with OOM.
MIN_ROW_MB = 256

log = logging.getLogger("gridrunner.packing")


@dataclass(frozen=True)
class Slots:
    """``rows_per_gpu`` rows on each of ``gpus`` GPUs: ``workers`` = gpus · rows_per_gpu."""

    rows_per_gpu: int
    gpus: int

    @property
    def workers(self) -> int:
        return self.rows_per_gpu * self.gpus

    def cpus_per_task(self, cpus_per_worker: int | None) -> int:
        return (cpus_per_worker or 1) * self.workers


def slots_from_settings(settings: dict, local: bool) -> Slots | None:
    """The slots that resolved submit settings ask for; None without ``rows_per_gpu``.

    On Slurm ``gpus`` must be given (the task's GPUs are asked for by number). Locally, ``gpus``
    defaults to the GPUs this machine shows (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``)."""
    k = settings.get("rows_per_gpu")
    if k is None:
        return None
    gpus = settings.get("gpus")
    if not gpus and local:
        gpus = len(visible_devices()) or count_gpus()
    if not gpus:
        where = "this machine shows no GPU (no CUDA_VISIBLE_DEVICES, no nvidia-smi)" if local else \
            "a Slurm task's GPUs are asked for by number"
        raise ProfileError(f"rows_per_gpu: {k} needs gpus >= 1 (--gpus or the profile's gpus): {where}")
    return Slots(int(k), int(gpus))


def visible_devices(environ=None) -> list[str]:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs), or [] when it is unset or empty."""
    value = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES", "")
    return [part.strip() for part in value.split(",") if part.strip()]


def count_gpus() -> int:
    """The GPUs ``nvidia-smi -L`` lists; 0 without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def slot_environments(slots: Slots, environ=None) -> list[dict]:
    """One environment update per worker: its GPU in ``CUDA_VISIBLE_DEVICES`` and k in ``GRIDRUNNER_ROWS_PER_GPU``.

    Worker j runs on ``devices[j // k]``: the visible devices if ``CUDA_VISIBLE_DEVICES`` lists at
    least ``gpus`` of them, else ``0 .. gpus-1``."""
    devices = visible_devices(environ)
    if len(devices) < slots.gpus:
        if devices:
            raise GridError(f"rows_per_gpu: {slots.gpus} GPU(s) asked for, but CUDA_VISIBLE_DEVICES lists "
                            f"{len(devices)} ({','.join(devices)})")
        devices = [str(i) for i in range(slots.gpus)]
    return [{"CUDA_VISIBLE_DEVICES": devices[j // slots.rows_per_gpu], ROWS_PER_GPU_ENV: str(slots.rows_per_gpu)}
            for j in range(slots.workers)]


def slurm_parameters(slots: Slots | None, settings: dict) -> dict:
    """submitit parameters a packed task needs on top of the others: its GPUs and cpus · g · k CPUs."""
    if slots is None:
        return {}
    return {"gpus_per_node": slots.gpus, "cpus_per_task": slots.cpus_per_task(settings.get("cpus"))}


# --------------------------------------------------------------------------- in the row's process

def row_memory_mb(total_mb: float, rows_per_gpu: int) -> int:
    """The TensorFlow memory limit of one of ``rows_per_gpu`` rows on a GPU of ``total_mb``:
    ``(total_mb - rows_per_gpu · CONTEXT_MB) / rows_per_gpu``, at least :data:`MIN_ROW_MB`."""
    if rows_per_gpu < 1:
        raise ValueError(f"rows_per_gpu must be at least 1, got {rows_per_gpu}")
    return max(int((total_mb - rows_per_gpu * CONTEXT_MB) // rows_per_gpu), MIN_ROW_MB)


def rows_per_gpu_of_this_process(environ=None) -> int:
    """k from ``GRIDRUNNER_ROWS_PER_GPU`` (1 when unset or not a whole number >= 1)."""
    value = (os.environ if environ is None else environ).get(ROWS_PER_GPU_ENV, "")
    try:
        k = int(value)
    except ValueError:
        return 1
    return k if k >= 1 else 1


def gpu_total_mb(ordinal: int = 0) -> float | None:
    """Total memory of visible GPU ``ordinal`` in MB, from the CUDA driver (it honours
    ``CUDA_VISIBLE_DEVICES``, which ``nvidia-smi`` does not); None without a driver or GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, total = ctypes.c_int(), ctypes.c_size_t()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
        return None
    if cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device) != 0:
        return None
    return total.value / 2**20


def configure_gpu_memory(tf, environ=None) -> str:
    """Give this process's GPUs memory growth, or, when k rows share the GPU, a limit of
    :func:`row_memory_mb`. Call before TensorFlow touches a GPU. Returns what it did, in words."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "no GPU"
    k = rows_per_gpu_of_this_process(environ)
    total = gpu_total_mb() if k > 1 else None
    if k == 1 or total is None:
        if k > 1:
            log.warning("%s=%d, but the GPU's memory is unknown (no CUDA driver answer); using memory growth",
                        ROWS_PER_GPU_ENV, k)
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        return "memory growth"
    limit = row_memory_mb(total, k)
    for gpu in gpus:
        tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit)])
    return f"memory limit {limit} MB ({k} rows on a GPU of {total:.0f} MB)"


# --------------------------------------------------------------------------- a Slurm task's workers

class WorkerGroup:
    """g·k workers in one process, one per slot, each in a thread; looks like one :class:`Worker`.

    ``make(shard=..., worker_id=..., env=...)`` builds a worker; worker j starts on shard
    ``home · workers + j``. :meth:`request_stop` reaches every worker; :meth:`run` returns one summary
    that adds theirs up (its ``error`` is the first worker's error)."""

    def __init__(self, make, slots: Slots, home: int, base_id: str, environ=None):
        self.slots = slots
        # host:pid:job:j, or host:pid::j outside Slurm (the third field is always the job)
        slot_id = base_id + (":" if base_id.count(":") >= 2 else "::")
        self.workers = [make(shard=home * slots.workers + j, worker_id=f"{slot_id}{j}", env=env)
                        for j, env in enumerate(slot_environments(slots, environ))]

    @property
    def stopping(self) -> bool:
        return all(worker.stopping for worker in self.workers)

    def request_stop(self, *_args) -> None:
        for worker in self.workers:
            worker.request_stop()

    def run(self):
        from gridrunner.worker import Summary

        summaries = [None] * len(self.workers)

        def body(j):
            summaries[j] = self.workers[j].run()

        threads = [threading.Thread(target=body, args=(j,), name=f"gridrunner-worker-{j}")
                   for j in range(len(self.workers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = Summary(worker=",".join(w.worker_id for w in self.workers))
        for summary in summaries:
            if summary is None:
                total.error = total.error or "a worker thread ended without a summary (see the job's log)"
                continue
            total.done += summary.done
            total.failed += summary.failed
            total.given_back += summary.given_back
            total.stale += summary.stale
            total.stopped = total.stopped or summary.stopped
            total.elapsed_s = max(total.elapsed_s, summary.elapsed_s)
            total.rows += summary.rows
            total.error = total.error or summary.error
        return total
