"""Train one denoiser on undersampled/fully sampled pairs, test it, and resume where a requeued row stopped.

:func:`train_and_evaluate` is the body shared by :mod:`gridrunner.tasks.dncnn` and :mod:`gridrunner.tasks.unet`:

1. TensorFlow is set up: ``threads`` intra-op and inter-op threads (0: TensorFlow's default, which
   depends on the machine's cores; bit-identical results need a fixed count), op
   determinism when ``deterministic`` (the default; it cost nothing measurable here), GPU
   memory growth when there is a GPU (Keras uses it without any change), and the seed.
2. The pairs come from :mod:`gridrunner.tasks.mri.dataset` (built once, cached, shared by all rows).
3. The model trains for ``steps`` steps of Adam(``learning_rate``) in a custom ``tf.function``
   step. Batch ``s`` is fixed by the seed and ``s`` alone (a seeded permutation per epoch),
   so a resumed run sees exactly the batches an uninterrupted one would.
4. Every ``checkpoint_every`` steps, and when ``ctx.should_stop()`` turns true, the model,
   the optimizer and the step count go to ``ctx.checkpoint_dir``; a stopped row raises
   :class:`gridrunner.Interrupted`, and the next run of the row continues from that step.
   A finished row keeps its last checkpoint: it holds the trained weights.
5. A loss that is not finite stops the row at once with ``FloatingPointError`` (the worker
   records it as failed, with the step), instead of training on NaNs.
6. The model is tested on the held-out split: ``m_mae``, ``m_mse``, ``m_ssim`` (mean over test
   images), the same for the undersampled input (``bench_*``, the study's benchmark line),
   and for each noise in ``eval_noise`` the same six prefixed by its name (``rad15_m_ssim``,
   ``pois_bench_ssim``, ...), as in the study's generalisation test. A few test images with
   their predictions go to ``<row>/examples.npz``, and every metric (also the timings, the
   generalisation metrics, the final training loss) to ``<row>/metrics.json``.

Why not ``model.fit``: a requeued row must resume at the step it stopped at, not at an epoch
boundary, and a NaN must end the row with its step; a custom step does both in a few lines.
Measured on this 2-core CPU, it trains at the same images/s as ``model.fit`` of the same model on
the same data (``bench/bench_training.py``). XLA stays off: it was slower on CPU and never
finished compiling MS-SSIM.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, fields

import numpy as np

from gridrunner.tasks.mri import dataset, losses

EXAMPLES_FILE = "examples.npz"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TrainingConfig:
    """How a row trains and is tested (the parameters every MRI task shares besides the data's)."""

    steps: int = 4000
    learning_rate: float = 1e-3
    checkpoint_every: int = 500  # steps; also saved when asked to stop
    log_every: int = 0  # steps between learning-curve points; 0 = steps / 50
    threads: int = 0  # TensorFlow intra- and inter-op threads; 0 = its default (all cores)
    deterministic: bool = True
    eval_noise: tuple = ()  # extra test noises, e.g. [rad15, pois]
    eval_batch: int = 32
    examples: int = 3  # test images saved with their predictions
    cache_dir: str = ""  # "" = $GRIDRUNNER_DATA_CACHE, else <grid>/cache
    seed: int | None = None  # default: the row's seed (ctx.seed)


def split_params(params: dict, model_defaults: dict) -> tuple[dict, TrainingConfig, dataset.DataConfig]:
    """Split a row's parameters into the model's, the training's and the data's, with defaults.

    An unknown name raises ValueError listing the valid ones, so a typo in a grid fails its
    rows at once instead of silently training with a default.
    """
    training_names = {f.name for f in fields(TrainingConfig)}
    data_names = {f.name for f in fields(dataset.DataConfig)}
    unknown = sorted(set(params) - set(model_defaults) - training_names - data_names)
    if unknown:
        valid = ", ".join(sorted({*model_defaults, *training_names, *data_names}))
        raise ValueError(f"unknown parameter {unknown[0]!r}; valid parameters: {valid}")
    model = {key: params.get(key, default) for key, default in model_defaults.items()}
    training = {key: params[key] for key in training_names if key in params}
    if "eval_noise" in training:
        training["eval_noise"] = _as_noise_list(training["eval_noise"])
    config = TrainingConfig(**training)
    if config.steps < 0 or config.checkpoint_every < 1:
        raise ValueError(f"steps must be >= 0 and checkpoint_every >= 1, got {config.steps} and {config.checkpoint_every}")
    data = dataset.DataConfig.from_params(params)
    for noise in config.eval_noise:
        dataset.undersampling.parse_noise(noise)
    return model, config, data


def configure_tensorflow(threads: int = 0, deterministic: bool = True, seed: int = 0) -> None:
    """Threads, determinism, GPU memory growth and seeds; call before building anything."""
    import keras
    import tensorflow as tf

    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        # TensorFlow was already initialised in this process (several rows in one notebook or
        # test session): the first setting stays, which only matters for bit-exact reruns.
        pass
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The training pairs of step ``step``: position ``step`` in a seeded permutation per epoch."""
    per_epoch = max(n // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = _permutation(n, seed, epoch)
    return order[position * batch_size : (position + 1) * batch_size]


def train_and_evaluate(build_model, loss: str, batch_size: int, config: TrainingConfig, data: dataset.DataConfig, ctx) -> dict:
    """Train ``build_model()`` with ``loss`` and return the test metrics (see the module docstring)."""
    import keras
    import tensorflow as tf

    from gridrunner.errors import Interrupted

    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    losses.check_loss(loss, data.size)
    seed = int(config.seed if config.seed is not None else ctx.seed)
    configure_tensorflow(config.threads, config.deterministic, seed)

    cache = dataset.cache_folder(config.cache_dir or None, ctx.grid_dir)
    started = time.perf_counter()
    train, _ = dataset.load_pairs(data, "train", cache)
    tests = {"": dataset.load_pairs(data, "test", cache)[0]}
    for noise in config.eval_noise:
        tests[dataset.undersampling.parse_noise(noise).name + "_"] = dataset.load_pairs(data, "test", cache, noise)[0]
    data_s = time.perf_counter() - started
    if len(train) < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {len(train)} training pairs")

    model = build_model()
    loss_fn = losses.get_loss(loss, data.size)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    optimizer.build(model.trainable_variables)  # so a checkpoint restores its slots at once
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(checkpoint, str(ctx.checkpoint_dir), max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    start_step = int(step_var.numpy())

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss_value = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss_value, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss_value

    def save(step: int) -> None:
        step_var.assign(step)
        manager.save(checkpoint_number=step)

    log_every = config.log_every or max(config.steps // 50, 1)
    window, window_start, train_time, last_loss = [], time.perf_counter(), 0.0, math.nan
    for step in range(start_step, config.steps):
        if ctx.should_stop():
            save(step)
            raise Interrupted(f"stopped at step {step} of {config.steps}; checkpoint saved")
        batch = batch_indices(len(train), batch_size, seed, step)
        loss_value = float(train_step(train.x[batch], train.y[batch]))
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{loss} loss became {loss_value} at step {step}")
        window.append(loss_value)
        done = step + 1
        if done % log_every == 0 or done == config.steps:
            elapsed = time.perf_counter() - window_start
            train_time += elapsed
            last_loss = float(np.mean(window))
            ctx.log(done, loss=last_loss, images_per_s=len(window) * batch_size / max(elapsed, 1e-9))
            window, window_start = [], time.perf_counter()
        if done % config.checkpoint_every == 0 and done < config.steps:
            save(done)
    steps_run = config.steps - start_step
    if steps_run > 0:
        save(config.steps)

    metrics = {}
    for prefix, test in tests.items():
        predictions = predict(model, test.x, config.eval_batch)
        if not np.all(np.isfinite(predictions)):
            raise FloatingPointError(f"the trained model predicts non-finite values on the {prefix or 'main '}test set")
        for name, value in image_metrics(predictions, test.y).items():
            metrics[f"{prefix}m_{name}"] = value
        for name, value in image_metrics(test.x, test.y).items():
            metrics[f"{prefix}bench_{name}"] = value
        if prefix == "" and config.examples > 0:
            _save_examples(ctx.row_dir / EXAMPLES_FILE, test, predictions, config.examples)
    metrics.update(
        train_loss=last_loss,
        steps_run=float(steps_run),
        resumed_from=float(start_step),
        train_images_per_s=steps_run * batch_size / train_time if train_time > 0 else math.nan,
        data_s=data_s,
        train_pairs=float(len(train)),
        test_pairs=float(len(tests[""])),
        parameters=float(model.count_params()),
        # What the row ran with (0: TensorFlow's default, every core it sees); results depend on both.
        intra_op_threads=float(tf.config.threading.get_intra_op_parallelism_threads()),
        inter_op_threads=float(tf.config.threading.get_inter_op_parallelism_threads()),
    )
    _write_json(ctx.row_dir / METRICS_FILE, metrics)  # every metric, also those the spec's outcomes leave out
    return metrics


def predict(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The model's output for ``images`` (inference mode, batch-norm moving statistics)."""
    import tensorflow as tf

    run = tf.function(lambda x: model(x, training=False))
    return np.concatenate([run(images[i : i + batch]).numpy() for i in range(0, len(images), batch)])


def image_metrics(predicted: np.ndarray, target: np.ndarray) -> dict:
    """Mean over images of MAE, MSE and SSIM (max_val 1, as the ssim loss) against ``target``."""
    import tensorflow as tf

    predicted = np.asarray(predicted, dtype=np.float32)
    target = np.asarray(target, dtype=np.float32)
    error = predicted - target
    ssim = np.concatenate(
        [
            losses.ssim(tf.constant(target[i : i + 64]), tf.constant(predicted[i : i + 64])).numpy()
            for i in range(0, len(target), 64)
        ]
    )
    return {"mae": float(np.mean(np.abs(error))), "mse": float(np.mean(error**2)), "ssim": float(np.mean(ssim))}


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _save_examples(path, test: dataset.Pairs, predictions: np.ndarray, count: int) -> None:
    """``count`` test images spread over the split: input, prediction, target (float16) and source id."""
    chosen = np.linspace(0, len(test) - 1, num=min(count, len(test))).astype(int)
    np.savez_compressed(
        path,
        x=test.x[chosen, ..., 0].astype(np.float16),
        prediction=predictions[chosen, ..., 0].astype(np.float16),
        y=test.y[chosen, ..., 0].astype(np.float16),
        source=test.source[chosen],
    )


def _write_json(path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    temporary.replace(path)


def _as_noise_list(value) -> tuple:
    """``[rad15, pois]``, ``"rad15,pois"``, ``"rad15"`` or ``""`` as a tuple of noise names."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [part for part in text.replace(";", ",").split(",")]
    return tuple(str(v).strip() for v in value if str(v).strip())
