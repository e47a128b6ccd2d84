"""bench/bench_gpu.py's dry run on CPU (``--tiny``): its slot processes, barriers, formulas and projection.

Real processes and TensorFlow: k = 1 and k = 2 processes train tiny DnCNNs (32 x 32, depth 2-4) for half
a second per cell, in the mode *off* only (XLA's CPU compile would cost most of the time; the *on* mode's
training step is the task's own, tested in tests/tasks/test_mri_speed_options.py). On a GPU the same
script measures the study's sizes; here it shows that it runs and that what it reports follows from what
it measured.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_gpu.py"


@pytest.mark.slow
def test_the_gpu_bench_dry_run_measures_each_k_with_its_slot_environment_and_projects_the_grid(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--ks", "1,2", "--models", "small,largest", "--modes", "off", "--no-extras", "--no-readme",
                           "--budget-s", "400", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # each k's processes got the environment rows_per_gpu: k gives a worker's rows
    assert report["envs"] == {"1": [["0", "1"]], "2": [["0", "2"]]}
    assert report["memory"] == {"1": ["no GPU"], "2": ["no GPU"]}
    results = report["results"]
    assert [(r["k"], r["model"], r["mode"]) for r in results] == [
        (k, model, mode) for k in (1, 2) for model in ("small", "largest") for mode in ("off",)]
    ran = [r for r in results if "images_per_s" in r]
    assert ran and ran[0]["k"] == 1 and ran[0]["model"] == "small"  # the first cell always runs
    for r in results:
        if "images_per_s" not in r:
            assert "time budget" in r["error"], r  # a cell only goes unmeasured for lack of time
            continue
        assert r["images_per_s"] > 0 and r["steps"] >= 2
        assert r["rows_per_hour"] == pytest.approx(r["ran"] * 3600 / (4000 * r["t_step"] + r["t_start"]))
        if r["ran"] == r["k"]:
            assert r["images_per_s"] == pytest.approx(r["k"] * 3 / r["t_step"], rel=0.5)  # k rows of batch 3
    projection = report["projection"]
    assert set(projection) <= {"off"}
    for mode in ("off",):
        complete = [k for k in (1, 2) if all("t_step" in r for r in results if r["k"] == k and r["mode"] == mode)]
        by_k = projection.get(mode, {})
        assert sorted(by_k) == sorted([f"k={k}" for k in complete] + (["best k"] if complete else []))
        assert all(hours > 0 for hours in by_k.values())
        if complete:  # the best k per row is never worse than one k for every row
            assert by_k["best k"] <= min(by_k[f"k={k}"] for k in complete) * (1 + 1e-9)
    assert report["grid_rows"] == 54 and "A tiny grid of 54 rows" in proc.stdout and "No GPU was lent" in proc.stdout
