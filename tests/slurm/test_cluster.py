"""The one-node test cluster itself: jobs run, accounting sees them, submitit works.

If these fail, every other Slurm test would fail in a more confusing way; the logs
of each daemon are in $GRIDRUNNER_SLURM_DIR/log.
"""

import os
import time

import pytest
import submitit

pytestmark = pytest.mark.slurm


def get_submitit_state(job: submitit.Job) -> str:
    # job.state is cached and polled ever more rarely; tests ask sacct directly.
    return job.watcher.get_state(job.job_id, mode="force")


def wait_for_submitit_state(job: submitit.Job, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = get_submitit_state(job)
    while not any(state.startswith(prefix) for prefix in wanted):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still {state} after {timeout} s, wanted {wanted}")
        time.sleep(0.5)
        state = get_submitit_state(job)
    return state


@pytest.mark.timeout(90)
def test_sbatch_wrap_job_completes_in_accounting(slurm_cluster, tmp_path):
    output = tmp_path / "wrap.out"
    job_id = slurm_cluster.run(
        "sbatch", "--parsable", f"--output={output}", "--wrap", "echo hello from $SLURM_JOB_ID"
    ).strip()

    states = slurm_cluster.wait_finished(job_id, timeout=60)

    assert states == {job_id: "COMPLETED"}
    assert output.read_text().strip() == f"hello from {job_id}"


@pytest.mark.timeout(120)
def test_submitit_job_array_returns_every_result(slurm_cluster, tmp_path):
    # Defined inside the test so that cloudpickle sends it by value: the job's
    # Python could not import this test module by name.
    def square_with_task_id(number):
        return number * number, os.environ["SLURM_ARRAY_TASK_ID"]

    # A folder with a space and a quote, as users' paths have.
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit logs 'quoted'")
    executor.update_parameters(timeout_min=5, slurm_signal_delay_s=60, cpus_per_task=1)
    assert executor.cluster == "slurm"

    jobs = executor.map_array(square_with_task_id, [1, 2, 3])

    results = [job.result() for job in jobs]
    assert [square for square, _ in results] == [1, 4, 9]
    assert sorted(task_id for _, task_id in results) == ["0", "1", "2"]
    array_id = jobs[0].job_id.split("_")[0]
    states = slurm_cluster.wait_finished(array_id, timeout=30)
    assert set(states.values()) == {"COMPLETED"}, states


@pytest.mark.timeout(120)
def test_scancel_of_running_submitit_job_reads_cancelled(slurm_cluster, tmp_path):
    def sleep_long():
        time.sleep(300)

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10, cpus_per_task=1)
    job = executor.submit(sleep_long)
    wait_for_submitit_state(job, {"RUNNING"}, timeout=60)

    slurm_cluster.run("scancel", job.job_id)

    state = wait_for_submitit_state(job, {"CANCELLED"}, timeout=45)
    assert state.startswith("CANCELLED")
    assert slurm_cluster.sacct(job.job_id) == {job.job_id: "CANCELLED"}
    # Without accounting this would wait forever. submitit ignores SIGTERM, so the
    # kill comes after KillWait=5 s, and result() raises about 18 s after scancel.
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
