"""GPU packing and faster steps: DnCNN rows of the study's sizes, k = 1, 2, 4, 8 rows on one GPU, with
XLA and mixed precision off and on, all on the same GPU in one run, in at most 8 minutes.

What runs: for each k, k processes start at once, each with the environment a worker of
``rows_per_gpu: k`` gives its rows (``gridrunner.packing.slot_environments``: the GPU in
``CUDA_VISIBLE_DEVICES``, k in ``GRIDRUNNER_ROWS_PER_GPU``), and each configures TensorFlow as the task
does (``training.configure_tensorflow``, which gives it 1/k of the GPU's memory). Each process then
trains, one after another, the cells of the plan: a model (the smallest of ``grids/dncnn.yaml``, depth 10
with 16 filters 3×3; a middle one, depth 17, 64 filters 5×5; the largest, depth 25, 128 filters 7×7) in
a mode (*off*: float32 without XLA, the task's default; *on*: ``mixed_bfloat16`` and XLA; at k = 1 also
XLA alone and the precision alone). A cell builds the model and the task's own training step
(``training.build_model_in``, ``make_optimizer``, ``make_train_step``), runs ``--warmup`` steps (trace,
XLA compile, cuDNN autotuning), waits at a barrier until all k processes are ready, trains for
``--window-s`` seconds (at least ``--min-steps`` steps) on batches of 3 images of 256×256 (L1 loss,
``float(loss)`` after every step, as the task does), and waits at a second barrier. So the k rows of a
cell share the GPU for the whole measured window.

Reported per cell: images/s of all k rows together; ms per step of one row (``t_step``); rows/hour for
the study's rows of 4,000 steps,

    rows/hour = k · 3600 / (4000 · t_step + t_start),

where ``t_start`` is one row's start (TensorFlow import and set-up + model build + the warm-up steps),
measured in the same processes (a row's data loading and test-set evaluation are left out); and that
over k = 1's rows/hour (the packing target: ≥ 3 on the small and middle models).

The study's 504-row grid projected in GPU-hours, for each mode and k:

    GPU-hours = Σ_rows (4000 · t_step,k(c) + t_start) / (k · 3600),

with the conv work of a row c = depth · filters² · kernel² and ``t_step,k(c)`` the least-squares line
through the three measured models at that k (each row assumed packed with rows of its own size). The
"best k" line takes, for each row, the k with the fewest GPU-hours among those measured without error up
to that row's size.

    .venv/bin/python bench/bench_gpu.py              # on a GPU machine: at most about 7.5 minutes (--budget-s 400)
    .venv/bin/python bench/bench_gpu.py --tiny       # a dry run on CPU at 32×32 with tiny models, k = 1, 2
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import fmt, median  # noqa: E402

MODELS = {"small": {"depth": 10, "filters": 16, "kernel": 3},
          "middle": {"depth": 17, "filters": 64, "kernel": 5},
          "largest": {"depth": 25, "filters": 128, "kernel": 7}}
TINY_MODELS = {"small": {"depth": 2, "filters": 4, "kernel": 3},
               "middle": {"depth": 3, "filters": 8, "kernel": 3},
               "largest": {"depth": 4, "filters": 16, "kernel": 3}}
STUDY_STEPS = 4000
GRID = {"depth": [10, 12, 15, 17, 20, 22, 25], "filters": [16, 32, 64, 128], "kernel": [3, 5, 7]}
TINY_GRID = {"depth": [2, 3, 4], "filters": [4, 8, 16], "kernel": [3]}  # --tiny projects this one (54 rows)
GRID_REPEATS = 6  # 3 losses × 2 skip schemes per (depth, filters, kernel): 84 · 6 = 504 rows
BARRIER_TIMEOUT_S = 240.0


def modes(precision: str) -> dict:
    return {"off": ("float32", False), "on": (precision, True), "xla": ("float32", True),
            "precision": (precision, False)}


def plan(k: int, models: dict, extras: bool = True, main_modes=("off", "on")) -> list[tuple[str, str]]:
    """The cells one k runs, most wanted first: each model off and on; at k = 1 then XLA and precision alone."""
    cells = [(model, mode) for model in models for mode in main_modes]
    if k == 1 and extras:
        cells += [(model, mode) for model in models for mode in ("xla", "precision")]
    return cells


def work(model: dict) -> float:
    return model["depth"] * model["filters"] ** 2 * model["kernel"] ** 2


# --------------------------------------------------------------------------- one slot's process

def _barrier(folder: Path, name: str, slot: int, k: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{slot}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while sum(1 for p in folder.iterdir() if p.name.startswith(name + ".")) < k and time.monotonic() < deadline:
        time.sleep(0.02)


def slot_main(options: dict) -> None:
    """The body of one of k processes sharing the GPU: every cell of the plan, in order, with barriers."""
    launched = options["launched"]
    import numpy as np

    import keras
    import tensorflow as tf

    from gridrunner.tasks import dncnn
    from gridrunner.tasks.mri import losses, training

    slot, k, size, batch = options["slot"], options["k"], options["size"], options["batch"]
    memory = _configure(options["threads"], options["deterministic"], slot)
    setup_s = time.time() - launched
    rng = np.random.default_rng(slot)
    y = rng.random((batch, size, size, 1), dtype=np.float32)
    x = (y + 0.1 * rng.standard_normal(y.shape)).astype(np.float32)
    barriers = Path(options["barriers"])
    results = {"slot": slot, "k": k, "setup_s": setup_s, "memory": memory,
               "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "GRIDRUNNER_ROWS_PER_GPU": os.environ.get("GRIDRUNNER_ROWS_PER_GPU"),
               "gpus": [d.name for d in tf.config.list_logical_devices("GPU")], "cells": []}
    for index, (model_name, mode) in enumerate(options["cells"]):
        precision, jit = options["modes"][mode]
        cell = {"model": model_name, "mode": mode, "precision": precision, "jit_compile": jit}
        late = time.time() > options["deadline"]
        try:
            if late:
                raise TimeoutError("skipped: the time budget ran out")
            t0 = time.perf_counter()
            model = training.build_model_in(precision, lambda: dncnn.get_model(**options["models"][model_name],
                                                                              bn_momentum=0.9))
            optimizer = training.make_optimizer(1e-3, precision)
            optimizer.build(model.trainable_variables)
            step = training.make_train_step(model, losses.get_loss("l1", size), optimizer, jit)
            t1 = time.perf_counter()
            for _ in range(options["warmup"]):
                float(step(x, y))
            t2 = time.perf_counter()
            cell.update(build_s=t1 - t0, warmup_s=t2 - t1)
        except Exception as err:  # noqa: BLE001 - an out-of-memory or compile error is this cell's result
            cell.update(status="skipped" if late else "error", error=f"{type(err).__name__}: {str(err)[:300]}")
        _barrier(barriers, f"{index}-ready", slot, k)
        if "error" not in cell:
            try:
                steps, t0 = 0, time.perf_counter()
                while steps < options["min_steps"] or time.perf_counter() - t0 < options["window_s"]:
                    float(step(x, y))
                    steps += 1
                cell.update(status="ok", steps=steps, seconds=time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001
                cell.update(status="error", error=f"{type(err).__name__}: {str(err)[:300]}")
        _barrier(barriers, f"{index}-done", slot, k)
        results["cells"].append(cell)
        model = optimizer = step = None
        keras.backend.clear_session()
        gc.collect()
    Path(options["out"]).write_text(json.dumps(results), encoding="utf-8")


def _configure(threads: int, deterministic: bool, seed: int) -> str:
    """``training.configure_tensorflow``, and what it did to the GPU's memory (in words)."""
    import tensorflow as tf

    from gridrunner import packing
    from gridrunner.tasks.mri import training

    gpus = tf.config.list_physical_devices("GPU")
    k = packing.rows_per_gpu_of_this_process()
    total = packing.gpu_total_mb() if gpus else None
    training.configure_tensorflow(threads, deterministic, seed)
    if not gpus:
        return "no GPU"
    if k > 1 and total:
        return f"limit {packing.row_memory_mb(total, k)} MB of {total:.0f} MB"
    return "memory growth"


