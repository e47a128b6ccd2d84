"""Training throughput: the DnCNN task's training loop against plain Keras ``model.fit``, in one process.

Both train the same DnCNN (``gridrunner.tasks.dncnn.get_model``) with the same loss (``gridrunner.tasks.mri.losses``),
Adam and batch size on the same cached MNI training pairs (``gridrunner.tasks.mri.dataset``), alternating
(fit, task, fit, task, ...) so load on the machine hits both alike:

* **task**: ``gridrunner.tasks.dncnn.run`` with a fresh row directory (no checkpoint to resume), as a worker
  runs a row; images/s from its learning curve (``history.jsonl``), every window but the first
  (which holds the ``tf.function`` trace);
* **fit**: ``model.compile(Adam, loss)`` and ``model.fit(x, y, batch_size, epochs)`` on the same
  arrays; images/s from a callback's batch-end times, every step after the same first window.

Start-up per row: a fresh process imports TensorFlow and Keras and builds the model, and its first
training step traces the step function. That is set against a 4,000-step row (the study's length),
whose time is extrapolated from the measured steady-state step time: 4,000 · batch / images/s.

**Speed options** (``--speed``, its own section): the same task row under each ``precision`` and
``jit_compile`` setting, alternating (float32, float32 + XLA, mixed_bfloat16, ... in each repeat), so
each setting's images/s is set against float32's from the same repeat. images/s counts every window
but the first (which holds the trace, and XLA's compile); the first window's extra time is reported
apart as the compile cost.

    .venv/bin/python bench/bench_training.py            # 3 alternating repeats of 300 steps
    .venv/bin/python bench/bench_training.py --quick    # 1 repeat of 100 steps
    .venv/bin/python bench/bench_training.py --speed    # the speed options only: 2 repeats of 150 steps
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import fmt, median, with_spread  # noqa: E402

MODEL = {"depth": 5, "filters": 16, "kernel": 3, "skip": "dncnn", "bn_momentum": 0.9}
STUDY_STEPS = 4000


def data_params(cache: Path) -> dict:
    return {"size": 64, "noise": "rad41", "copies": 2, "augment": 2, "cache_dir": str(cache)}


def run_task(params: dict, row_dir: Path) -> tuple[list[float], dict]:
    from gridrunner.context import Context
    from gridrunner.tasks import dncnn

    shutil.rmtree(row_dir, ignore_errors=True)
    row_dir.mkdir(parents=True)
    ctx = Context(row_dir=row_dir, row_id="bench", seed=0, grid_dir=row_dir.parent)
    metrics = dncnn.run(params, ctx)
    windows = [r["images_per_s"] for r in ctx.history()][1:]
    return windows, metrics


def run_fit(params: dict, log_every: int) -> list[float]:
    import keras

    from gridrunner.tasks import dncnn
    from gridrunner.tasks.mri import dataset, losses, training

    model_params, config, data = training.split_params(params, dncnn.MODEL_DEFAULTS)
    loss, batch_size = model_params.pop("loss"), model_params.pop("batch_size")
    train, _ = dataset.load_pairs(data, "train", dataset.cache_folder(config.cache_dir))
    model = dncnn.get_model(**model_params)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
                  loss=losses.get_loss(loss, data.size))
    ends: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    per_epoch = len(train) // batch_size
    epochs = -(-config.steps // per_epoch)
    model.fit(train.x, train.y, batch_size=batch_size, epochs=epochs, steps_per_epoch=None, shuffle=True,
              verbose=0, callbacks=[Clock()])
    ends = ends[: config.steps]
    # windows of log_every steps after the first, as the task's learning curve reports them
    return [log_every * batch_size / (ends[k + log_every - 1] - ends[k - 1])
            for k in range(log_every, len(ends) - log_every + 1, log_every)]


def startup_probe(params_json: str) -> None:
    """In a fresh process: seconds to import TensorFlow and Keras, build the model, trace the first step."""
    params = json.loads(params_json)
    t0 = time.perf_counter()
    import keras
    import tensorflow as tf

    t1 = time.perf_counter()
    from gridrunner.tasks import dncnn
    from gridrunner.tasks.mri import dataset, losses, training

    model_params, config, data = training.split_params(params, dncnn.MODEL_DEFAULTS)
    loss, batch_size = model_params.pop("loss"), model_params.pop("batch_size")
    training.configure_tensorflow(config.threads, config.deterministic, 0)
    train, _ = dataset.load_pairs(data, "train", dataset.cache_folder(config.cache_dir))
    t2 = time.perf_counter()
    model = dncnn.get_model(**model_params)
    loss_fn = losses.get_loss(loss, data.size)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    optimizer.build(model.trainable_variables)
    t3 = time.perf_counter()

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            value = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(value, model.trainable_variables), model.trainable_variables))
        return value

    float(train_step(train.x[:batch_size], train.y[:batch_size]))
    t4 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "data_s": t2 - t1, "build_s": t3 - t2, "first_step_s": t4 - t3}))


SPEED_SETTINGS = [("float32", False), ("float32", True), ("mixed_bfloat16", False), ("mixed_bfloat16", True),
                  ("mixed_float16", False), ("mixed_float16", True)]


def speed_options(params: dict, repeats: int, load_before: str, started: float, readme: bool) -> None:
    """Images/s of the task under every precision and XLA setting, alternating, against float32."""
    base = common.RUNS / "training"
    rates: dict[tuple, list[float]] = {s: [] for s in SPEED_SETTINGS}
    ratios: dict[tuple, list[float]] = {s: [] for s in SPEED_SETTINGS}
    compile_s: dict[tuple, list[float]] = {s: [] for s in SPEED_SETTINGS}
    ssim: dict[tuple, list[float]] = {s: [] for s in SPEED_SETTINGS}
    batch, window = params["batch_size"], params["log_every"]
    for k in range(repeats):
        for setting in SPEED_SETTINGS:
            precision, jit = setting
            windows, metrics = run_task({**params, "precision": precision, "jit_compile": jit},
                                        base / f"speed-{k}-{precision}-{jit}")
            history = [json.loads(line) for line in
                       (base / f"speed-{k}-{precision}-{jit}" / "history.jsonl").read_text().splitlines() if line]
            first_s = window * batch / history[0]["images_per_s"]
            rates[setting].append(median(windows))
            compile_s[setting].append(first_s - window * batch / median(windows))
            ssim[setting].append(metrics["m_ssim"])
            print(f"repeat {k}: {precision}{' + XLA' if jit else ''}: {rates[setting][-1]:.1f} images/s, "
                  f"first window +{compile_s[setting][-1]:.1f} s, m_ssim {metrics['m_ssim']:.4f}", flush=True)
        for setting in SPEED_SETTINGS:
            ratios[setting].append(rates[setting][-1] / rates[("float32", False)][-1])
    minutes = (time.perf_counter() - started) / 60
    rows = [[f"`{p}`", "on" if j else "off", with_spread(rates[(p, j)]), with_spread(ratios[(p, j)]),
             with_spread(compile_s[(p, j)], 2), with_spread(ssim[(p, j)], 4)] for p, j in SPEED_SETTINGS]
    lines = [
        *common.section("Training speed options: precision and XLA on CPU", load_before, minutes),
        f"The task row of the section above (DnCNN depth {MODEL['depth']}, {MODEL['filters']} filters, "
        f"{params['loss']} loss, batch {batch}, 64×64, {params['steps']} steps, TensorFlow threads: "
        f"{params['threads'] or 'its default (all cores)'}) under each setting, alternating within each of "
        f"{repeats} repeats. images/s: median over windows of {window} steps after the first; *× float32*: "
        f"over float32 without XLA in the same repeat (the machine was shared with other work, so the ratios "
        f"are the figures to read); *first window*: the extra seconds of the first window (trace, XLA "
        f"compile); *m_ssim*: the test SSIM the row reached. Median (min–max) over the repeats.",
        "",
        common.table(["precision", "XLA", "images/s", "× float32", "first window, s", "m_ssim"], rows),
        "",
        "This CPU has AVX-512 with BF16 instructions (oneDNN runs bfloat16 natively); oneDNN has no float16 "
        "kernels on it and TensorFlow falls back to Eigen for them. XLA is meant for GPUs: the task uses it only "
        "when a row asks (`jit_compile: true`), and the tests keep it to the L1 and SSIM losses at tiny sizes "
        "(with MS-SSIM its CPU compile did not finish in 10 minutes). The test SSIM after these few steps "
        "differs between settings because 16-bit arithmetic changes the training path; the tests bound the "
        "difference on a tiny row (0.02 SSIM, 20% MAE). No GPU was lent to this session: nothing here ran on "
        "a GPU (see the GPU section).",
    ]
    common.publish("training_speed", lines, readme=readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=25, help="steps per images/s window")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loss", default="l1")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: its default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100 steps, one repeat")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--speed", action="store_true",
                        help="measure the precision and XLA settings only (default 2 repeats of 150 steps)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.startup_repeats = 100, 1, 1
    elif args.speed and "--steps" not in sys.argv and "--repeats" not in sys.argv:
        args.steps, args.repeats = 150, 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_before = common.load_average()
    started = time.perf_counter()
    base = common.RUNS / "training"
    base.mkdir(parents=True, exist_ok=True)
    params = {**MODEL, "loss": args.loss, "batch_size": args.batch_size, "steps": args.steps,
              "log_every": args.log_every, "checkpoint_every": args.steps + 1, "threads": args.threads,
              "examples": 0, **data_params(common.RUNS / "cache")}

    from gridrunner.tasks.mri import dataset, training

    # The task sets threads, op determinism and the seed at its start; set them first, so fit runs alike.
    training.configure_tensorflow(args.threads, True, 0)
    build_start = time.perf_counter()

    data = dataset.DataConfig.from_params(params)
    _, built = dataset.load_pairs(data, "train", common.RUNS / "cache")
    dataset.load_pairs(data, "test", common.RUNS / "cache")
    if built:
        print(f"built the training pairs in {time.perf_counter() - build_start:.1f} s (cached in bench/runs/cache)")

    if args.speed:
        speed_options(params, args.repeats, load_before, started, readme=not args.no_readme)
        return

    task_rates, fit_rates, train_pairs = [], [], 0
    for k in range(args.repeats):
        fit_windows = run_fit(params, args.log_every)
        windows, metrics = run_task(params, base / f"row-{k}")
        train_pairs = int(metrics["train_pairs"])
        fit_rates.append(median(fit_windows))
        task_rates.append(median(windows))
        print(f"repeat {k}: fit {fit_rates[-1]:.1f} images/s, task {task_rates[-1]:.1f} images/s "
              f"(ratio {task_rates[-1] / fit_rates[-1]:.3f})", flush=True)
    ratios = [t / f for t, f in zip(task_rates, fit_rates)]

    probes = []
    for _ in range(args.startup_repeats):
        out = subprocess.run([common.PYTHON, __file__, "--_startup", json.dumps(params)], capture_output=True,
                             text=True, cwd=common.ROOT, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        probes.append(json.loads(out.stdout.strip().splitlines()[-1]))
    step_s = args.batch_size / median(task_rates)
    study_s = STUDY_STEPS * step_s
    startup = [p["import_s"] + p["build_s"] for p in probes]
    startup_traced = [p["import_s"] + p["build_s"] + p["first_step_s"] for p in probes]
    minutes = (time.perf_counter() - started) / 60

    lines = [
        *common.section("Training throughput", load_before, minutes),
        f"DnCNN depth {MODEL['depth']}, {MODEL['filters']} filters, {MODEL['kernel']}×{MODEL['kernel']}, "
        f"{args.loss} loss, batch {args.batch_size}, 64×64 MNI slices (radial, 41 spokes; {train_pairs} "
        f"training pairs), {args.steps} steps per run, TensorFlow threads: "
        f"{args.threads or 'its default (all cores)'}. images/s: median over windows of {args.log_every} "
        f"steps after the first; median of {args.repeats} alternating runs (min–max).",
        "",
        common.table(["loop", "images/s", "ms/step"], [
            ["`model.fit`", with_spread(fit_rates), fmt(1000 * args.batch_size / median(fit_rates))],
            ["gridrunner task (`gridrunner.tasks.dncnn.run`)", with_spread(task_rates),
             fmt(1000 * args.batch_size / median(task_rates))],
        ]),
        "",
        f"Task / fit: {with_spread(ratios)} (target ≥ 0.95: {'met' if median(ratios) >= 0.95 else 'missed'}).",
        "",
        f"Start-up of a row's process, median of {len(probes)} fresh processes (min–max): TensorFlow + Keras "
        f"import {with_spread([p['import_s'] for p in probes])} s, model build "
        f"{with_spread([p['build_s'] for p in probes])} s, first step (trace) "
        f"{with_spread([p['first_step_s'] for p in probes])} s; reading the cached pairs "
        f"{with_spread([p['data_s'] for p in probes])} s. A 4,000-step row at the measured "
        f"{fmt(1000 * step_s)} ms/step would train for {fmt(study_s)} s (extrapolated, not run), so import + "
        f"build is {fmt(100 * median(startup) / study_s, 2)}% of it, and {fmt(100 * median(startup_traced) / study_s, 2)}% "
        f"with the first step's trace.",
    ]
    common.publish("training", lines, readme=not args.no_readme)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_startup":
        startup_probe(sys.argv[2])
    else:
        main()
