"""Fixtures shared by all of gridrunner's tests.

Sections:
  Slurm  the one-node test cluster of tests/slurm/cluster.sh: the session-scoped
         ``slurm_cluster`` fixture, and the loud summary line when Slurm tests
         were skipped.

Add a new section (a banner comment and a line above) for fixtures of another
concern rather than mixing them into an existing one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import subprocess
import time
from pathlib import Path
from typing import IO, Iterator

import pytest

# ============================================================================
# Slurm
#
# Tests that need Slurm take the ``slurm_cluster`` fixture and carry
# ``@pytest.mark.slurm``. The fixture starts the cluster once per session
# (about 3 s; ``cluster.sh stop`` at the end takes 2-6 s) and exports
# SLURM_CONF, so sbatch, sacct and submitit in the test process talk to it.
#
#   GRIDRUNNER_SLURM_DIR=DIR       cluster directory (default /tmp/gridrunner-slurm).
#                                  If a live cluster runs there, it is reused and
#                                  left running; start one by hand with
#                                  `tests/slurm/cluster.sh start` to save the
#                                  start-up on repeated runs.
#   GRIDRUNNER_REQUIRE_SLURM=1     a cluster that cannot start is a test error,
#                                  not a skip (CI sets this).
#
# Without the Debian packages or root, Slurm tests are skipped, and the end of
# the run says so in a "SLURM TESTS SKIPPED" line.
# ============================================================================

SLURM_CLUSTER_SCRIPT = Path(__file__).parent / "slurm" / "cluster.sh"
SLURM_DEFAULT_DIR = Path("/tmp/gridrunner-slurm")
SLURM_START_TIMEOUT_S = 120
SLURM_STOP_TIMEOUT_S = 120

# Job states after which sacct's record no longer changes (unless requeued).
SLURM_FINISHED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

_slurm_skip_reason_key = pytest.StashKey[str]()
_slurm_skipped_tests_key = pytest.StashKey[dict]()  # node ids, in order


class SlurmUnavailable(Exception):
    """The test cluster could not be started; the message says why."""


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster, as the ``slurm_cluster`` fixture yields it."""

    directory: Path
    # False when the fixture reused a cluster that someone else started.
    owned: bool

    @property
    def conf(self) -> Path:
        return self.directory / "etc" / "slurm.conf"

    @property
    def environment(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf), "GRIDRUNNER_SLURM_DIR": str(self.directory)}

    def run(self, *command: str, timeout: float = 30) -> str:
        """Run a Slurm client command against this cluster; return its stdout."""
        result = subprocess.run(
            command,
            env={**os.environ, **self.environment},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result.stdout

    def sacct(self, job_id: str | int) -> dict[str, str]:
        """The accounting state of a job and of each of its array tasks, by job id.

        "CANCELLED by 0" reads as "CANCELLED". An empty dict means that sacct does
        not know the job yet.
        """
        output = self.run("sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", str(job_id))
        states = {}
        for line in output.splitlines():
            job, _, state = line.partition("|")
            states[job] = state.split()[0] if state else ""
        return states

    def squeue(self) -> list[str]:
        """Ids of the jobs that slurmctld still holds (pending, running, completing)."""
        return self.run("squeue", "-h", "-o", "%i").split()

    def wait_finished(self, job_id: str | int, timeout: float = 60) -> dict[str, str]:
        """Poll sacct until the job and all its array tasks have finished; return their states."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.sacct(job_id)
            if states and all(state in SLURM_FINISHED_STATES for state in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s: {states}")
            time.sleep(0.5)


def _run_cluster_script(directory: Path, command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM_CLUSTER_SCRIPT), command],
        env={**os.environ, "GRIDRUNNER_SLURM_DIR": str(directory)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _lock_cluster_directory(directory: Path) -> IO:
    """Hold a lock beside the cluster directory for this session.

    A second session starting a cluster in the same directory would stop this
    one's daemons first ("start" stops a stale instance), so it must wait its turn
    or use its own GRIDRUNNER_SLURM_DIR and GRIDRUNNER_SLURM_PORT.
    """
    lock_file = open(f"{directory}.lock", "w")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise SlurmUnavailable(
            f"another test session is using the cluster in {directory}; give this one "
            "its own GRIDRUNNER_SLURM_DIR and GRIDRUNNER_SLURM_PORT"
        ) from None
    return lock_file


def _start_cluster(directory: Path) -> None:
    try:
        result = _run_cluster_script(directory, "start", SLURM_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(
            f"tests/slurm/cluster.sh start took over {SLURM_START_TIMEOUT_S} s; "
            f"see the logs in {directory}/log"
        ) from None
    except OSError as error:  # no bash
        raise SlurmUnavailable(f"cannot run tests/slurm/cluster.sh: {error}") from None
    if result.returncode != 0:
        message = result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}"
        raise SlurmUnavailable(message.replace("cluster.sh: ", ""))


def _stop_cluster(directory: Path) -> None:
    result = _run_cluster_script(directory, "stop", SLURM_STOP_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"tests/slurm/cluster.sh stop failed:\n{result.stderr}")


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    """The one-node Slurm cluster, with SLURM_CONF exported to this process."""
    explicit_dir = os.environ.get("GRIDRUNNER_SLURM_DIR")
    directory = Path(explicit_dir or SLURM_DEFAULT_DIR).absolute()
    required = os.environ.get("GRIDRUNNER_REQUIRE_SLURM") == "1"

    reuse = bool(explicit_dir) and _run_cluster_script(directory, "status", 30).returncode == 0
    lock_file = None
    try:
        if not reuse:
            lock_file = _lock_cluster_directory(directory)
            _start_cluster(directory)
    except SlurmUnavailable as error:
        if lock_file is not None:
            lock_file.close()
        reason = f"cannot start the Slurm test cluster: {error}"
        if required:
            pytest.fail(f"{reason} (GRIDRUNNER_REQUIRE_SLURM=1)", pytrace=False)
        request.config.stash[_slurm_skip_reason_key] = reason
        pytest.skip(reason)

    cluster = SlurmCluster(directory=directory, owned=not reuse)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in cluster.environment.items():
                patch.setenv(name, value)
            yield cluster
    finally:
        if cluster.owned:
            try:
                _stop_cluster(directory)
            finally:
                lock_file.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    if outcome.get_result().skipped and item.get_closest_marker("slurm") is not None:
        item.config.stash.setdefault(_slurm_skipped_tests_key, {})[item.nodeid] = None


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    reason = config.stash.get(_slurm_skip_reason_key, None)
    skipped = config.stash.get(_slurm_skipped_tests_key, {})
    if reason is None and not skipped:
        return
    terminalreporter.section("Slurm", sep="=", red=True, bold=True)
    terminalreporter.write_line(
        f"SLURM TESTS SKIPPED ({len(skipped)}): {reason or 'see the skip reasons above'}",
        red=True,
        bold=True,
    )
    if reason is not None:
        terminalreporter.write_line(
            "Install the packages with .ci/install-slurm.sh (as root), or set "
            "GRIDRUNNER_REQUIRE_SLURM=1 to make this an error.",
            red=True,
        )