# --------------------------------------------------------------------------- the parent

def run_k(k: int, args, models: dict, scratch: Path, deadline: float) -> list[dict]:
    """k processes sharing the GPU through the cells of ``plan(k)``; cells that would start after ``deadline``
    are skipped."""
    from gridrunner import packing

    folder = scratch / f"k{k}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cells = plan(k, models, not args.no_extras, args.modes.split(","))
    if time.time() > deadline:
        return [{"slot": slot, "k": k, "failed": "skipped: the time budget ran out", "cells": []} for slot in range(k)]
    procs = []
    for slot, env in enumerate(packing.slot_environments(packing.Slots(k, 1))):
        options = {"slot": slot, "k": k, "size": args.size, "batch": args.batch, "threads": args.threads,
                   "deterministic": not args.no_determinism, "warmup": args.warmup, "window_s": args.window_s,
                   "min_steps": args.min_steps, "cells": cells, "modes": modes(args.precision), "models": models,
                   "barriers": str(folder / "barriers"), "deadline": deadline, "out": str(folder / f"slot{slot}.json"),
                   "launched": time.time()}
        log = open(folder / f"slot{slot}.log", "wb")
        procs.append(subprocess.Popen([common.PYTHON, __file__, "--_slot", json.dumps(options)],
                                      env={**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "2"},
                                      stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT))
        log.close()
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline + 45 - time.time(), 5))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = []
    for slot, proc in enumerate(procs):
        path = folder / f"slot{slot}.json"
        if path.exists():
            out.append(json.loads(path.read_text(encoding="utf-8")))
        else:
            lines = (folder / f"slot{slot}.log").read_text(errors="replace").strip().splitlines()
            tail = [line for line in lines if not line.startswith(("WARNING: All log", "I0000", "W0000"))][-2:]
            why = "killed at the time budget" if proc.returncode == -9 else f"exit {proc.returncode}"
            out.append({"slot": slot, "k": k, "failed": f"{why}: {' / '.join(tail)[:200]}", "cells": []})
    return out


