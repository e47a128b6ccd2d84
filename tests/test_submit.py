"""Submission without Slurm: profiles and their precedence, the local supervisor, bookkeeping, cancel."""
import json
import os
import time

import pytest
from click.testing import CliRunner

from gridrunner.cli import main
from gridrunner.errors import GridError, ProfileError
from gridrunner.submit import load_profile, resolve_settings, submissions, submit, wait
from gridrunner.worker import Liveness
from gridtools import events, make_grid, wait_until
from test_worker import rows_by, statuses


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    return tmp_path


def test_profile_keys_are_checked_and_listed(project):
    (project / "jobs" / "typo.yaml").write_text("partition: gpu\ngpu: 1\n")
    with pytest.raises(ProfileError) as info:
        load_profile("typo")
    assert str(info.value).startswith(f"{project / 'jobs' / 'typo.yaml'}: unknown key 'gpu'; did you mean 'gpus'? "
                                      "(valid keys: executor, partition, account,")
    with pytest.raises(ProfileError, match=r"no profile 'gpu2': looked for .*jobs/gpu2.yaml \(profiles: typo\)"):
        load_profile("gpu2")
    assert load_profile("default") == ({}, "built-in defaults")


def test_settings_precedence_and_the_signal_delay_cap():
    profile = {"partition": "short", "time_min": 30, "gpus": 1, "signal_delay_s": 300}
    resources = {"time_min": 1, "mem_gb": 8}
    settings = resolve_settings(profile, resources, {"partition": "long", "gpus": None})
    assert (settings["partition"], settings["gpus"], settings["time_min"], settings["mem_gb"]) == ("long", 1, 1, 8)
    assert settings["signal_delay_s"] == 25  # 60 * 1 - 35: USR2 can come up to 60 s early


def test_local_submit_runs_the_grid_with_a_concurrency_cap_and_records_it(project):
    side = project / "executions.log"
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"], "max_len": 10,
                               "grid": {"duration": [0.05] * 1, "i": list(range(40))},
                               "fixed": {"record_to": str(side)}})
    result = submit(grid, 3, executor="local", flags={"max_parallel": 2})
    assert result.executor == "local" and len(result.job_ids) == 3
    wait(grid, poll_s=0.2)
    assert statuses(grid) == ["done"] * 40
    assert all(n == 1 for (event, _), n in events(side).items() if event == "finish")
    (entry,) = submissions(grid)
    assert entry["workers"] == 3 and entry["max_parallel"] == 2 and entry["executor"] == "local"
    codes = json.loads((grid / "jobs" / "local" / os.path.basename(entry["folder"]) / "exit-codes.json").read_text())
    assert codes == {"0": 0, "1": 0, "2": 0}
    with pytest.raises(GridError, match="nothing to run in .*: 40 done, 0 failed, 0 running in live workers"):
        submit(grid, 2, executor="local")


def test_cancel_gives_rows_back_and_a_new_submit_finishes_them(project):
    grid = make_grid(project, {"task": "gridrunner.tasks.toy:steps", "outcomes": ["final_step", "steps_run", "resumed_from"],
                               "grid": {"i": [0, 1]}, "fixed": {"steps": 40, "step_s": 0.05}})
    runner = CliRunner()
    result = runner.invoke(main, ["submit", "--shards", "2", "--executor", "local"], catch_exceptions=False)
    assert result.exit_code == 0 and "started 2 local worker(s), at most 2 at a time" in result.output
    assert wait_until(lambda: statuses(grid).count("running") == 2, 30)
    time.sleep(0.5)
    result = runner.invoke(main, ["cancel"], catch_exceptions=False)
    assert result.output.startswith("cancelled local supervisor")
    wait(grid, poll_s=0.2)
    assert statuses(grid) == ["not_run", "not_run"]
    result = runner.invoke(main, ["submit", "--shards", "2", "--executor", "local", "--wait"],
                           catch_exceptions=False)
    assert result.exit_code == 0
    rows = rows_by(grid).values()
    assert [r["status"] for r in rows] == ["done", "done"]
    assert all(float(r["resumed_from"]) > 0 for r in rows)  # warm start from the checkpoint


def test_regression_two_local_submissions_in_one_second_have_their_own_logs_and_both_are_listed(project,
                                                                                                 monkeypatch):
    """Two `submit`s in the same second shared one log folder (their workers' logs interleaved, one
    exit-codes.json for both), and `status` listed only the second supervisor."""
    from gridrunner.status import current_status, to_json

    grid = make_grid(project, {"task": "gridrunner.tasks.toy:sleep", "outcomes": ["slept"],
                               "grid": {"duration": [1.5], "i": list(range(4))}})
    monkeypatch.setattr(time, "strftime", lambda *_: "20261203-080000")
    first = submit(grid, 1, executor="local")
    second = submit(grid, 1, executor="local")
    assert first.folder != second.folder
    assert sorted(os.path.basename(e["folder"]) for e in submissions(grid)) == ["20261203-080000",
                                                                               "20261203-080000-2"]
    jobs = to_json(current_status(grid))["jobs"]
    assert [job["state"] for job in jobs] == ["RUNNING", "RUNNING"]
    wait(grid, poll_s=0.2)
    assert statuses(grid) == ["done"] * 4
    for entry in submissions(grid):
        assert json.loads((project / entry["folder"] / "exit-codes.json").read_text()) == {"0": 0}


def test_regression_cancel_never_signals_a_process_that_took_a_recorded_supervisors_pid(project, request):
    """`cancel` sent SIGTERM to whatever process had the pid of a supervisor long gone."""
    import subprocess

    from gridrunner.submit import process_start, record_submission
    from gridrunner.status import current_status, to_json

    grid = make_grid(project, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "grid": {"i": [1]}})
    other = subprocess.Popen(["sleep", "60"])
    request.addfinalizer(other.kill)
    record_submission(grid, {"executor": "local", "kind": "workers", "job_ids": [f"local-{other.pid}_0"],
                             "workers": 1, "max_parallel": 1, "supervisor_pid": other.pid,
                             "supervisor_start": process_start(other.pid) - 1})  # a process that started earlier
    assert [job["state"] for job in to_json(current_status(grid))["jobs"]] == ["ENDED"]
    result = CliRunner().invoke(main, ["cancel"], catch_exceptions=False)
    assert result.exit_code == 0 and "local supervisor" not in result.output
    time.sleep(0.2)
    assert other.poll() is None  # not signalled


def test_submit_argument_errors(project):
    make_grid(project, {"task": "gridrunner.tasks.toy:noop", "outcomes": ["value"], "grid": {"i": [1]}})
    runner = CliRunner()
    result = runner.invoke(main, ["submit", "--shards", "0"])
    assert result.exit_code == 2 and "Invalid value for '--shards': must be at least 1, got 0" in result.output
    result = runner.invoke(main, ["submit", "--profile", "nope", "--executor", "local"])
    assert result.exit_code == 1
    assert result.output == (f"Error: no profile 'nope': looked for {project / 'jobs' / 'nope.yaml'} "
                             f"(profiles: none)\n")
    assert not (project / "runs" / "g" / "jobs").exists()


def test_dead_scheduler_jobs_make_rows_claimable_at_once(tmp_path):
    judge = Liveness(tmp_path, lease_s=3600, me="me:1", dead_jobs=lambda: {"77_3"})
    assert judge("node7:1234:77_3", "2099-01-01T00:00:00Z") is True
    assert judge("node7:1234:77_4", "2099-01-01T00:00:00Z") is False
