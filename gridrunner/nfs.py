"""What NFS mount options mean for a grid: the lease margin that heartbeats need on a ``nocto`` mount.

Workers judge another worker's heartbeat by the mtime of its file, fetched with an ``open`` (the worker
module). On NFS an ``open`` fetches the attributes from the server (close-to-open, the ``cto`` default),
so that mtime is never older than one heartbeat interval (``lease_s / 4``). On a ``nocto`` mount the
``open`` may answer from the attribute cache, so the mtime can be up to ``acregmax`` seconds older, and a
live worker's rows would be reclaimed unless ``lease_s / 4 + acregmax < lease_s``, that is
``lease_s > 4/3 · acregmax``. :func:`lease_problem` finds the grid's mount in ``/proc/self/mountinfo``
and says when that does not hold (tests/sharedfs shows the failure on a model of the attribute cache).
"""
from __future__ import annotations

import os
from pathlib import Path

ACREGMAX_DEFAULT_S = 60.0  # nfs(5)


def mount_of(path: str | Path, mountinfo: str) -> tuple[str, str, dict[str, str]] | None:
    """(mount point, filesystem type, options) of the mount that holds ``path``, from mountinfo text."""
    target = os.path.realpath(path)
    best = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 6:
            continue
        left, _, right = line.partition(" - ")
        point = left.split()[4].replace("\\040", " ")
        right_fields = right.split()
        if len(right_fields) < 3:
            continue
        fstype = right_fields[0]
        options = {}
        for option in (left.split()[5] + "," + right_fields[2]).split(","):
            key, _, value = option.partition("=")
            options[key] = value
        if (target == point or target.startswith(point.rstrip("/") + "/")) and (
                best is None or len(point) >= len(best[0])):
            best = (point, fstype, options)
    return best


def lease_problem(grid_dir: str | Path, lease_s: float, mountinfo: str | None = None) -> str | None:
    """Why ``lease_s`` is too short for the grid's NFS mount, or None if it is long enough (or not NFS)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    mount = mount_of(grid_dir, mountinfo)
    if mount is None or not mount[1].startswith("nfs"):
        return None
    point, _, options = mount
    if "nocto" not in options or "noac" in options:
        return None
    try:
        acregmax = float(options.get("actimeo") or options.get("acregmax") or ACREGMAX_DEFAULT_S)
    except ValueError:
        acregmax = ACREGMAX_DEFAULT_S
    if lease_s > 4.0 / 3.0 * acregmax:
        return None
    return (f"{grid_dir} is on NFS ({point}) mounted nocto with acregmax {acregmax:g} s: a live worker's "
            f"heartbeat can look {acregmax:g} s older than it is, so lease_s {lease_s:g} s must exceed "
            f"{4.0 / 3.0 * acregmax:g} s (4/3 of acregmax) or its rows get reclaimed while it runs them; "
            f"raise lease_s (the spec, the profile or --lease), or mount with cto (the default)")
