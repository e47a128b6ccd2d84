"""Fixtures of the shared-filesystem tests: NFS-like clients of one server directory (nfsmodel.py).

Sections:
  Clients  ``nfs``: a factory that mounts clients of the test's server directory and unmounts them
           when the test ends. Where FUSE is missing the tests are skipped, and the run ends with a
           loud "FUSE TESTS SKIPPED" line; GRIDRUNNER_REQUIRE_FUSE=1 (set by CI) makes that an error.
  Project  the current directory, and ``reliability_tasks`` / ``reliability_tools`` importable, as in
           tests/reliability.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RELIABILITY = HERE.parent / "reliability"
sys.path.insert(0, str(RELIABILITY))

from nfsmodel import Mount, fuse_unavailable  # noqa: E402

# ============================================================================
# Clients
# ============================================================================

_fuse_skip_key = pytest.StashKey[str]()


class Clients:
    """The server directory of one test, and the clients mounted on it."""

    def __init__(self, root: Path):
        self.root = root
        self.server = root / "server"
        self.server.mkdir()
        self.mounts: list[Mount] = []

    def mount(self, name: str, **options) -> Path:
        """Mount client ``name`` (options: entry_ttl, attr_ttl, lookupcache, locks, power_loss)."""
        mount = Mount(self.server, self.root / name, **options)
        self.mounts.append(mount)
        return mount.mountpoint

    def get(self, mountpoint: Path) -> Mount:
        return next(m for m in self.mounts if m.mountpoint == Path(mountpoint))

    def unmount_all(self) -> None:
        for mount in self.mounts:
            mount.unmount()
        self.mounts.clear()


@pytest.fixture
def nfs(tmp_path, request):
    reason = fuse_unavailable()
    if reason is not None:
        if os.environ.get("GRIDRUNNER_REQUIRE_FUSE") == "1":
            pytest.fail(f"FUSE is required (GRIDRUNNER_REQUIRE_FUSE=1): {reason}", pytrace=False)
        request.config.stash[_fuse_skip_key] = reason
        pytest.skip(f"FUSE TESTS SKIPPED: {reason}")
    clients = Clients(tmp_path)
    try:
        yield clients
    finally:
        clients.unmount_all()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    reason = config.stash.get(_fuse_skip_key, None)
    if reason is None:
        return
    terminalreporter.section("Shared filesystem", sep="=", red=True, bold=True)
    terminalreporter.write_line(f"FUSE TESTS SKIPPED: {reason}; the NFS-client and power-loss tests did not run",
                                red=True, bold=True)
    terminalreporter.write_line("Set GRIDRUNNER_REQUIRE_FUSE=1 to make this an error.", red=True)


# ============================================================================
# Project
# ============================================================================


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The current directory for one test; worker subprocesses can import ``reliability_tasks``."""
    home = tmp_path / "project"
    home.mkdir()
    monkeypatch.chdir(home)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(RELIABILITY), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("COLUMNS", "400")
    return home


def _reliability_conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reliability_conftest", RELIABILITY / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_Reaper = _reliability_conftest().Reaper


@pytest.fixture
def reaper():
    """tests/reliability's reaper: processes a test started are killed when it ends (before the unmount)."""
    reaper = _Reaper()
    try:
        yield reaper
    finally:
        reaper.kill_all()