def summarise(k: int, slots: list[dict], cells: list[tuple[str, str]], batch: int) -> list[dict]:
    """Per cell: images/s of the k rows together, one row's step time and start time, rows/hour."""
    rows = []
    setup = median([s["setup_s"] for s in slots if "setup_s" in s] or [float("nan")])
    for index, (model, mode) in enumerate(cells):
        got = [s["cells"][index] for s in slots if len(s.get("cells", [])) > index]
        ok = [c for c in got if c.get("status") == "ok"]
        row = {"k": k, "model": model, "mode": mode, "ran": len(ok), "of": k}
        if len(ok) < k:
            failed = [s["failed"] for s in slots if "failed" in s]
            bad = [c for c in got if c.get("status") != "ok"] or [{"error": failed[0] if failed else "no report"}]
            row["error"] = bad[0].get("error", "?")
        if ok:
            t_step = median([c["seconds"] / c["steps"] for c in ok])
            t_start = setup + median([c["build_s"] + c["warmup_s"] for c in ok])
            row.update(images_per_s=sum(c["steps"] * batch / c["seconds"] for c in ok), t_step=t_step,
                       t_start=t_start, steps=min(c["steps"] for c in ok),
                       rows_per_hour=len(ok) * 3600 / (STUDY_STEPS * t_step + t_start))
        rows.append(row)
    return rows


def project(results: list[dict], models: dict, grid: dict = GRID) -> dict:
    """The grid (the study's 504 rows) in GPU-hours per (mode, k), and with the best measured k for each row.
    A k whose cells did not all run covers only the rows up to the largest model it ran."""
    import numpy as np

    rows = [{"depth": d, "filters": f, "kernel": kk} for d in grid["depth"] for f in grid["filters"]
            for kk in grid["kernel"]]
    fits = {}
    for mode in ("off", "on"):
        for k in sorted({r["k"] for r in results}):
            cells = [r for r in results if r["k"] == k and r["mode"] == mode and "error" not in r and "t_step" in r]
            if len(cells) < 2:
                continue
            c = np.array([work(models[r["model"]]) for r in cells])
            slope, intercept = np.polyfit(c, [r["t_step"] for r in cells], 1)
            largest = max(c)
            fits[(mode, k)] = (slope, intercept, median([r["t_start"] for r in cells]), largest)
    out = {}
    for mode in ("off", "on"):
        per_k = {}
        for (m, k), (slope, intercept, t_start, largest) in fits.items():
            if m != mode:
                continue
            per_k[k] = [(STUDY_STEPS * max(slope * work(r) + intercept, 1e-6) + t_start) / (k * 3600)
                        if work(r) <= largest * (1 + 1e-9) else None for r in rows]
        if not per_k:
            continue
        out[mode] = {f"k={k}": GRID_REPEATS * sum(h for h in hours if h is not None)
                     for k, hours in sorted(per_k.items()) if all(h is not None for h in hours)}
        best = [min((hours[i] for hours in per_k.values() if hours[i] is not None), default=None)
                for i in range(len(rows))]
        if all(b is not None for b in best):
            out[mode]["best k"] = GRID_REPEATS * sum(best)
    return out


