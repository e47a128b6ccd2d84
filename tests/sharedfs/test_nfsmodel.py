"""The NFS model itself: each client behaviour that nfsmodel.py claims to model, shown on two mounts.

Every test uses two clients of one server directory with short cache times, and checks what the
second client sees after the first one changes something.
"""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time

import pytest

TTL = 1.0


def _write(path, text: str, fsync: bool = False) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_client_opens_the_old_file_under_a_cached_name_until_the_entry_expires(nfs):
    a, b = nfs.mount("a", entry_ttl=TTL, attr_ttl=TTL), nfs.mount("b", entry_ttl=TTL, attr_ttl=TTL)
    _write(a / "f", "old")
    assert (b / "f").read_text() == "old"  # b caches the name f -> the old file
    os.rename(a / "f", a / "kept")  # the old file still exists on the server, under another name
    _write(a / "f", "new")
    assert (a / "f").read_text() == "new"
    assert (b / "f").read_text() == "old", "b should still resolve f through its cached entry"
    time.sleep(TTL + 0.2)
    assert (b / "f").read_text() == "new"


def test_a_cached_no_such_file_hides_another_clients_new_file_unless_lookupcache_is_positive(nfs):
    a = nfs.mount("a", entry_ttl=TTL, attr_ttl=TTL)
    b = nfs.mount("b", entry_ttl=TTL, attr_ttl=TTL)
    c = nfs.mount("c", entry_ttl=TTL, attr_ttl=TTL, lookupcache="positive")
    assert not (b / "g").exists() and not (c / "g").exists()
    _write(a / "g", "x")
    assert not (b / "g").exists(), "lookupcache=all caches the negative lookup"
    assert (c / "g").exists(), "lookupcache=positive does not"
    # O_EXCL asks the server even under a cached negative entry
    with pytest.raises(FileExistsError):
        os.open(b / "g", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    time.sleep(TTL + 0.2)
    assert (b / "g").exists()


def test_stat_serves_cached_attributes_and_open_revalidates_them(nfs):
    a, b = nfs.mount("a", entry_ttl=5, attr_ttl=TTL), nfs.mount("b", entry_ttl=5, attr_ttl=TTL)
    _write(a / "hb", "beat")
    before = os.stat(b / "hb").st_mtime
    os.utime(a / "hb", (before + 100, before + 100))
    assert os.stat(a / "hb").st_mtime == before + 100
    assert os.stat(b / "hb").st_mtime == before, "b's attribute cache should still hold the old mtime"
    with open(b / "hb", "rb") as fh:  # close-to-open: open fetches the attributes from the server
        assert os.fstat(fh.fileno()).st_mtime == before + 100
    time.sleep(TTL + 0.2)
    assert os.stat(b / "hb").st_mtime == before + 100


def test_touching_a_file_sets_its_mtime_to_now(nfs):
    a = nfs.mount("a", entry_ttl=TTL, attr_ttl=0)
    _write(a / "hb", "")
    os.utime(a / "hb", (1, 1))
    os.utime(a / "hb")  # what a heartbeat does: the kernel sends UTIME_NOW
    assert abs(os.stat(a / "hb").st_mtime - time.time()) < 5


def test_open_drops_cached_data_of_a_file_that_changed(nfs):
    a, b = nfs.mount("a", entry_ttl=5, attr_ttl=5), nfs.mount("b", entry_ttl=5, attr_ttl=5)
    _write(a / "d", "one")
    assert (b / "d").read_text() == "one"
    with open(a / "d", "a") as fh:
        fh.write(" two")
    assert (b / "d").read_text() == "one two"


def test_reading_a_file_that_another_client_replaced_fails_with_estale_and_a_reopen_reads_the_new_one(nfs):
    a, b = nfs.mount("a", entry_ttl=5, attr_ttl=5), nfs.mount("b", entry_ttl=5, attr_ttl=5)
    _write(a / "shard", "v1")
    fd = os.open(b / "shard", os.O_RDONLY)  # b opens v1 and has read nothing yet
    _write(a / "tmp", "v2")
    os.rename(a / "tmp", a / "shard")  # v1 is deleted on the server
    with pytest.raises(OSError) as caught:
        os.read(fd, 100)
    assert caught.value.errno == errno.ESTALE
    os.close(fd)
    # a path operation retries a stale handle with a fresh lookup, as Linux's VFS does over NFS
    assert (b / "shard").read_text() == "v2"


def test_a_file_this_client_removed_while_open_stays_readable_through_its_handle(nfs):
    a = nfs.mount("a", entry_ttl=5, attr_ttl=5)
    _write(a / "f", "mine")
    fd = os.open(a / "f", os.O_RDONLY)
    os.unlink(a / "f")
    assert os.read(fd, 100) == b"mine"
    os.close(fd)


def test_o_excl_create_has_exactly_one_winner_across_clients(nfs):
    a, b = nfs.mount("a", entry_ttl=TTL, attr_ttl=TTL), nfs.mount("b", entry_ttl=TTL, attr_ttl=TTL)
    for i in range(50):
        wins = 0
        for client in (a, b, a, b):
            try:
                os.close(os.open(client / f"lock{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                wins += 1
            except FileExistsError:
                pass
        assert wins == 1


def _can_lock(path, kind: str) -> bool:
    """Whether another process can take an exclusive lock on ``path`` now (POSIX locks are per process)."""
    code = (f"import fcntl; fh = open({str(path)!r}, 'w'); "
            f"fcntl.{kind}(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_flock_and_fcntl_locks_exclude_within_one_client_only(nfs):
    a, b = nfs.mount("a"), nfs.mount("b")
    _write(a / "lk", "")
    for kind in ("flock", "lockf"):
        with open(a / "lk", "w") as held:
            getattr(fcntl, kind)(held, fcntl.LOCK_EX)
            assert not _can_lock(a / "lk", kind), f"{kind} should exclude on the same client"
            assert _can_lock(b / "lk", kind), f"{kind} should not exclude across clients"


def test_locks_fail_with_enolck_on_a_client_without_a_lock_daemon(nfs):
    c = nfs.mount("c", locks="enolck")
    _write(c / "lk", "")
    for lock in (fcntl.flock, fcntl.lockf):
        with open(c / "lk", "w") as fh:
            with pytest.raises(OSError) as caught:
                lock(fh, fcntl.LOCK_EX)
            assert caught.value.errno == errno.ENOLCK


def test_a_power_loss_drops_unsynced_data_and_renames_whose_directory_was_not_fsynced(nfs, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    (nfs.server / "old").write_text("durable at mount")
    (nfs.server / "d").mkdir()
    a = nfs.mount("a", power_loss=control)
    _write(a / "old", "rewritten, never fsynced")
    _write(a / "d" / "synced", "data and name synced", fsync=True)
    _fsync_dir(a / "d")
    _write(a / "d" / "data-only", "data synced, name not", fsync=True)
    _write(a / "tmp", "renamed over a file, fsynced, directory not", fsync=True)
    _write(a / "tmp2", "renamed, directory fsynced after", fsync=True)
    _write(a / "kept", "x", fsync=True)
    _fsync_dir(a)
    os.rename(a / "tmp2", a / "moved")
    _fsync_dir(a)
    os.rename(a / "tmp", a / "kept")  # as write_atomic did: fsync the file, rename, no directory fsync
    _write(a / "moved", "rewritten after its rename, not fsynced")
    _write(a / "lost", "new, never synced")
    nfs.get(a).unmount(power_loss=True)
    assert sorted(p.name for p in nfs.server.iterdir()) == ["d", "kept", "moved", "old", "tmp"]
    assert (nfs.server / "old").read_text() == "durable at mount"
    assert sorted(p.name for p in (nfs.server / "d").iterdir()) == ["synced"]
    assert (nfs.server / "d" / "synced").read_text() == "data and name synced"
    assert (nfs.server / "kept").read_text() == "x", "the rename over kept was not durable"
    assert (nfs.server / "tmp").read_text() == "renamed over a file, fsynced, directory not"
    assert (nfs.server / "moved").read_text() == "renamed, directory fsynced after"
