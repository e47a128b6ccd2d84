"""Quiet rows: a row's process imports TensorFlow with its C++ log at warnings and errors
(``TF_CPP_MIN_LOG_LEVEL=2``) unless the user set the level; the task's own prints reach the log."""
import csv
import os
import subprocess
import sys

import pytest

from gridtools import write_spec

TASK = '''
import os
import sys


def run(params, ctx):
    import tensorflow as tf

    total = float(tf.reduce_sum(tf.constant([1.0, 2.0])))  # starts TensorFlow's runtime, which logs its notices
    print(f"user print from row {ctx.row_id}: {total}", flush=True)
    print("user stderr line", file=sys.stderr)
    return {"level": float(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "-1"))}
'''


def run_one_tensorflow_row(tmp_path, env_level: str | None, *worker_args: str) -> tuple[float, str]:
    """Make a one-row grid of a task that imports TensorFlow, run a real worker on it; (the level that the
    row's process saw, the worker's whole log)."""
    (tmp_path / "tfrow.py").write_text(TASK)
    write_spec(tmp_path, {"name": "tf", "task": "tfrow:run", "grid": {"i": [0]}, "outcomes": ["level"]})
    subprocess.run([sys.executable, "-m", "gridrunner.cli", "make", "g.yaml"], cwd=tmp_path, check=True,
                   capture_output=True)
    grid = tmp_path / "runs" / "tf"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if env_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = env_level
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        subprocess.run([sys.executable, "-m", "gridrunner.cli", "work", "--grid", str(grid), "--quiet", *worker_args],
                       cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300, check=True)
    (row,) = csv.DictReader(open(next((grid / "shards").glob("*.csv"))))
    assert row["status"] == "done", row["error"]
    return float(row["level"]), log_path.read_text()


@pytest.mark.slow
def test_rows_get_tensorflow_log_level_2_and_user_prints_still_reach_the_log(tmp_path):
    level, log = run_one_tensorflow_row(tmp_path, None)
    assert level == 2.0
    assert "user print from row" in log and ": 3.0" in log
    assert "user stderr line" in log
    # TensorFlow's INFO notice about the CPU instructions it was not built for (every x86-64 CPU with AVX2).
    assert "cpu_feature_guard" not in log, log


@pytest.mark.slow
def test_a_log_level_the_user_set_is_kept(tmp_path):
    level, log = run_one_tensorflow_row(tmp_path, "0")
    assert level == 0.0
    assert "user print from row" in log
    # At level 0 the notice that level 2 hides is there: the check above can fail.
    assert "cpu_feature_guard" in log, log