def gpu_name() -> str:
    if not shutil.which("nvidia-smi"):
        return "no GPU (no nvidia-smi)"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="1,2,4,8", help="rows per GPU to measure")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--precision", default="mixed_bfloat16", choices=["mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--warmup", type=int, default=3, help="steps before the measured window")
    parser.add_argument("--window-s", type=float, default=6.0, help="seconds each cell is measured")
    parser.add_argument("--min-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads per row (0: default)")
    parser.add_argument("--no-determinism", action="store_true", help="without op determinism (the task's default is on)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="cells that would start later are skipped; the run ends by budget + 45 s (+ start-up)")
    parser.add_argument("--tiny", action="store_true", help="a dry run on CPU: 32×32, tiny models, k = 1, 2")
    parser.add_argument("--models", default="small,middle,largest", help="which of the three models to measure")
    parser.add_argument("--modes", default="off,on", help="the modes every k runs (off, on)")
    parser.add_argument("--no-extras", action="store_true", help="at k = 1, leave out XLA alone and precision alone")
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.warmup, args.window_s, args.min_steps, args.threads = 32, 1, 0.5, 2, 1
        if "--ks" not in sys.argv:
            args.ks = "1,2"
        if "--budget-s" not in sys.argv:
            args.budget_s = 120.0
    models = {name: model for name, model in (TINY_MODELS if args.tiny else MODELS).items()
              if name in args.models.split(",")}
    name = gpu_name()
    if not args.tiny and not shutil.which("nvidia-smi"):
        sys.exit("Error: no GPU here (no nvidia-smi); `--tiny` runs the dry run on CPU")
    load_before = common.load_average()
    started = time.time()
    scratch = common.scratch("gpu")
    ks = [int(k) for k in args.ks.split(",")]
    results, memory, envs = [], {}, {}
    # Each k gets a share of the budget in proportion to its cells; time one k leaves unused goes to the next.
    weights = [len(plan(k, models, not args.no_extras, args.modes.split(","))) for k in ks]
    for i, k in enumerate(ks):
        slots = run_k(k, args, models, scratch, started + args.budget_s * sum(weights[: i + 1]) / sum(weights))
        memory[k] = sorted({s.get("memory", s.get("failed", "?")) for s in slots})
        envs[k] = sorted({(s.get("CUDA_VISIBLE_DEVICES"), s.get("GRIDRUNNER_ROWS_PER_GPU")) for s in slots},
                         key=str)
        rows = summarise(k, slots, plan(k, models, not args.no_extras, args.modes.split(",")), args.batch)
        results += rows
        for r in rows:
            print(f"k={k} {r['model']} {r['mode']}: " + (f"{r['images_per_s']:.1f} images/s, {1000 * r['t_step']:.1f} "
                  f"ms/step, {r['rows_per_hour']:.1f} rows/h" if "images_per_s" in r else r.get("error", "?")),
                  flush=True)
    grid = TINY_GRID if args.tiny else GRID
    projection = project(results, models, grid)
    grid_rows = GRID_REPEATS * len(grid["depth"]) * len(grid["filters"]) * len(grid["kernel"])
    minutes = (time.time() - started) / 60
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "projection": projection, "memory": memory,
                                               "envs": {k: v for k, v in envs.items()}, "gpu": name,
                                               "grid_rows": grid_rows, "minutes": minutes}, default=str),
                                   encoding="utf-8")
    publish(args, results, projection, memory, name, models, load_before, minutes, grid_rows)


