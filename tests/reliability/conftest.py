"""Fixtures of the reliability tests: a project directory, and a small tmpfs to fill up.

Sections:
  Project   ``project``: a temporary project directory (with a space and a quote in its path) that
            is the current directory, with ``reliability_tasks`` importable by worker processes.
  Processes ``reaper``: every process a test starts is handed to it, and whatever is still alive when
            the test ends (passed or failed) is killed, so a failing test leaves no worker or reader behind.
  Disk      ``small_disk``: a tmpfs mounted for one test (needs root); where none can be mounted the
            test is skipped and the run ends with a loud "DISK-FULL TESTS SKIPPED" line.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# ============================================================================
# Project
# ============================================================================


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The current directory for one test; worker subprocesses can import ``reliability_tasks``."""
    home = tmp_path / "project 'q'"
    home.mkdir()
    monkeypatch.chdir(home)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps `status` lines at 80 columns otherwise
    return home


# ============================================================================
# Processes
# ============================================================================


class Reaper:
    """Processes a test started (``subprocess.Popen`` objects or forked pids), killed when the test ends."""

    def __init__(self):
        self.procs: list = []

    def __call__(self, proc):
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if isinstance(proc, int):
                # Only a child not yet waited for is signalled: a reaped pid may belong to someone else now.
                try:
                    if os.waitpid(proc, os.WNOHANG) != (0, 0):
                        continue
                except ChildProcessError:
                    continue
                os.kill(proc, signal.SIGCONT)  # a stopped process dies only once it runs again
                os.kill(proc, signal.SIGKILL)
                os.waitpid(proc, 0)
            elif proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture
def reaper():
    reaper = Reaper()
    try:
        yield reaper
    finally:
        reaper.kill_all()


# ============================================================================
# Disk
#
# The disk-full tests mount a tmpfs of a few hundred KiB under the test's temporary directory and
# fill it. Mounting needs root (CI runs as root); elsewhere they are skipped, loudly.
# ============================================================================

_disk_skip_key = pytest.StashKey[str]()


class SmallDisk:
    """A mounted tmpfs of ``size_kib`` KiB at ``path``, with a filler file to run it out of space."""

    PAGE = 4096

    def __init__(self, path: Path, size_kib: int):
        self.path = path
        self.size_kib = size_kib
        self.filler = path / "filler.bin"

    def fill(self, leave_pages: int = 0) -> int:
        """Take every free page, then give back ``leave_pages`` of them. Returns the filler's size."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            block = b"\0" * self.PAGE
            while True:
                try:
                    os.write(fd, block)
                except OSError:
                    break
            size = os.fstat(fd).st_size
            size -= size % self.PAGE
            os.ftruncate(fd, max(size - leave_pages * self.PAGE, 0))
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path, request):
    path = tmp_path / "small disk"
    path.mkdir()
    size_kib = 512
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs ({(result.stderr or result.stdout).strip() or result.returncode}); " \
                 f"the disk-full tests need root"
        request.config.stash[_disk_skip_key] = reason
        pytest.skip(f"DISK-FULL TESTS SKIPPED: {reason}")
    try:
        yield SmallDisk(path, size_kib)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    reason = config.stash.get(_disk_skip_key, None)
    if reason is None:
        return
    terminalreporter.section("Disk full", sep="=", red=True, bold=True)
    terminalreporter.write_line(f"DISK-FULL TESTS SKIPPED: {reason}", red=True, bold=True)
