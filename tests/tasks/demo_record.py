"""The demo's metrics recorded for the lock: what tests/tasks/test_demo_reproduces.py compares against.

Run it after a fresh `make clean-demo demo` (on a venv installed from the lock) to record again:

    .venv/bin/python tests/tasks/demo_record.py [runs/demo]

It copies the metrics of ``ROWS`` (two of the demo's cheapest rows) from the demo's shards into
``demo_metrics.json``, with the lock's hash, the versions that matter and the CPU they ran on. The file
keeps one set of rows per CPU kind (its vector extensions, which oneDNN picks its kernels by): recording
on another kind adds its rows, on the same kind replaces them, and with another lock starts afresh.
"""
from __future__ import annotations

import csv
import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "cpu.lock"
RECORD = Path(__file__).with_name("demo_metrics.json")
#: Rows of grids/demo.yaml, by parameters: two cheap ones, of both skip schemes and two losses (the
#: SSIM one fails by the demo's rule: its loss stalls, as in the study).
ROWS = [{"loss": "l1", "skip": "dncnn", "depth": 3, "filters": 8},
        {"loss": "ssim", "skip": "resnet", "depth": 3, "filters": 8}]
OUTCOMES = ["m_mae", "m_mse", "m_ssim", "bench_mae", "bench_mse", "bench_ssim"]
VERSIONS = ["tensorflow-cpu", "keras", "numpy", "scipy", "scikit-image", "nilearn", "nibabel", "sigpy"]


def lock_sha256() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """The vector extensions that oneDNN chooses its kernels by."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(flags.split(":", 1)[1].split())
    return sorted(f for f in ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in have)


def versions() -> dict:
    out = {}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(grid_dir: str = "runs/demo") -> None:
    rows = []
    for shard in sorted(Path(grid_dir, "shards").glob("shard-*.csv")):
        with open(shard, newline="") as fh:
            for row in csv.DictReader(fh):
                params = {"loss": row["loss"], "skip": row["skip"], "depth": int(row["depth"]),
                          "filters": int(row["filters"])}
                if params in ROWS:
                    assert row["status"] in ("done", "failed") and row[OUTCOMES[0]], \
                        f"{shard}: row {row['row_id']} is {row['status']} without metrics"
                    rows.append({"params": params, "row_id": row["row_id"], "status": row["status"],
                                 "error": row["error"], "metrics": {name: float(row[name]) for name in OUTCOMES}})
    rows.sort(key=lambda r: ROWS.index(r["params"]))
    assert [r["params"] for r in rows] == ROWS, f"{grid_dir} lacks some of {ROWS}"
    record = {"lock": str(LOCK.relative_to(REPO)), "lock_sha256": lock_sha256(), "versions": versions(),
              "threads": 1, "grid": "grids/demo.yaml", "by_cpu": []}
    if RECORD.exists():
        before = json.loads(RECORD.read_text())
        if (before.get("lock_sha256"), before.get("versions")) == (record["lock_sha256"], record["versions"]):
            record["by_cpu"] = [kind for kind in before.get("by_cpu", []) if kind["cpu_isa"] != cpu_isa()]
    record["by_cpu"].append({"cpu": cpu_model(), "cpu_isa": cpu_isa(), "rows": rows})
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded {len(rows)} rows for {cpu_model()} ({' '.join(cpu_isa())}) in {RECORD}; "
          f"{len(record['by_cpu'])} CPU kind(s) recorded")


def for_this_cpu(record: dict) -> dict | None:
    """The recorded rows of this machine's CPU kind, or None."""
    return next((kind for kind in record["by_cpu"] if kind["cpu_isa"] == cpu_isa()), None)


if __name__ == "__main__":
    main(*sys.argv[1:])
