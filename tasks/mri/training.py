"""Train one denoiser on undersampled/fully sampled pairs, test it, and resume where a requeued row stopped.

:func:`train_and_evaluate` is the body shared by :mod:`gridrunner.tasks.dncnn` and :mod:`gridrunner.tasks.unet`:

1. TensorFlow is set up: ``threads`` intra-op and inter-op threads (0: TensorFlow's default, which
   depends on the machine's cores; bit-identical results need a fixed count), op
   determinism when ``deterministic`` (the default; it cost nothing measurable here), GPU
   memory growth when there is a GPU (Keras uses it without any change), or a 1/k share of
   the GPU's memory when k rows share it (``rows_per_gpu``, :mod:`gridrunner.packing`), and the seed.
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
   Every ``eval_every`` steps the learning curve also gets ``val_mae`` and ``val_ssim``: the model
   in inference mode on ``eval_images`` test images, the same fixed ones for every row of a data
   configuration, whatever its loss, with the row's best so far (``val_ssim_best``, ``val_mae_best``)
   and the step it was reached at (``val_ssim_best_step``, ``val_mae_best_step``); a resumed row goes on
   from the best of the steps its checkpoint kept. That is the signal a grid's
   ``prune:`` rule can share across losses; a rule on the best is not fired by one noisy validation,
   and one on the step of the best (``step - val_ssim_best_step >= 200``) fires only on a row that has stopped improving.
   It reads the model and changes nothing: the trained weights and the final metrics are the same with
   it off (``eval_every: 0``). Its time goes to ``eval_s`` in ``metrics.json`` and is
   left out of ``train_images_per_s``.
6. The model is tested on the held-out split: ``m_mae``, ``m_mse``, ``m_ssim`` (mean over test
   images), the same for the undersampled input (``bench_*``, the study's benchmark line),
   and for each noise in ``eval_noise`` the same six prefixed by its name (``rad15_m_ssim``,
   ``pois_bench_ssim``, ...), as in the study's generalisation test. A few test images with
   their predictions go to ``<row>/examples.npz``, and every metric (also the timings, the
   generalisation metrics, the final training loss) to ``<row>/metrics.json``.

Why not ``model.fit``: a requeued row must resume at the step it stopped at, not at an epoch
boundary, and a NaN must end the row with its step; a custom step does both in a few lines.
Measured on this 2-core CPU, it trains at the same images/s as ``model.fit`` of the same model on
the same data (``bench/bench_training.py``).

Faster steps, both off by default (so the metrics of existing grids do not change):

* ``jit_compile: true`` compiles the training step with XLA. On a CPU it is slower, and with the
  MS-SSIM losses its compile did not finish in 10 minutes: it is meant for GPUs.
* ``precision: mixed_bfloat16 | mixed_float16`` builds the model under that Keras mixed-precision
  policy: layers compute in 16 bits, variables stay float32. The model's output is cast to float32
  before the loss (the SSIM losses need float32 images), and so are the test predictions.
  ``mixed_float16`` trains with :class:`keras.optimizers.LossScaleOptimizer` (dynamic loss
  scaling: a step whose scaled gradients overflow is skipped and the scale lowered).
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
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TrainingConfig:
    """How a row trains and is tested (the parameters every MRI task shares besides the data's)."""

    steps: int = 4000
    learning_rate: float = 1e-3
    checkpoint_every: int = 500  # steps; also saved when asked to stop
    log_every: int = 0  # steps between learning-curve points; 0 = steps / 50
    eval_every: int | None = None  # steps between val_mae/val_ssim points; None = 2 * log_every; 0 = off
    eval_images: int = 16  # the fixed test images those are measured on
    threads: int = 0  # TensorFlow intra- and inter-op threads; 0 = its default (all cores)
    deterministic: bool = True
    eval_noise: tuple = ()  # extra test noises, e.g. [rad15, pois]
    eval_batch: int = 32
    examples: int = 3  # test images saved with their predictions
    cache_dir: str = ""  # "" = $GRIDRUNNER_DATA_CACHE, else <grid>/cache
    seed: int | None = None  # default: the row's seed (ctx.seed)
    jit_compile: bool = False  # XLA for the training step (GPUs; slower on CPU)
    precision: str = "float32"  # or mixed_bfloat16, mixed_float16 (with loss scaling)

    @property
    def schedule(self) -> tuple[int, int]:
        """(steps between learning-curve points, steps between validations; 0 = none)."""
        log_every = self.log_every or max(self.steps // 50, 1)
        return log_every, 2 * log_every if self.eval_every is None else self.eval_every


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
    if config.eval_every is not None and (isinstance(config.eval_every, bool) or not isinstance(config.eval_every, int)
                                          or config.eval_every < 0):
        raise ValueError(f"eval_every must be a whole number of steps >= 0 (0 turns it off), got {config.eval_every!r}")
    if isinstance(config.eval_images, bool) or not isinstance(config.eval_images, int) or config.eval_images < 1:
        raise ValueError(f"eval_images must be a whole number >= 1, got {config.eval_images!r}")
    check_speed_options(config.jit_compile, config.precision)
    data = dataset.DataConfig.from_params(params)
    for noise in config.eval_noise:
        dataset.undersampling.parse_noise(noise)
    return model, config, data


def check_speed_options(jit_compile, precision) -> None:
    """Raise ValueError unless ``jit_compile`` is a boolean and ``precision`` one of :data:`PRECISIONS`."""
    if not isinstance(jit_compile, bool):
        raise ValueError(f"jit_compile must be true or false, got {jit_compile!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def configure_tensorflow(threads: int = 0, deterministic: bool = True, seed: int = 0) -> None:
    """Threads, determinism, GPU memory (growth, or a share of the GPU when rows share it) and seeds;
    call before building anything."""
    import keras
    import tensorflow as tf

    from gridrunner.packing import configure_gpu_memory

    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        configure_gpu_memory(tf)
    except RuntimeError:
        # TensorFlow was already initialised in this process (several rows in one notebook or
        # test session): the first setting stays, which only matters for bit-exact reruns.
        pass
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)


def build_model_in(precision: str, build_model):
    """``build_model()`` under the Keras policy ``precision``; the global policy is restored after."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        return build_model()
    finally:
        keras.mixed_precision.set_global_policy(previous)


def make_optimizer(learning_rate: float, precision: str = "float32"):
    """Adam; wrapped in a dynamic :class:`keras.optimizers.LossScaleOptimizer` for ``mixed_float16``."""
    import keras

    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_train_step(model, loss_fn, optimizer, jit_compile: bool = False):
    """One training step as a ``tf.function`` (XLA-compiled with ``jit_compile``); returns the float32 loss.

    The loss is computed in float32 whatever the model's compute dtype, and scaled by the optimizer
    when it scales losses (``optimizer.scale_loss`` is the identity for plain Adam)."""
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss_value = loss_fn(y, tf.cast(model(x, training=True), tf.float32))
            scaled = optimizer.scale_loss(loss_value)
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss_value

    return train_step


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The training pairs of step ``step``: position ``step`` in a seeded permutation per epoch."""
    per_epoch = max(n // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = _permutation(n, seed, epoch)
    return order[position * batch_size : (position + 1) * batch_size]


def train_and_evaluate(build_model, loss: str, batch_size: int, config: TrainingConfig, data: dataset.DataConfig, ctx) -> dict:
    """Train ``build_model()`` with ``loss`` and return the test metrics (see the module docstring)."""
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

    model = build_model_in(config.precision, build_model)
    loss_fn = losses.get_loss(loss, data.size)
    optimizer = make_optimizer(config.learning_rate, config.precision)
    optimizer.build(model.trainable_variables)  # so a checkpoint restores its slots at once
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(checkpoint, str(ctx.checkpoint_dir), max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    start_step = int(step_var.numpy())

    train_step = make_train_step(model, loss_fn, optimizer, config.jit_compile)

    def save(step: int) -> None:
        step_var.assign(step)
        manager.save(checkpoint_number=step)

    log_every, eval_every = config.schedule
    validation = validation_batch(tests[""], config.eval_images) if eval_every else None
    # traced once, reused at every validation; float32 whatever the model's precision
    infer = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32))
    eval_time = 0.0
    best = best_so_far(ctx.history(), start_step) if validation is not None and start_step else {}
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
        record = {}
        if done % log_every == 0 or done == config.steps:
            elapsed = time.perf_counter() - window_start
            train_time += elapsed
            last_loss = float(np.mean(window))
            record.update(loss=last_loss, images_per_s=len(window) * batch_size / max(elapsed, 1e-9))
            window, window_start = [], time.perf_counter()
        if validation is not None and (done % eval_every == 0 or done == config.steps):
            eval_started = time.perf_counter()
            record.update(validate(infer, validation))
            best = improve(best, record, done)
            record.update(best)
            spent = time.perf_counter() - eval_started
            eval_time += spent
            window_start += spent  # the training clock leaves validation out
        if record:
            ctx.log(done, **record)
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
        eval_s=eval_time,
        train_pairs=float(len(train)),
        test_pairs=float(len(tests[""])),
        parameters=float(model.count_params()),
        # What the row ran with (0: TensorFlow's default, every core it sees); results depend on both.
        intra_op_threads=float(tf.config.threading.get_intra_op_parallelism_threads()),
        inter_op_threads=float(tf.config.threading.get_inter_op_parallelism_threads()),
    )
    _write_json(ctx.row_dir / METRICS_FILE, metrics)  # every metric, also those the spec's outcomes leave out
    return metrics


def validation_batch(test: dataset.Pairs, count: int) -> dataset.Pairs:
    """``count`` test pairs spread evenly over the split: fixed by the data alone, so every row of a data
    configuration (whatever its loss, model or seed) is measured on the same images."""
    chosen = np.unique(np.linspace(0, len(test) - 1, num=min(count, len(test))).astype(int))
    return dataset.Pairs(test.x[chosen], test.y[chosen], test.source[chosen], test.group[chosen])


def improve(best: dict, record: dict, step: int) -> dict:
    """The best so far after a validation at ``step``: ``val_ssim_best`` and ``val_mae_best``, and the step each
    was reached at (``val_ssim_best_step``, ``val_mae_best_step``; a tie is no improvement), so a rule can
    read how long a row has gone without improving (``step - val_ssim_best_step >= 200``)."""
    out = dict(best)
    if record["val_ssim"] > best.get("val_ssim_best", -math.inf):
        out.update(val_ssim_best=record["val_ssim"], val_ssim_best_step=step)
    if record["val_mae"] < best.get("val_mae_best", math.inf):
        out.update(val_mae_best=record["val_mae"], val_mae_best_step=step)
    return out


def best_so_far(history: list[dict], up_to: int) -> dict:
    """:func:`improve` over the validations of ``history`` up to step ``up_to`` (a row resumed from its
    checkpoint at that step goes on from them; later records are of a run that was lost)."""
    best = {}
    for record in history:
        step = record.get("step", math.inf)
        if step <= up_to and "val_ssim" in record and "val_mae" in record:
            best = improve(best, record, step)
    return best


def validate(infer, validation: dataset.Pairs) -> dict:
    """``val_mae`` and ``val_ssim`` of ``infer`` (the model in inference mode) on the validation pairs."""
    scores = image_metrics(infer(validation.x).numpy(), validation.y)
    return {"val_mae": scores["mae"], "val_ssim": scores["ssim"]}


def predict(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The model's output for ``images`` (inference mode, batch-norm moving statistics)."""
    import tensorflow as tf

    run = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32))
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
