"""The lease margin on NFS mounts (gridrunner/nfs.py), over generated mount tables."""
from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from gridrunner.nfs import lease_problem, mount_of

ROOT_LINE = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw"


def _line(point: str, fstype: str, options: list[str]) -> str:
    return f"40 22 0:50 / {point} rw,relatime - {fstype} server:/export {','.join(['rw', *options])}"


options = st.fixed_dictionaries({
    "fstype": st.sampled_from(["nfs", "nfs4", "ext4", "lustre", "fuse.nfsmodel"]),
    "cto": st.sampled_from(["", "nocto", "cto"]),
    "noac": st.booleans(),
    "acregmax": st.one_of(st.none(), st.integers(0, 600)),
    "actimeo": st.one_of(st.none(), st.integers(0, 600)),
})


@given(options, st.floats(0.5, 1000))
def test_a_lease_is_refused_exactly_when_a_nocto_nfs_attribute_cache_outlasts_three_quarters_of_it(opts, lease_s):
    extra = [opts["cto"]] if opts["cto"] else []
    extra += ["noac"] if opts["noac"] else []
    extra += [f"acregmax={opts['acregmax']}"] if opts["acregmax"] is not None else []
    extra += [f"actimeo={opts['actimeo']}"] if opts["actimeo"] is not None else []
    table = "\n".join([ROOT_LINE, _line("/shared", opts["fstype"], extra)])
    problem = lease_problem("/shared/runs/g", lease_s, table)
    acregmax = opts["actimeo"] if opts["actimeo"] is not None else opts["acregmax"]
    acregmax = 60 if acregmax is None else acregmax
    expected = (opts["fstype"].startswith("nfs") and opts["cto"] == "nocto" and not opts["noac"]
                and lease_s <= 4 / 3 * acregmax)
    assert (problem is not None) == expected, (table, lease_s, problem)
    if problem:
        assert "/shared" in problem and "lease_s" in problem and "cto" in problem
    # a path on another mount is never judged by this one
    assert lease_problem("/home/x/runs/g", lease_s, table) is None


def test_the_deepest_mount_holding_the_path_is_the_one_that_counts():
    table = "\n".join([ROOT_LINE, _line("/shared", "nfs", ["nocto"]), _line("/shared/local", "ext4", [])])
    assert mount_of("/shared/local/runs", table)[0] == "/shared/local"
    assert mount_of("/shared/runs", table)[0] == "/shared"
    assert mount_of("/sharedx/runs", table)[0] == "/"
    assert lease_problem("/shared/local/runs", 5, table) is None
    assert lease_problem("/shared/runs", 5, table) is not None


def test_this_machines_own_mount_table_reads(tmp_path: Path):
    assert mount_of(tmp_path, Path("/proc/self/mountinfo").read_text()) is not None
    assert lease_problem(tmp_path, 120.0) is None
