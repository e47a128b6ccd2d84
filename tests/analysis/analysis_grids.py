"""Grids for the analysis tests (imported by name: a second ``conftest`` module would clash with tests/conftest.py): DataFrames shaped like ``gridrunner.load``'s, and real shard files.

``planted_grid`` is the reference data the toy ``quadratic`` task follows (see ``planted_metric``):
the analysis must find exactly these effects.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

BOOKKEEPING = ["row_id", "status", "attempts", "worker", "started_at", "finished_at", "runtime_s", "error"]


def make_frame(
    params: dict,
    outcomes: dict | None = None,
    status=None,
    error=None,
    runtime_s=None,
    failure: str | None = None,
    metric: str | None = None,
    grid: str = "toy",
    grid_dir: str = "runs/toy",
) -> pd.DataFrame:
    """A DataFrame with the columns, dtypes and ``attrs`` that ``gridrunner.load`` returns."""
    n = len(next(iter(params.values())))
    frame = pd.DataFrame(params)
    outcomes = outcomes or {}
    status = ["done"] * n if status is None else list(status)
    frame["row_id"] = [f"{i:08x}" for i in range(n)]
    frame["status"] = pd.Categorical(status, categories=["not_run", "running", "done", "failed"])
    frame["attempts"] = [0 if s == "not_run" else 1 for s in status]
    frame["worker"] = ["" if s == "not_run" else "w1" for s in status]
    start = pd.Timestamp("2024-01-01 00:00:00")
    runtime = np.full(n, 60.0) if runtime_s is None else np.asarray(runtime_s, dtype=float)
    runtime = np.where(np.isin(status, ["not_run", "running"]), np.nan, runtime)
    frame["started_at"] = [pd.NaT if s == "not_run" else start for s in status]
    frame["finished_at"] = [pd.NaT if s in ("not_run", "running") else start + pd.Timedelta(seconds=float(r)) for s, r in zip(status, runtime)]
    frame["runtime_s"] = runtime
    frame["error"] = [""] * n if error is None else list(error)
    for name, values in outcomes.items():
        frame[name] = pd.to_numeric(pd.Series(values), errors="coerce").astype(float)
    frame.attrs = {
        "grid": grid,
        "grid_dir": str(grid_dir),
        "params": list(params),
        "outcomes": list(outcomes),
        "failure": failure,
        "metric": metric,
        "spec": {"name": grid, "failure": failure, "metric": metric},
    }
    return frame


def write_grid(root: Path, frame: pd.DataFrame, shards: int = 3, histories: bool = True) -> Path:
    """Write ``frame`` as a real grid directory (``spec.yaml``, ``shards/shard-NNN.csv``, ``rows/*/history.jsonl``).

    Row ids are recomputed from the parameters, as gridrunner names rows; the cells are encoded as the
    store writes them, so ``gridrunner.load`` reads the grid back.
    """
    import yaml

    from gridrunner.spec import encode_cell, row_id_of

    grid_dir = Path(root) / frame.attrs["grid"]
    (grid_dir / "shards").mkdir(parents=True)
    (grid_dir / "spec.yaml").write_text(yaml.safe_dump({**frame.attrs["spec"], "outcomes": frame.attrs["outcomes"]}))
    params = frame.attrs["params"]
    plain = frame[params + BOOKKEEPING + frame.attrs["outcomes"]].copy()
    native = [{p: getattr(value, "item", lambda: value)() for p, value in zip(params, row)} for row in frame[params].itertuples(index=False)]
    plain["row_id"] = [row_id_of(values) for values in native]
    for p in params:
        plain[p] = [encode_cell(values[p]) for values in native]
    for column in ("started_at", "finished_at"):
        plain[column] = plain[column].map(lambda t: "" if pd.isna(t) else t.strftime("%Y-%m-%dT%H:%M:%SZ"))
    for i, part in enumerate(np.array_split(np.arange(len(plain)), shards)):
        plain.iloc[part].to_csv(grid_dir / "shards" / f"shard-{i:03d}.csv", index=False)
    if histories:
        for row in plain.itertuples():
            if row.status in ("done", "failed"):
                write_history(grid_dir, row.row_id, failed=row.status == "failed")
    return grid_dir


def write_history(grid_dir: Path, row_id: str, failed: bool, steps: int = 20) -> None:
    row_dir = Path(grid_dir) / "rows" / row_id
    row_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(row_id, 16))
    with open(row_dir / "history.jsonl", "w") as fh:
        for step in range(steps):
            loss = 1.0 - 0.01 * step if failed else 0.05 + np.exp(-step / 4) + 0.01 * rng.random()
            fh.write(json.dumps({"step": step * 10, "time": 1.7e9 + step, "loss": float(loss), "val_loss": float(loss * 1.1)}) + "\n")


def planted_grid(seed: int = 0, repeats: int = 2, noise: float = 0.05, failure: str | None = None) -> pd.DataFrame:
    """The toy ``quadratic`` task's planted truth (``tasks.toy.quadratic_truth``) on a full grid.

    x ∈ {−1, −0.5, 0, 0.5, 1} × depth ∈ {2, 4, 6, 8, 10} × loss ∈ {l1, l2, ssim} × z ∈ {1, 2, 3}
    × ``repeats`` seeds. score = 0.5 + 0.3·x − 0.2·x² + 0.05·depth + {l1: +0.1, l2: 0, ssim: −0.1}
    + N(0, noise²); P(raise) = logistic(−3 + 3·[loss = ssim] + 0.15·depth); z has no effect.
    """
    from gridrunner.tasks.toy import quadratic_truth

    rng = np.random.default_rng(seed)
    combos = list(itertools.product([-1.0, -0.5, 0.0, 0.5, 1.0], [2, 4, 6, 8, 10], ["l1", "l2", "ssim"], [1, 2, 3], range(repeats)))
    x, depth, loss, z, rep = (np.array(c) for c in zip(*combos))
    truth = np.array([quadratic_truth({"x": a, "depth": b, "loss": c}) for a, b, c in zip(x, depth, loss)])
    raised = rng.random(len(x)) < truth[:, 1]
    score = np.where(raised, np.nan, truth[:, 0] + rng.normal(0, noise, len(x)))
    return make_frame(
        {"x": x.astype(float), "depth": depth.astype(int), "loss": loss, "z": z.astype(int), "seed": rep.astype(int)},
        {"score": score, "runtime_proxy": 1.0 + depth},
        status=np.where(raised, "failed", "done"),
        error=np.where(raised, "FloatingPointError: loss became NaN (planted failure)", ""),
        runtime_s=20 * (1 + depth) * rng.lognormal(0, 0.2, len(x)),
        failure=failure,
        metric="score",
        grid="quadratic",
    )


def study_grid(seed: int = 0) -> pd.DataFrame:
    """A grid like the study's DnCNN search: failures (by the rule ``m_ssim < 0.5 or m_mae > 1``) only with
    ``loss=ssim``, more often with ``skip=resnet`` and more filters."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(["l1", "l2", "ssim"], ["dncnn", "resnet"], [16, 32, 64, 128], [10, 13, 16, 19, 22, 25], [3, 5, 7]))
    loss, skip, filters, depth, kernel = (np.array(c) for c in zip(*combos))
    filters, depth, kernel = filters.astype(int), depth.astype(int), kernel.astype(int)
    m_ssim = 0.74 + 0.01 * (skip == "resnet") - 0.0002 * filters - 0.002 * kernel + 0.005 * (loss == "l1") + rng.normal(0, 0.01, len(loss))
    p_fail = (loss == "ssim") * (0.15 + 0.25 * (skip == "resnet") + 0.001 * filters)
    failed = rng.random(len(loss)) < p_fail
    m_ssim = np.where(failed, rng.uniform(0.1, 0.45, len(loss)), m_ssim)
    m_mae = np.where(failed, rng.uniform(0.5, 2, len(loss)), 0.02 + rng.normal(0, 0.002, len(loss)))
    runtime = 20 * depth * filters / 16 * kernel**2 / 9 * rng.lognormal(0, 0.1, len(loss))
    return make_frame(
        {"loss": loss, "skip": skip, "filters": filters, "depth": depth, "kernel": kernel},
        {"m_mae": m_mae, "m_ssim": m_ssim, "bench_ssim": np.full(len(loss), 0.72)},
        status=np.where(failed, "failed", "done"),
        error=np.where(failed, "rule: m_ssim < 0.5 or m_mae > 1", ""),
        runtime_s=runtime,
        failure="m_ssim < 0.5 or m_mae > 1",
        metric="m_ssim",
        grid="dncnn",
    )


def large_grid(rows: int = 100_000, seed: int = 0) -> pd.DataFrame:
    """``rows`` rows of a study-like grid (5 parameters, 3 outcomes, replicates), for the scale test."""
    rng = np.random.default_rng(seed)
    loss = rng.choice(["l1", "l2", "ssim"], rows)
    skip = rng.choice(["dncnn", "resnet"], rows)
    filters = rng.choice([16, 32, 64, 128], rows)
    depth = rng.choice(np.arange(10, 26), rows)
    lr = rng.choice([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], rows)
    m_ssim = 0.74 + 0.01 * (skip == "resnet") - 0.0002 * filters + 0.005 * (loss == "l1") - 0.002 * np.log10(lr) + rng.normal(0, 0.01, rows)
    failed = rng.random(rows) < (0.02 + 0.3 * (loss == "ssim") * (skip == "resnet"))
    m_ssim = np.where(failed, rng.uniform(0.1, 0.45, rows), m_ssim)
    status = np.where(failed, "failed", "done").astype(object)
    status[rng.random(rows) < 0.02] = "not_run"
    return make_frame(
        {"loss": loss, "skip": skip, "filters": filters, "depth": depth, "lr": lr},
        {"m_ssim": np.where(status == "not_run", np.nan, m_ssim), "m_mae": rng.uniform(0, 0.1, rows), "bench_ssim": np.full(rows, 0.72)},
        status=status,
        error=np.where(status == "failed", "rule: m_ssim < 0.5", ""),
        runtime_s=depth * filters * rng.lognormal(0, 0.3, rows),
        failure="m_ssim < 0.5",
        metric="m_ssim",
        grid="large",
    )
