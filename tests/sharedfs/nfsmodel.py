"""nfsmodel: a FUSE filesystem that serves one backing directory to several mount points, each mount an
NFS-like *client* with its own caches, and that can lose power. A test tool, not product code.

Run one process per client (``python nfsmodel.py BACKING MOUNT [options]``, or :class:`Mount`). The
backing directory on the local disk is the *server*: every operation that NFS sends to the server
(create, rename, unlink, link, mkdir, read and write of data, setattr) is done on it at once, so
``O_CREAT|O_EXCL`` and ``rename`` are exactly as atomic as the backing filesystem makes them. Each
client process keeps, in its own memory, the caches that the Linux NFS client keeps. The kernel's own
FUSE caches are switched off (``entry_timeout=0``, ``attr_timeout=0``, ``negative_timeout=0``,
``direct_io``, ``hard_remove``), so that every lookup, stat, open and read reaches this code and its
cache logic decides what the caller sees.

Modelled NFS client behaviours, with the nfs(5) option that each follows:

* **Lookups** (``lookupcache=all``, the default; ``--lookupcache positive|none`` models those values).
  A path resolves through the client's cache of path -> file for ``--entry-ttl`` seconds (the directory
  attribute timeout ``acdirmin``..``acdirmax`` decides this on Linux; here one fixed TTL). After another
  client renames a new file over the name, this client keeps resolving the name to the *old* file until
  the entry expires: the stale-dentry window. With ``all``, "no such file" is cached too; as on Linux,
  a ``create`` or ``mkdir`` that the server refuses with ``EEXIST`` drops the name's cached entry.
* **Attributes** (``acregmin``/``acregmax``/``actimeo``, one fixed ``--attr-ttl``; ``noac`` is
  ``--attr-ttl 0``). ``stat`` answers from the client's cache of a file's attributes for ``attr-ttl``
  seconds after they were fetched, while the client holds the file (a name entry or an open handle).
  The cache is per file, as NFS's is (an inode number the server reuses is another file).
* **Close-to-open** (``cto``, the default). ``open`` fetches the file's attributes from the server; if
  they changed (mtime, ctime or size) since this client cached the file's data, the data is dropped.
  A read through an open handle may then serve cached data. Nothing stronger is promised.
* **Stale handles** (``vers=3``). Handles (open files and cached names) are bound to the file, not the
  name. Opening, reading, writing or stat-ing a file that another client removed on the server (renamed
  over, unlinked) fails with ``ESTALE``, and the stale cache entry is dropped, so the next lookup goes to
  the server. A file that *this* client removed while it had it open stays readable through that handle
  (the NFS client's "silly rename"; the ``.nfsXXXX`` name it would leave is not shown).
  As on NFS, Linux's VFS retries a path operation (``open``, ``stat``) once, with a fresh lookup, when it
  fails with ``ESTALE``; so a program sees ``ESTALE`` from ``read``/``write``/``fstat`` on a descriptor
  whose file another client replaced, and a path operation opens the old file only while that file
  still exists on the server (renamed away, or linked under another name).
* **Locks** (``local_lock=all`` or ``nolock``; ``--locks local``, the default): ``flock`` and ``fcntl``
  locks are the kernel's local locks of this mount and exclude nothing on other clients.
  ``--locks enolck`` makes every lock call fail with ``ENOLCK`` (a client whose lock daemon is down).
* **The server**: ``O_CREAT|O_EXCL``, ``rename``, ``link`` and ``unlink`` are atomic on it. Writes go
  through to it at once (as with the ``sync`` option); ``fsync`` reaches it.
* **A slow server** (``--read-delay S``, fault injection): each read from the server waits first, so
  that another client can replace the file in between, and the read fails with ``ESTALE``.
* **Power loss** (``--power-loss CONTROL_DIR``, one client; as Jepsen's LazyFS). The process tracks
  what is durable: a file's data as of its last ``fsync``, a directory's entries as of its last
  ``fsync`` of that directory (so a new file, a rename or an unlink is lost at a crash unless its
  directory was fsynced after it). Everything present at mount is durable. When the file
  ``CONTROL_DIR/power-loss`` exists at unmount, the backing directory is rewritten to the durable state
  before the process exits: unsynced writes and directory changes are dropped. Mount again to "reboot".

Not modelled: adaptive attribute timeouts (one fixed TTL each), the readdir cache (``readdir`` asks
the server), write-back caching (writes are not delayed until close; they reach the server at once,
which shows other clients *more* than NFS would, never less), delegations and NFSv4 open state
(NFSv4 keeps a file open by a client readable after another client removes it; v3, modelled, does
not), renamed directories in the name cache (the cache is keyed by whole path; gridrunner renames
files only), clock skew between client and server (one machine, one clock), symlinks, xattrs, ``mmap``
(``direct_io``), partial loss of a write (a power loss drops an unsynced write entirely or keeps it as
of the last fsync), and timestamps after a power loss (the rebuilt files carry the rebuild's times).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mfusepy
from mfusepy import FUSE, FuseOSError, Operations

KERNEL_OPTIONS = dict(entry_timeout=0, attr_timeout=0, negative_timeout=0,
                      direct_io=True, hard_remove=True)
POWER_LOSS_FILE = "power-loss"
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def _now() -> float:
    return time.monotonic()


@dataclass
class Ref:
    """A file on the server as this client knows it: an ``O_PATH`` descriptor that pins its identity."""

    fd: int
    ino: int
    is_dir: bool
    users: int = 1  # cache entries and handles holding it
    # The client's caches of this file. They live on the reference, not under the inode number: the
    # server reuses the number of a deleted file, and NFS's file handles tell the two apart.
    attrs: os.stat_result | None = None
    attrs_expire: float = 0.0
    data: tuple[bytes, tuple] | None = None  # (content, the attributes' stamp when it was read)

    def reopen(self, flags: int) -> int:
        return os.open(f"/proc/self/fd/{self.fd}", flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))


@dataclass
class Handle:
    ref: Ref
    fd: int
    gen: int = -1  # power-loss mode: the file's generation


@dataclass
class Entry:
    ref: Ref | None  # None: a cached "no such file"
    expires: float


@dataclass
class Durability:
    """Power-loss mode: the volatile tree (what the server shows) and the durable one, by generation.

    A generation is one file or directory object; a rename moves it, ``link`` gives it two names.
    """

    kind: dict[int, str] = field(default_factory=dict)  # gen -> "d" or "f"
    live: dict[int, dict[str, int]] = field(default_factory=dict)  # dir gen -> {name: gen}, as it is now
    durable: dict[int, dict[str, int]] = field(default_factory=dict)  # dir gen -> {name: gen} at its last fsync
    data: dict[int, bytes] = field(default_factory=dict)  # file gen -> content at its last fsync
    next_gen: int = 1

    def scan(self, root: str) -> None:
        """Everything in ``root`` now is durable."""
        self.kind[0] = "d"

        def walk(path: str, gen: int) -> None:
            self.live[gen] = {}
            for entry in os.scandir(path):
                child = self.new(entry.is_dir(follow_symlinks=False))
                self.live[gen][entry.name] = child
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, child)
                else:
                    with open(entry.path, "rb") as fh:
                        self.data[child] = fh.read()
            self.durable[gen] = dict(self.live[gen])

        walk(root, 0)

    def new(self, is_dir: bool) -> int:
        gen = self.next_gen
        self.next_gen += 1
        self.kind[gen] = "d" if is_dir else "f"
        if is_dir:
            self.live[gen] = {}
        return gen

    def gen(self, path: str) -> int | None:
        gen = 0
        for part in [p for p in path.split("/") if p]:
            gen = self.live.get(gen, {}).get(part)
            if gen is None:
                return None
        return gen

    def parent(self, path: str) -> tuple[int | None, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        return self.gen(head or "/"), name

    def rebuild(self, root: str) -> dict:
        """Rewrite ``root`` to the durable tree; returns counts of what was kept."""
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False):
                subprocess.run(["rm", "-rf", "--", entry.path], check=True)
            else:
                os.unlink(entry.path)
        kept = {"files": 0, "dirs": 0}

        def build(path: str, gen: int) -> None:
            for name, child in self.durable.get(gen, {}).items():
                target = os.path.join(path, name)
                if self.kind.get(child) == "d":
                    os.mkdir(target)
                    kept["dirs"] += 1
                    build(target, child)
                else:
                    with open(target, "wb") as fh:
                        fh.write(self.data.get(child, b""))
                    kept["files"] += 1

        build(root, 0)
        return kept


class Client(Operations):
    """One NFS-like client of the server directory ``backing``. See the module docstring."""

    use_ns = True

    def __init__(self, backing: str, entry_ttl: float, attr_ttl: float, lookupcache: str = "all",
                 locks: str = "local", power_loss: str | None = None, read_delay: float = 0.0):
        self.root = os.path.realpath(backing)
        self.read_delay = read_delay
        self.entry_ttl = entry_ttl
        self.attr_ttl = attr_ttl
        self.lookupcache = lookupcache
        self.power_loss = power_loss
        self.entries: dict[str, Entry] = {}
        self.refs: dict[int, Ref] = {}  # ino -> the reference that pins that file, while one does
        self.handles: dict[int, Handle] = {}
        self.silly: set[int] = set()  # inodes this client removed while it had them open
        self.next_fh = 1
        self.durability = Durability() if power_loss else None
        if self.durability is not None:
            self.durability.scan(self.root)
        if locks == "enolck":
            self.lock = self._no_lock
            self.flock = self._no_lock

    # ---- the server

    def _server(self, path: str) -> str:
        return self.root + path if path != "/" else self.root

    def _lookup_server(self, path: str) -> Ref:
        """LOOKUP at the server: a reference with one user (the caller)."""
        fd = os.open(self._server(path), os.O_PATH | os.O_NOFOLLOW)
        st = os.fstat(fd)
        ref = self.refs.get(st.st_ino)
        if ref is not None:  # pinned by our descriptor, so the very same file: keep its caches
            os.close(fd)
            ref.users += 1
            return ref
        ref = self.refs[st.st_ino] = Ref(fd, st.st_ino, stat.S_ISDIR(st.st_mode))
        return ref

    def _drop_ref(self, ref: Ref | None) -> None:
        if ref is not None:
            ref.users -= 1
            if ref.users <= 0:
                os.close(ref.fd)
                if self.refs.get(ref.ino) is ref:
                    del self.refs[ref.ino]
                    self.silly.discard(ref.ino)

    def _fetch_attrs(self, ref: Ref) -> os.stat_result:
        """GETATTR at the server: ESTALE if another client removed the file."""
        st = os.fstat(ref.fd)
        if st.st_nlink == 0 and ref.ino not in self.silly:
            ref.attrs = None
            raise FuseOSError(errno.ESTALE)
        ref.attrs, ref.attrs_expire = st, _now() + self.attr_ttl
        return st

    # ---- the name cache

    def _set_entry(self, path: str, ref: Ref | None) -> None:
        old = self.entries.pop(path, None)
        if old is not None:
            self._drop_ref(old.ref)
        if ref is None and self.lookupcache != "all":
            return
        if self.lookupcache == "none" or self.entry_ttl <= 0:
            if ref is not None:
                self._drop_ref(ref)
            return
        self.entries[path] = Entry(ref, _now() + self.entry_ttl)

    def _forget(self, path: str) -> None:
        old = self.entries.pop(path, None)
        if old is not None:
            self._drop_ref(old.ref)

    def _resolve(self, path: str) -> Ref:
        """The file that ``path`` names for this client (a reference the caller must drop)."""
        entry = self.entries.get(path)
        if entry is not None and entry.expires > _now():
            if entry.ref is None:
                raise FuseOSError(errno.ENOENT)
            entry.ref.users += 1
            return entry.ref
        try:
            ref = self._lookup_server(path)
        except FileNotFoundError:
            self._set_entry(path, None)
            raise
        ref.users += 1  # one for the cache entry, one for the caller
        self._set_entry(path, ref)
        return ref

    def _stale(self, path: str, ref: Ref) -> None:
        """``ref`` turned out removed on the server: forget the name, so the next lookup asks the server."""
        entry = self.entries.get(path)
        if entry is not None and entry.ref is ref:
            self._forget(path)

    def _attrs_of(self, path: str, ref: Ref, fresh: bool = False) -> os.stat_result:
        if not fresh and ref.attrs is not None and ref.attrs_expire > _now():
            return ref.attrs
        try:
            return self._fetch_attrs(ref)
        except FuseOSError:
            self._stale(path, ref)
            raise

    @staticmethod
    def _as_dict(st: os.stat_result) -> dict:
        return {"st_mode": st.st_mode, "st_nlink": max(st.st_nlink, 1), "st_size": st.st_size,
                "st_uid": st.st_uid, "st_gid": st.st_gid, "st_atime": st.st_atime_ns,
                "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns, "st_ino": st.st_ino,
                "st_blocks": st.st_blocks, "st_blksize": st.st_blksize}

    # ---- attributes

    def getattr(self, path, fh=None):
        if fh is not None and fh in self.handles:
            handle = self.handles[fh]
            return self._as_dict(self._attrs_of(path, handle.ref))
        ref = self._resolve(path)
        try:
            return self._as_dict(self._attrs_of(path, ref))
        finally:
            self._drop_ref(ref)

    def _setattr(self, path: str, fh, change) -> None:
        ref = self.handles[fh].ref if fh is not None and fh in self.handles else self._resolve(path)
        try:
            self._attrs_of(path, ref, fresh=True)  # ESTALE if gone
            change(f"/proc/self/fd/{ref.fd}")
            ref.attrs = None
        finally:
            if fh is None or fh not in self.handles:
                self._drop_ref(ref)

    def chmod(self, path, mode):
        self._setattr(path, None, lambda p: os.chmod(p, mode))

    def chown(self, path, uid, gid):
        self._setattr(path, None, lambda p: os.chown(p, uid, gid))

    def utimens(self, path, times=None):
        def change(p):
            if not times:
                return os.utime(p)
            # The kernel passes utime(NULL) and touch's "now" as UTIME_NOW, and "leave it" as UTIME_OMIT,
            # in the nanoseconds field (mfusepy hands them over as tv_sec * 1e9 + tv_nsec, tv_sec 0).
            st = os.stat(p)
            now = time.time_ns()
            atime, mtime = ((now if t == UTIME_NOW else old if t == UTIME_OMIT else t)
                            for t, old in zip(times, (st.st_atime_ns, st.st_mtime_ns)))
            os.utime(p, ns=(atime, mtime))
        self._setattr(path, None, change)

    def truncate(self, path, length, fh=None):
        def change(p):
            fd = os.open(p, os.O_WRONLY)
            try:
                os.ftruncate(fd, length)
            finally:
                os.close(fd)
        self._setattr(path, fh, change)

    def access(self, path, amode):
        ref = self._resolve(path)
        self._drop_ref(ref)
        return 0

    def statfs(self, path):
        st = os.statvfs(self.root)
        return {key: getattr(st, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                   "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

    # ---- open files

    def _new_handle(self, ref: Ref, fd: int, path: str) -> int:
        fh = self.next_fh
        self.next_fh += 1
        ref.users += 1
        gen = -1
        if self.durability is not None:
            gen = self.durability.gen(path)
            gen = -1 if gen is None else gen
        self.handles[fh] = Handle(ref, fd, gen)
        return fh

    def open(self, path, flags):
        ref = self._resolve(path)
        try:
            st = self._attrs_of(path, ref, fresh=True)  # close-to-open: the server's attributes
            if ref.data is not None and ref.data[1] != self._stamp(st):
                ref.data = None
            fd = ref.reopen(flags)
            if flags & os.O_TRUNC:
                os.ftruncate(fd, 0)
                ref.data = ref.attrs = None
            return self._new_handle(ref, fd, path)
        finally:
            self._drop_ref(ref)

    def create(self, path, mode, flags=os.O_WRONLY):
        try:
            fd = os.open(self._server(path), flags | os.O_CREAT, mode)
        except FileExistsError:
            self._forget(path)  # as Linux's NFS client drops the name's cached entry when the server says EEXIST
            raise
        try:
            ref = self._lookup_server(path)
        except OSError:
            os.close(fd)
            raise
        if self.durability is not None and self.durability.gen(path) is None:
            parent, name = self.durability.parent(path)
            if parent is not None:
                self.durability.live[parent][name] = self.durability.new(False)
        ref.data = ref.attrs = None  # created, or opened and maybe truncated
        ref.users += 1
        self._set_entry(path, ref)
        try:
            return self._new_handle(ref, fd, path)
        finally:
            self._drop_ref(ref)

    @staticmethod
    def _stamp(st: os.stat_result) -> tuple:
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _check_handle(self, path: str, handle: Handle) -> None:
        """READ/WRITE name the file by its handle: ESTALE once another client removed it."""
        if os.fstat(handle.fd).st_nlink == 0 and handle.ref.ino not in self.silly:
            self._stale(path, handle.ref)
            raise FuseOSError(errno.ESTALE)

    def read(self, path, size, offset, fh):
        handle = self.handles[fh]
        cached = handle.ref.data
        if cached is None:
            if self.read_delay:
                time.sleep(self.read_delay)  # a slow server: other clients act between open and read
            self._check_handle(path, handle)
            st = os.fstat(handle.fd)
            content = os.pread(handle.fd, max(st.st_size, 1 << 16), 0)
            while len(content) < st.st_size:
                more = os.pread(handle.fd, st.st_size - len(content), len(content))
                if not more:
                    break
                content += more
            cached = handle.ref.data = (content, self._stamp(st))
        return cached[0][offset: offset + size]

    def write(self, path, data, offset, fh):
        handle = self.handles[fh]
        self._check_handle(path, handle)
        handle.ref.data = handle.ref.attrs = None
        return os.pwrite(handle.fd, data, offset)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        handle = self.handles[fh]
        self._check_handle(path, handle)
        os.fsync(handle.fd)
        if self.durability is not None and handle.gen >= 0:
            with open(handle.ref.reopen(os.O_RDONLY), "rb") as fh:  # the handle may be write-only
                self.durability.data[handle.gen] = fh.read()
        return 0

    def release(self, path, fh):
        handle = self.handles.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
            self._drop_ref(handle.ref)
        return 0

    def _no_lock(self, *args):
        raise FuseOSError(errno.ENOLCK)

    # ---- directories

    def opendir(self, path):
        ref = self._resolve(path)
        try:
            self._attrs_of(path, ref, fresh=True)
        finally:
            self._drop_ref(ref)
        return 0

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._server(path))

    def releasedir(self, path, fh):
        return 0

    def fsyncdir(self, path, datasync, fh):
        fd = os.open(self._server(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.durability is not None:
            gen = self.durability.gen(path)
            if gen is not None:
                self.durability.durable[gen] = dict(self.durability.live[gen])
        return 0

    def mkdir(self, path, mode):
        try:
            os.mkdir(self._server(path), mode)
        except FileExistsError:
            self._forget(path)  # as create
            raise
        self._forget(path)
        if self.durability is not None:
            parent, name = self.durability.parent(path)
            if parent is not None:
                self.durability.live[parent][name] = self.durability.new(True)
        return 0

    def _note_removed(self, path: str) -> None:
        """Before this client removes the server's file at ``path``: keep its own open handles readable."""
        try:
            ino = os.lstat(self._server(path)).st_ino
        except FileNotFoundError:
            return
        if any(h.ref.ino == ino for h in self.handles.values()):
            self.silly.add(ino)

    def unlink(self, path):
        self._note_removed(path)
        os.unlink(self._server(path))
        self._set_entry(path, None)
        if self.durability is not None:
            parent, name = self.durability.parent(path)
            if parent is not None:
                self.durability.live[parent].pop(name, None)
        return 0

    def rmdir(self, path):
        os.rmdir(self._server(path))
        self._set_entry(path, None)
        if self.durability is not None:
            parent, name = self.durability.parent(path)
            if parent is not None:
                self.durability.live[parent].pop(name, None)
        return 0

    def rename(self, old, new):
        self._note_removed(new)
        os.rename(self._server(old), self._server(new))
        moved = self.entries.get(old)
        ref = moved.ref if moved is not None and moved.ref is not None else None
        if ref is not None:
            ref.users += 1
        self._set_entry(old, None)
        if ref is not None:
            self._set_entry(new, ref)
        else:
            self._forget(new)
        if self.durability is not None:
            (old_parent, old_name), (new_parent, new_name) = self.durability.parent(old), self.durability.parent(new)
            gen = self.durability.live.get(old_parent, {}).pop(old_name, None) if old_parent is not None else None
            if gen is not None and new_parent is not None:
                self.durability.live[new_parent][new_name] = gen
        return 0

    def link(self, target, source):
        os.link(self._server(source), self._server(target))
        self._forget(target)
        if self.durability is not None:
            gen = self.durability.gen(source)
            parent, name = self.durability.parent(target)
            if gen is not None and parent is not None:
                self.durability.live[parent][name] = gen
        return 0

    def destroy(self, path):
        for handle in list(self.handles.values()):
            os.close(handle.fd)
        self.handles.clear()
        if self.power_loss and os.path.exists(os.path.join(self.power_loss, POWER_LOSS_FILE)):
            kept = self.durability.rebuild(self.root)
            Path(self.power_loss, "rebuilt").write_text(f"{kept['files']} files, {kept['dirs']} dirs\n")


