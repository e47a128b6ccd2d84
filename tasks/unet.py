"""The study's scalable U-Net (Ronneberger et al. 2015, modified for denoising) on undersampled MRI slices.

``filters`` and ``reps`` are lists with one entry per level; their (odd) length sets the depth.
Level ``i`` is a Repeat block of ``reps[i]`` convolutions with ``filters[i]`` filters of
``kernel`` x ``kernel``, each followed by batch normalisation and ReLU (the very first convolution
has no batch normalisation, as a DnCNN's). With ``L`` levels the first ``L // 2`` form the
encoder, the middle one the bottom and the last ``L // 2`` the decoder:

* ``sampling``: max-pooling (2 x 2) after each encoder level and a transposed convolution
  (2 x 2, stride 2, ``filters[i]`` filters) before each decoder level;
* ``uskip``: each decoder level also gets the output of its mirror encoder level, concatenated;
* ``dncnn_skip``: an additive skip from the input to the output (input + residual).

A last convolution maps to one channel. With ``sampling: false, uskip: false, dncnn_skip: true``
the network is exactly a DnCNN of depth ``sum(reps) - 1`` (:func:`gridrunner.tasks.dncnn.get_model`), as in
the study. Shapes that cannot work (lengths that differ, an even length, a depth whose pooling
does not divide the image size) raise ValueError before any data is built or TensorFlow loads.

Parameters use the study's names: ``filters``, ``reps``, ``kernel``, ``batch``, ``lossflavour``
(l1, l2, ssim, ms_ssim, ms_ssim_gl1), ``steps``, ``sampling``, ``uskip``, ``dncnn_skip``,
``bn_momentum``, plus the training and data parameters shared with :mod:`gridrunner.tasks.dncnn`.
Returns ``m_mae``, ``m_mse``, ``m_ssim`` and the benchmark ``bench_*``.
"""
from __future__ import annotations

import json

from gridrunner.tasks.dncnn import conv_bn_relu
from gridrunner.tasks.mri import training

MODEL_DEFAULTS = {
    "filters": [64, 128, 256, 128, 64],
    "reps": [2, 2, 2, 2, 2],
    "kernel": 3,
    "sampling": True,
    "uskip": True,
    "dncnn_skip": True,
    "lossflavour": "l2",
    "batch": 4,
    "bn_momentum": 0.99,
}


def check_model(filters, reps, kernel: int = 3, sampling: bool = True, image_size: int | None = None) -> None:
    """Raise ValueError for a U-Net that cannot be built (or cannot take ``image_size`` x ``image_size`` images)."""
    filters, reps = _int_list(filters, "filters"), _int_list(reps, "reps")
    if len(filters) != len(reps):
        raise ValueError(
            f"filters and reps must have one entry per level, got {len(filters)} filters {filters} and {len(reps)} reps {reps}"
        )
    if len(filters) % 2 == 0:
        raise ValueError(f"the number of levels must be odd (encoder, bottom, decoder), got {len(filters)}: {filters}")
    if any(f < 1 for f in filters) or any(r < 1 for r in reps):
        raise ValueError(f"every level needs at least one filter and one convolution, got filters {filters}, reps {reps}")
    if not isinstance(kernel, int) or kernel < 1:
        raise ValueError(f"kernel must be a whole number >= 1, got {kernel!r}")
    poolings = len(filters) // 2 if sampling else 0
    if image_size is not None and poolings:
        factor = 2**poolings
        if image_size % factor or image_size // factor < 2:
            raise ValueError(
                f"a U-Net of {len(filters)} levels pools {poolings} times, which needs an image size divisible by "
                f"{factor} and at least {2 * factor} pixels; got {image_size} (use fewer levels or a larger size)"
            )


def get_model(
    filters=(64, 128, 256, 128, 64),
    reps=(2, 2, 2, 2, 2),
    kernel: int = 3,
    sampling: bool = True,
    uskip: bool = True,
    dncnn_skip: bool = True,
    bn_momentum: float = 0.99,
    channels: int = 1,
    image_size: int | None = None,
):
    """A Keras scalable U-Net; see the module docstring. ``image_size`` only validates the depth."""
    import keras
    from keras import layers

    filters, reps = _int_list(filters, "filters"), _int_list(reps, "reps")
    sampling, uskip, dncnn_skip = _bool(sampling, "sampling"), _bool(uskip, "uskip"), _bool(dncnn_skip, "dncnn_skip")
    check_model(filters, reps, kernel, sampling, image_size)
    half = len(filters) // 2
    inputs = keras.Input(shape=(None, None, channels), name="undersampled")
    x = inputs
    encoder_outputs = []
    first = True
    for level, (level_filters, level_reps) in enumerate(zip(filters, reps)):
        if level > half:  # decoder: up, then join the mirror encoder level
            if sampling:
                x = layers.Conv2DTranspose(level_filters, 2, strides=2, padding="same", name=f"level{level}_up")(x)
            if uskip:
                x = layers.Concatenate(name=f"level{level}_uskip")([x, encoder_outputs.pop()])
        for rep in range(level_reps):
            name = f"level{level}_conv{rep}"
            if first:
                x = layers.Conv2D(level_filters, kernel, padding="same", activation="relu", name=name)(x)
                first = False
            else:
                x = conv_bn_relu(x, level_filters, kernel, bn_momentum, name=name)
        if level < half:  # encoder: remember, then down
            encoder_outputs.append(x)
            if sampling:
                x = layers.MaxPooling2D(2, name=f"level{level}_down")(x)
    x = layers.Conv2D(channels, kernel, padding="same", name="last")(x)
    if dncnn_skip:
        x = layers.Add(name="residual")([inputs, x])
    return keras.Model(inputs, x, name=f"unet_{len(filters)}levels")


def run(params: dict, ctx) -> dict:
    """gridrunner task: train one U-Net on the row's data, return its test metrics and the benchmark."""
    model, config, data = training.split_params(params, MODEL_DEFAULTS)
    loss, batch = model.pop("lossflavour"), model.pop("batch")
    model["filters"], model["reps"] = _int_list(model["filters"], "filters"), _int_list(model["reps"], "reps")
    for key in ("sampling", "uskip", "dncnn_skip"):
        model[key] = _bool(model[key], key)
    check_model(model["filters"], model["reps"], model["kernel"], model["sampling"], data.size)
    return training.train_and_evaluate(lambda: get_model(**model, image_size=data.size), loss, batch, config, data, ctx)


def _int_list(value, name: str) -> list[int]:
    """A list of whole numbers from a list, a tuple or its JSON text (as a CSV cell may hold it)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{name} must be a list of whole numbers, got {value!r}") from None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a non-empty list of whole numbers, got {value!r}")
    return list(value)


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")
