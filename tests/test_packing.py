"""Several rows per GPU (``rows_per_gpu``), on CPU: the slots, the environment each worker and row gets,
one claim per row with g·k workers, the sbatch options, and the bad settings.

No GPU is needed: a slot is an entry of ``CUDA_VISIBLE_DEVICES`` and a number in
``GRIDRUNNER_ROWS_PER_GPU``, which the rows here record. The memory limit a row derives from them
(:func:`gridrunner.packing.row_memory_mb`) is tested as a function; applying it needs a GPU.
"""
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from gridrunner import packing
from gridrunner.cli import main
from gridrunner.errors import GridError, ProfileError
from gridrunner.packing import Slots, row_memory_mb, slot_environments
from gridrunner.submit import load_profile, resolve_settings, slurm_executor, submissions, submit, wait
from gridtools import make_grid
from test_worker import rows_by

# A task that records, for each execution, the row, its slot's environment and its worker (the spawner's
# parent, read from /proc), then waits until `workers` distinct spawners have started a row (so that
# every worker runs one) or 60 s have passed.
SLOT_TASK = '''
import os, time

def _append(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (line + "\\n").encode())
    os.close(fd)

def run(params, ctx):
    with open(f"/proc/{os.getppid()}/stat", "rb") as fh:
        worker = int(fh.read().rsplit(b")", 1)[1].split()[1])
    env = os.environ
    _append(params["record_to"], " ".join([ctx.row_id, str(os.getppid()), str(worker),
            env.get("CUDA_VISIBLE_DEVICES", "-"), env.get("GRIDRUNNER_ROWS_PER_GPU", "-")]))
    barrier = params["barrier"]
    os.makedirs(barrier, exist_ok=True)
    open(os.path.join(barrier, str(os.getppid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(barrier)) < params["workers"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"value": 1.0}
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "slot_task.py").write_text(SLOT_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))  # for make's check that the task imports; workers get project_dir
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def slot_grid(project, rows: int, workers: int):
    return make_grid(project, {"task": "slot_task:run", "outcomes": ["value"], "max_len": 4,
                               "grid": {"i": list(range(rows))},
                               "fixed": {"record_to": str(project / "executions.log"),
                                         "barrier": str(project / "barrier"), "workers": workers}})


def executions(project) -> list[dict]:
    lines = (project / "executions.log").read_text().split("\n")
    keys = ("row_id", "spawner", "worker", "device", "rows_per_gpu")
    return [dict(zip(keys, line.split())) for line in lines if line]


# --------------------------------------------------------------------------- slots

@settings(max_examples=200, deadline=None)
@given(k=st.integers(1, 8), g=st.integers(1, 8), extra=st.integers(0, 3), uuids=st.booleans(),
       visible=st.booleans())
def test_every_gpu_gets_exactly_k_workers_and_each_worker_sees_one_gpu(k, g, extra, uuids, visible):
    devices = [f"GPU-{i:04x}-uuid" if uuids else str(i + 2) for i in range(g + extra)]
    environ = {"CUDA_VISIBLE_DEVICES": ",".join(devices)} if visible else {}
    envs = slot_environments(Slots(k, g), environ)
    assert len(envs) == g * k
    expected = devices[:g] if visible else [str(i) for i in range(g)]
    assert Counter(env["CUDA_VISIBLE_DEVICES"] for env in envs) == {d: k for d in expected}
    for j, env in enumerate(envs):
        assert env == {"CUDA_VISIBLE_DEVICES": expected[j // k], "GRIDRUNNER_ROWS_PER_GPU": str(k)}


def test_fewer_visible_gpus_than_asked_for_is_an_error_naming_both():
    with pytest.raises(GridError, match=r"rows_per_gpu: 3 GPU\(s\) asked for, but CUDA_VISIBLE_DEVICES lists 2 \(4,5\)"):
        slot_environments(Slots(2, 3), {"CUDA_VISIBLE_DEVICES": "4,5"})


@given(total=st.floats(1024, 200_000), k=st.integers(1, 32))
def test_a_rows_memory_limit_leaves_a_cuda_context_per_row_and_shrinks_with_k(total, k):
    limit = row_memory_mb(total, k)
    assert limit >= packing.MIN_ROW_MB
    if limit > packing.MIN_ROW_MB:
        assert k * (limit + packing.CONTEXT_MB) <= total
        assert total - k * (limit + packing.CONTEXT_MB) < k  # no more than rounding is left unused
    assert row_memory_mb(total, k + 1) <= limit


def test_the_memory_limit_of_the_study_gpus():
    assert row_memory_mb(11 * 1024, 1) == 10496 and row_memory_mb(11 * 1024, 2) == 4864
    assert row_memory_mb(141 * 1024, 8) == 17280


@pytest.mark.parametrize("value, k", [("4", 4), ("1", 1), ("", 1), ("0", 1), ("-2", 1), ("two", 1)])
def test_a_row_reads_k_from_its_environment(value, k):
    assert packing.rows_per_gpu_of_this_process({"GRIDRUNNER_ROWS_PER_GPU": value}) == k


# --------------------------------------------------------------------------- settings and Slurm options

@pytest.mark.parametrize("value", [0, -1, True, "2", 1.5])
def test_a_bad_rows_per_gpu_in_a_profile_is_an_error(project, value):
    (project / "jobs" / "p.yaml").write_text(f"rows_per_gpu: {json.dumps(value)}\n")
    with pytest.raises(ProfileError, match=rf"p.yaml: rows_per_gpu must be a whole number >= 1, got {value!r}"):
        load_profile("p")


def test_the_sbatch_script_of_a_packed_task_asks_for_its_gpus_and_cpus_per_worker(project):
    (project / "jobs" / "gpu.yaml").write_text("partition: gpu\ngpus: 2\ncpus: 3\nrows_per_gpu: 4\nmem_gb: 64\n")
    profile, source = load_profile("gpu")
    settings = resolve_settings(profile, {"time_min": 90}, {"gpus": None})
    slots = packing.slots_from_settings(settings, local=False)
    assert slots == Slots(4, 2)
    executor = slurm_executor(project / "logs" / "%j", "g", 5, settings, source, slots)
    text = executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    assert "#SBATCH --gpus-per-node=2\n" in text and "#SBATCH --cpus-per-task=24\n" in text  # 3 × 2 × 4
    assert "#SBATCH --partition=gpu\n" in text and "#SBATCH --mem=65536MB\n" in text and "--time=90\n" in text
    flags = resolve_settings(profile, {}, {"rows_per_gpu": 2, "cpus": 1, "gpus": 1})
    text = slurm_executor(project / "logs" / "%j", "g", 5, flags, source,
                          packing.slots_from_settings(flags, local=False))._make_submission_file_text("x", "uid")
    assert "#SBATCH --gpus-per-node=1\n" in text and "#SBATCH --cpus-per-task=2\n" in text


def test_an_unpacked_tasks_sbatch_options_are_unchanged(project):
    settings = resolve_settings({"gpus": 1, "cpus": 4}, {}, {})
    assert packing.slots_from_settings(settings, local=False) is None
    text = slurm_executor(project / "logs" / "%j", "g", 2, settings, "p", None)._make_submission_file_text("x", "u")
    assert "#SBATCH --gpus-per-node=1\n" in text and "#SBATCH --cpus-per-task=4\n" in text


def test_rows_per_gpu_without_gpus_is_an_error_on_slurm_and_on_a_machine_without_gpus(project, monkeypatch):
    with pytest.raises(ProfileError, match="rows_per_gpu: 2 needs gpus >= 1 .*asked for by number"):
        packing.slots_from_settings({"rows_per_gpu": 2}, local=False)
    monkeypatch.setenv("PATH", str(project))  # no nvidia-smi
    with pytest.raises(ProfileError, match="rows_per_gpu: 2 needs gpus >= 1 .*shows no GPU"):
        packing.slots_from_settings({"rows_per_gpu": 2}, local=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    assert packing.slots_from_settings({"rows_per_gpu": 2}, local=True) == Slots(2, 2)


def test_submit_refuses_bad_packing_with_one_error_and_writes_nothing(project, monkeypatch):
    slot_grid(project, rows=2, workers=1)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no sbatch, no nvidia-smi
    runner = CliRunner()
    result = runner.invoke(main, ["submit", "--executor", "local", "--rows-per-gpu", "2"])
    assert result.exit_code == 1 and result.output.startswith("Error: rows_per_gpu: 2 needs gpus >= 1")
    result = runner.invoke(main, ["submit", "--executor", "local", "--rows-per-gpu", "2", "--gpus", "1", "--shards", "3"])
    assert result.exit_code == 1
    assert result.output == ("Error: --shards 3: a local submission with rows_per_gpu 2 on 1 GPU(s) runs 2 workers "
                             "(leave --shards out)\n")
    result = runner.invoke(main, ["submit", "--executor", "local", "--rows-per-gpu", "0", "--gpus", "1"])
    assert result.exit_code == 2 and "Invalid value for '--rows-per-gpu'" in result.output
    assert not (project / "runs" / "g" / "jobs").exists()


# --------------------------------------------------------------------------- real workers

def test_a_local_submission_runs_g_times_k_workers_each_on_its_gpu_and_every_row_once(project):
    g, k = 2, 3
    grid = slot_grid(project, rows=24, workers=g * k)
    result = CliRunner().invoke(main, ["submit", "--executor", "local", "--gpus", str(g), "--rows-per-gpu", str(k),
                                       "--wait"], catch_exceptions=False)
    assert result.exit_code == 0 and f"started {g * k} local worker(s), 3 per GPU, at most {g * k}" in result.output
    rows = rows_by(grid)
    assert [r["status"] for r in rows.values()] == ["done"] * 24
    runs = executions(project)
    assert sorted(run["row_id"] for run in runs) == sorted(rows)  # every row exactly once
    devices_of = defaultdict(set)
    for run in runs:
        assert run["rows_per_gpu"] == str(k)
        devices_of[run["worker"]].add(run["device"])
    assert len(devices_of) == g * k  # every worker ran rows (the barrier waits for all of them)
    assert all(len(devices) == 1 for devices in devices_of.values())  # a worker stays on its GPU
    assert Counter(next(iter(d)) for d in devices_of.values()) == {"0": k, "1": k}
    assert len({r["worker"] for r in rows.values()}) == g * k  # the shards name g·k workers
    (entry,) = submissions(grid)
    assert entry["workers"] == g * k and entry["settings"]["rows_per_gpu"] == k


def test_a_slurm_tasks_worker_group_runs_g_times_k_workers_in_its_process(project):
    """The array task's body (WorkerJob) with slots, run as a process without Slurm: 2 GPUs × 2 rows."""
    grid = slot_grid(project, rows=12, workers=4)
    code = textwrap.dedent(f"""
        import json, sys
        from gridrunner.packing import Slots
        from gridrunner.submit import WorkerJob
        print(json.dumps(WorkerJob({str(grid)!r}, lease_s=30, slots=Slots(2, 2))()))
    """)
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "CUDA_VISIBLE_DEVICES": "5,6", "PYTHONPATH": str(project)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=project)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["done"] == 12 and summary["failed"] == 0
    rows = rows_by(grid)
    assert [r["status"] for r in rows.values()] == ["done"] * 12
    runs = executions(project)
    assert sorted(run["row_id"] for run in runs) == sorted(rows)
    assert {run["worker"] for run in runs} == {str(_pid_of(summary["worker"]))}  # one process: the task's
    spawners = defaultdict(set)
    for run in runs:
        spawners[run["spawner"]].add(run["device"])
    assert len(spawners) == 4 and all(len(d) == 1 for d in spawners.values())
    assert Counter(next(iter(d)) for d in spawners.values()) == {"5": 2, "6": 2}
    workers = {r["worker"] for r in rows.values()}
    assert len(workers) <= 4 and all(w.endswith(tuple(f"::{j}" for j in range(4))) for w in workers)


def _pid_of(worker_ids: str) -> int:
    return int(worker_ids.split(",")[0].split(":")[1])


def test_a_stopped_slurm_task_gives_back_the_rows_of_all_its_workers_with_their_checkpoints(project):
    """SIGTERM (scancel, preemption) reaches every worker of the group: each running row saves its checkpoint
    and goes back to not_run, and the task's process ends."""
    import signal
    import time

    from gridtools import wait_until
    from test_worker import statuses

    grid = make_grid(project, {"task": "gridrunner.tasks.toy:steps", "outcomes": ["final_step"], "max_len": 2,
                               "grid": {"i": list(range(4))}, "fixed": {"steps": 400, "step_s": 0.05}})
    code = textwrap.dedent(f"""
        from gridrunner.packing import Slots
        from gridrunner.submit import WorkerJob
        WorkerJob({str(grid)!r}, lease_s=30, grace_s=20, slots=Slots(2, 2))()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: statuses(grid).count("running") == 4, 60)
        assert wait_until(lambda: all((grid / "rows" / r / "history.jsonl").exists() for r in rows_by(grid)), 60)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert statuses(grid) == ["not_run"] * 4
    for row_id in rows_by(grid):
        assert int((grid / "rows" / row_id / "checkpoint" / "step").read_text()) > 0
