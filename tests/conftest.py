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
# (3-10 s; ``cluster.sh stop`` at the end takes 2-6 s) and exports SLURM_CONF,
# so sbatch, sacct and submitit in the test process talk to it.
#
#   GRIDRUNNER_SLURM_DIR=DIR       cluster directory. If a live cluster runs
#                                  there, it is reused and left running: start
#                                  one by hand with `tests/slurm/cluster.sh start`
#                                  to save the start-up on repeated runs.
#   GRIDRUNNER_SLURM_PORT=PORT     its first port (cluster.sh uses PORT..PORT+3).
#   GRIDRUNNER_REQUIRE_SLURM=1     a cluster that cannot start is a test error,
#                                  not a skip (CI sets this).
#
# Without GRIDRUNNER_SLURM_DIR, each session takes the first free slot: slot 0
# is /tmp/gridrunner-slurm on ports 16817-16820, slot k is
# /tmp/gridrunner-slurm-k on ports 16817+10k onwards. A lock file beside the
# directory, held for the session, keeps concurrent sessions (several people
# running `make test` on one machine) from stopping each other's cluster.
#
# Without the Debian packages or root, Slurm tests are skipped, and the end of
# the run says so in a "SLURM TESTS SKIPPED" line.
# ============================================================================

SLURM_CLUSTER_SCRIPT = Path(__file__).parent / "slurm" / "cluster.sh"
SLURM_DEFAULT_DIR = Path("/tmp/gridrunner-slurm")
SLURM_DEFAULT_PORT = 16817
SLURM_SLOTS = 8
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
    port: int
    # False when the fixture reused a cluster that someone else started.
    owned: bool = True

    @property
    def conf(self) -> Path:
        return self.directory / "etc" / "slurm.conf"

    @property
    def environment(self) -> dict[str, str]:
        """What a client process needs to talk to this cluster."""
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


def _run_cluster_script(
    cluster: SlurmCluster, command: str, timeout: float
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM_CLUSTER_SCRIPT), command],
        env={
            **os.environ,
            "GRIDRUNNER_SLURM_DIR": str(cluster.directory),
            "GRIDRUNNER_SLURM_PORT": str(cluster.port),
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run_or_raise_unavailable(cluster: SlurmCluster, command: str, timeout: float) -> None:
    try:
        result = _run_cluster_script(cluster, command, timeout)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(
            f"tests/slurm/cluster.sh {command} took over {timeout} s; "
            f"see the logs in {cluster.directory}/log"
        ) from None
    except OSError as error:  # no bash
        raise SlurmUnavailable(f"cannot run tests/slurm/cluster.sh: {error}") from None
    if result.returncode != 0:
        message = result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}"
        raise SlurmUnavailable(message.replace("cluster.sh: ", ""))


def _try_lock(cluster: SlurmCluster) -> IO | None:
    """Lock the file beside the cluster directory; None if another session holds it.

    cluster.sh start first stops whatever runs in its directory, so only the
    session holding this lock may start or stop the cluster there.
    """
    try:
        lock_file = open(f"{cluster.directory}.lock", "w")
    except OSError as error:
        raise SlurmUnavailable(f"cannot open the cluster's lock file: {error}") from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        return None
    return lock_file


def _candidate_clusters() -> list[SlurmCluster]:
    port = int(os.environ.get("GRIDRUNNER_SLURM_PORT", SLURM_DEFAULT_PORT))
    if os.environ.get("GRIDRUNNER_SLURM_DIR"):
        return [SlurmCluster(Path(os.environ["GRIDRUNNER_SLURM_DIR"]).absolute(), port)]
    return [
        SlurmCluster(
            SLURM_DEFAULT_DIR if slot == 0 else Path(f"{SLURM_DEFAULT_DIR}-{slot}"),
            port + 10 * slot,
        )
        for slot in range(SLURM_SLOTS)
    ]


def _start_cluster() -> tuple[SlurmCluster, IO]:
    """Start a cluster in the first free slot; return it and the lock to hold until it stops."""
    candidates = _candidate_clusters()
    _run_or_raise_unavailable(candidates[0], "check", 30)
    for cluster in candidates:
        lock_file = _try_lock(cluster)
        if lock_file is None:
            continue
        try:
            _run_or_raise_unavailable(cluster, "start", SLURM_START_TIMEOUT_S)
        except BaseException:
            lock_file.close()
            raise
        return cluster, lock_file
    raise SlurmUnavailable(
        "other test sessions hold the lock of every cluster directory tried: "
        + ", ".join(str(cluster.directory) for cluster in candidates)
    )


def _stop_cluster(cluster: SlurmCluster) -> None:
    result = _run_cluster_script(cluster, "stop", SLURM_STOP_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"tests/slurm/cluster.sh stop failed:\n{result.stderr}")


def _running_cluster_to_reuse() -> SlurmCluster | None:
    """The cluster in an explicitly given GRIDRUNNER_SLURM_DIR, if it runs."""
    if not os.environ.get("GRIDRUNNER_SLURM_DIR"):
        return None
    (cluster,) = _candidate_clusters()
    if _run_cluster_script(cluster, "status", 30).returncode != 0:
        return None
    return dataclasses.replace(cluster, owned=False)


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    """The one-node Slurm cluster, with SLURM_CONF exported to this process."""
    cluster = _running_cluster_to_reuse()
    lock_file = None
    reason = None
    if cluster is None:
        try:
            cluster, lock_file = _start_cluster()
        except SlurmUnavailable as error:
            reason = f"cannot start the Slurm test cluster: {error}"
    if reason is not None:
        if os.environ.get("GRIDRUNNER_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason} (GRIDRUNNER_REQUIRE_SLURM=1)", pytrace=False)
        request.config.stash[_slurm_skip_reason_key] = reason
        pytest.skip(reason)

    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in cluster.environment.items():
                patch.setenv(name, value)
            yield cluster
    finally:
        if cluster.owned:
            try:
                _stop_cluster(cluster)
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
    terminalreporter.write_line("Set GRIDRUNNER_REQUIRE_SLURM=1 to make this an error.", red=True)