def publish(args, results, projection, memory, name, models, load_before, minutes, grid_rows) -> None:
    base = {(r["model"], r["mode"]): r for r in results if r["k"] == 1}
    table = []
    for r in results:
        one = base.get((r["model"], r["mode"]), {})
        ratio = (fmt(r["rows_per_hour"] / one["rows_per_hour"]) if "rows_per_hour" in r and "rows_per_hour" in one
                 else "–")
        m = models[r["model"]]
        label = f"{r['model']} (d{m['depth']}, f{m['filters']}, {m['kernel']}×{m['kernel']})"
        if "images_per_s" in r:
            table.append([label, r["mode"], r["k"], fmt(r["images_per_s"]), fmt(1000 * r["t_step"]), r["steps"],
                          fmt(r["t_start"]), fmt(r["rows_per_hour"]), ratio,
                          "" if "error" not in r else f"{r['ran']} of {r['of']} ran: {r['error'][:80]}"])
        else:
            table.append([label, r["mode"], r["k"], "–", "–", "–", "–", "–", "–", r.get("error", "?")[:120]])
    targets = []
    for mode in ("off", "on"):
        for model in ("small", "middle"):
            ratios = [(r["k"], r["rows_per_hour"] / base[(model, mode)]["rows_per_hour"]) for r in results
                      if r["model"] == model and r["mode"] == mode and r["k"] > 1 and "rows_per_hour" in r
                      and "error" not in r and "rows_per_hour" in base.get((model, mode), {})]
            if ratios:
                k, best = max(ratios, key=lambda kr: kr[1])
                targets.append(f"{model}, {mode}: best {fmt(best)}× at k = {k} ({'met' if best >= 3 else 'missed'})")
            else:
                targets.append(f"{model}, {mode}: not measured")
    proj_rows = [[mode, key, fmt(hours)] for mode, by_k in projection.items() for key, hours in by_k.items()]
    title = ("GPU: several rows per GPU, XLA and mixed precision" if not args.tiny else
             "GPU: several rows per GPU, XLA and mixed precision (dry run on CPU at tiny sizes)")
    lines = [*common.section(title, load_before, minutes)]
    hours = "GPU-hours" if not args.tiny else "hours (CPU)"
    if args.tiny:
        lines += ["**No GPU was lent to the session that wrote this section, so nothing here ran on a GPU.** "
                  "This is `bench_gpu.py --tiny` on the CPU: 32×32 images, models of depth 2–4 with 4–16 "
                  "filters, k = 1 and 2, windows of half a second. It shows that the script runs end to end "
                  "(slot processes, barriers, memory set-up, projection); its numbers say nothing about a "
                  "GPU. On a GPU machine, `.venv/bin/python bench/bench_gpu.py` (CUDA TensorFlow, "
                  "`pip install -e '.[tasks-gpu]'`) fills this section in, in at most 8 minutes.", ""]
    lines += [f"Device: {name}. Rows' memory: " + "; ".join(f"k = {k}: {', '.join(v)}" for k, v in memory.items())
              + f". Batch {args.batch} of {args.size}×{args.size}, L1 loss, *on* = `{args.precision}` + XLA, "
              f"op determinism {'off' if args.no_determinism else 'on (the task default)'}. Formulas in "
              "`bench/bench_gpu.py`: rows/hour = k · 3600 / (4000 · t_step + t_start); GPU-hours = Σ over the "
              "504 rows of (4000 · t_step,k(c) + t_start) / (k · 3600), t_step,k a line in c = depth · "
              "filters² · kernel² through the three models.", "",
              common.table(["model", "mode", "k", "images/s (all k)", "ms/step (one row)", "steps", "t_start, s",
                            "rows/hour", "× k = 1", "note"], table), "",
              "Packing target, rows/hour ≥ 3× k = 1: " + "; ".join(targets) + ".", "",
              (f"The study's {grid_rows}-row grid projected (GPU-hours):" if not args.tiny else
               f"A tiny grid of {grid_rows} rows (depth 2–4 × filters 4, 8, 16, 3×3, × 6) projected, in hours of "
               "this CPU:"), "",
              common.table(["mode", "k", hours], proj_rows) if proj_rows else "(no projection: too few cells ran)"]
    common.publish("gpu", lines, readme=not args.no_readme)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_slot":
        slot_main(json.loads(sys.argv[2]))
    else:
        main()
