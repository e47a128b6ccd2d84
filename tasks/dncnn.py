"""DnCNN (Zhang et al. 2016) removing undersampling artefacts from MRI slices: the DeepMRI study's DnCNN grid.

The network: a convolution with ReLU; ``depth`` blocks of convolution, batch normalisation
and ReLU; a last convolution back to one channel. All convolutions have ``filters`` filters of
``kernel`` x ``kernel`` and "same" padding, so any image size works. ``skip`` chooses the
residual scheme the study compared:

* ``dncnn``: one additive skip from the input to the output. The study's data change the
  image rather than add noise to it, so the network predicts the clean image as
  input + residual.
* ``resnet``: that skip, plus an additive skip around every two blocks (He et al. 2016).
* ``none``: no skip (a plain CNN), for comparison.

Parameters (row or ``fixed``): ``depth``, ``filters``, ``kernel``, ``skip``, ``loss`` (l1, l2,
ssim, ms_ssim, ms_ssim_gl1), ``batch_size``, ``bn_momentum`` (0.99, Keras' default; 0.9 settles
faster in short runs), the training parameters of :mod:`gridrunner.tasks.mri.training` (``steps``,
``learning_rate``, ``checkpoint_every``, ``threads``, ``eval_noise``, ``seed``, ...) and the data
parameters of :mod:`gridrunner.tasks.mri.dataset` (``size``, ``noise``, ``copies``, ``augment``, ``data``,
``cache_dir``, ...). Returns ``m_mae``, ``m_mse``, ``m_ssim`` and the benchmark ``bench_*``.

How long: the study's 504 rows (4,000 steps of batch 3 at 256 x 256) took 530 GPU hours, most
under an hour and the largest (depth 25, 128 filters, 7 x 7) up to 12 hours. On one CPU core a
depth-5, 16-filter model trains at about 190 images/s at 64 x 64 (L1 loss).
"""
from __future__ import annotations

from gridrunner.tasks.mri import training

SKIPS = ("dncnn", "resnet", "none")
MODEL_DEFAULTS = {
    "depth": 17,
    "filters": 64,
    "kernel": 3,
    "skip": "dncnn",
    "loss": "l2",
    "batch_size": 8,
    "bn_momentum": 0.99,
}


def check_model(depth: int = 17, filters: int = 64, kernel: int = 3, skip: str = "dncnn", bn_momentum: float = 0.99) -> None:
    """Raise ValueError for settings that cannot build a DnCNN."""
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a whole number >= 0, got {depth!r}")
    if not isinstance(filters, int) or filters < 1:
        raise ValueError(f"filters must be a whole number >= 1, got {filters!r}")
    if not isinstance(kernel, int) or kernel < 1:
        raise ValueError(f"kernel must be a whole number >= 1, got {kernel!r}")
    if skip not in SKIPS:
        raise ValueError(f"skip must be one of {', '.join(SKIPS)}, got {skip!r}")
    if not 0 <= bn_momentum < 1:
        raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum!r}")


def get_model(depth: int = 17, filters: int = 64, kernel: int = 3, skip: str = "dncnn", bn_momentum: float = 0.99, channels: int = 1):
    """A Keras DnCNN for (height, width, ``channels``) images of any size."""
    import keras
    from keras import layers

    check_model(depth, filters, kernel, skip, bn_momentum)
    inputs = keras.Input(shape=(None, None, channels), name="undersampled")
    x = layers.Conv2D(filters, kernel, padding="same", activation="relu", name="first")(inputs)
    shortcut = x
    for block in range(1, depth + 1):
        x = conv_bn_relu(x, filters, kernel, bn_momentum, name=f"block{block}")
        if skip == "resnet" and block % 2 == 0:
            x = layers.Add(name=f"skip{block // 2}")([x, shortcut])
            shortcut = x
    x = layers.Conv2D(channels, kernel, padding="same", name="last")(x)
    if skip != "none":
        x = layers.Add(name="residual")([inputs, x])
    return keras.Model(inputs, x, name=f"dncnn_{skip}_d{depth}_f{filters}_k{kernel}")


def conv_bn_relu(x, filters: int, kernel: int, bn_momentum: float, name: str):
    """Convolution (no bias: batch norm has one), batch normalisation, ReLU."""
    from keras import layers

    x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def run(params: dict, ctx) -> dict:
    """gridrunner task: train one DnCNN on the row's data, return its test metrics and the benchmark."""
    model, config, data = training.split_params(params, MODEL_DEFAULTS)
    loss, batch_size = model.pop("loss"), model.pop("batch_size")
    check_model(**model)  # before any data is built or TensorFlow is loaded
    return training.train_and_evaluate(lambda: get_model(**model), loss, batch_size, config, data, ctx)