class _FUSE(FUSE):
    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        if flags:  # RENAME_NOREPLACE / RENAME_EXCHANGE: not modelled, and never silently ignored
            return -errno.EINVAL
        return self.rename_fuse_2(old, new)


# --------------------------------------------------------------------------- mounting, for tests


def fuse_unavailable() -> str | None:
    """Why no FUSE filesystem can be mounted here, or None if one can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if subprocess.run(["which", "fusermount3"], capture_output=True).returncode != 0:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


class Mount:
    """One client: a running nfsmodel process serving ``backing`` at ``mountpoint``."""

    def __init__(self, backing: Path, mountpoint: Path, entry_ttl: float = 2.0, attr_ttl: float = 2.0,
                 lookupcache: str = "all", locks: str = "local", power_loss: Path | None = None,
                 read_delay: float = 0.0, log_file: Path | None = None):
        self.backing, self.mountpoint = Path(backing), Path(mountpoint)
        self.power_loss = power_loss
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, __file__, str(backing), str(mountpoint), "--entry-ttl", str(entry_ttl),
                   "--attr-ttl", str(attr_ttl), "--lookupcache", lookupcache, "--locks", locks]
        if power_loss is not None:
            command += ["--power-loss", str(power_loss)]
        if read_delay:
            command += ["--read-delay", str(read_delay)]
        self.log_file = log_file or self.mountpoint.with_name(self.mountpoint.name + ".log")
        with open(self.log_file, "w") as log_fh:
            self.proc = subprocess.Popen(command, stdout=log_fh, stderr=log_fh)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"nfsmodel did not mount {mountpoint}: {self.log_file.read_text()[-2000:]}")
            time.sleep(0.02)

    def unmount(self, power_loss: bool = False) -> None:
        """Unmount (after a power loss, with ``power_loss=True``) and wait for the process to exit."""
        if power_loss:
            Path(self.power_loss, POWER_LOSS_FILE).write_text("now")
        if self.proc.poll() is None:
            deadline = time.monotonic() + 5  # a file still open (a failing test's) keeps it busy: then lazily
            while subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True).returncode:
                if time.monotonic() > deadline:
                    subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
                    break
                time.sleep(0.1)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if power_loss:
            Path(self.power_loss, POWER_LOSS_FILE).unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--entry-ttl", type=float, default=2.0)
    parser.add_argument("--attr-ttl", type=float, default=2.0)
    parser.add_argument("--lookupcache", choices=["all", "positive", "none"], default="all")
    parser.add_argument("--locks", choices=["local", "enolck"], default="local")
    parser.add_argument("--power-loss", metavar="CONTROL_DIR")
    parser.add_argument("--read-delay", type=float, default=0.0, metavar="S",
                        help="wait S seconds before each read from the server (fault injection: it widens the "
                             "window in which another client replaces a file this one has open)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    client = Client(args.backing, args.entry_ttl, args.attr_ttl, args.lookupcache, args.locks, args.power_loss,
                    args.read_delay)
    _FUSE(client, args.mountpoint, foreground=True, nothreads=True, fsname="nfsmodel", **KERNEL_OPTIONS)


if __name__ == "__main__":
    main()
