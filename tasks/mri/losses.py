"""The study's five training losses, and the test metrics, in TensorFlow.

Images are (batch, size, size, 1) tensors with values around [0, 1] (``max_val`` = 1).

* ``l1``: mean absolute error.
* ``l2``: mean squared error.
* ``ssim``: 1 - SSIM (Wang et al. 2004): 11 x 11 Gaussian window of sigma 1.5, k1 = 0.01,
  k2 = 0.03, biased covariance, mean over the valid window positions. Same value as
  ``tf.image.ssim`` and as scikit-image's ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1)``.
* ``ms_ssim``: 1 - MS-SSIM (Wang et al. 2003) on :func:`ms_ssim_scales` scales (2 x 2 average
  pooling between scales, as ``tf.image.ssim_multiscale``) with the first that many of the
  five power factors (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), re-normalised to sum to one.
  At 64 x 64 that is 3 scales with (0.0448, 0.2856, 0.3001) / 0.6305; at 128, 4 scales; at
  176 and above, all 5. (``tf.image.ssim_multiscale`` with its default five factors fails
  below 161 pixels.) Each scale's term is clamped at 1e-4 before its power: the contrast
  term of a noisy or anti-correlated prediction can be <= 0, where ``tf.image.ssim_multiscale``
  (which clamps at 0) has an infinite gradient and training goes NaN. The clamp leaves
  every ordinary value unchanged.
* ``ms_ssim_gl1``: Zhao et al. (2017), alpha * (1 - MS-SSIM) + (1 - alpha) * Gaussian-weighted
  L1 with alpha = 0.84. The L1 error map is convolved with a normalised Gaussian of the
  coarsest scale's width (sigma = 1.5 * 2 ** (scales - 1) full-resolution pixels: 6 at
  64 x 64), zero-padded at the border, and averaged.
"""
from __future__ import annotations

import numpy as np

LOSSES = ("l1", "l2", "ssim", "ms_ssim", "ms_ssim_gl1")
MS_SSIM_POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
FILTER_SIZE = 11
FILTER_SIGMA = 1.5
K1, K2 = 0.01, 0.03
MS_SSIM_FLOOR = 1e-4
GL1_ALPHA = 0.84


def ms_ssim_scales(size: int, filter_size: int = FILTER_SIZE) -> int:
    """How many MS-SSIM scales (at most 5) fit an image of ``size`` pixels: the coarsest must hold the filter."""
    scales = 0
    while scales < len(MS_SSIM_POWER_FACTORS) and size >= filter_size:
        scales += 1
        size = (size + 1) // 2  # odd sizes are padded by one pixel before pooling
    return scales


def power_factors(size: int) -> tuple[float, ...]:
    """The MS-SSIM power factors used at ``size`` pixels (re-normalised to sum to one)."""
    scales = ms_ssim_scales(size)
    if scales == 0:
        raise ValueError(f"images of {size} pixels are smaller than the {FILTER_SIZE}-pixel SSIM window")
    factors = np.array(MS_SSIM_POWER_FACTORS[:scales])
    return tuple(float(f) for f in factors / factors.sum())


def check_loss(name: str, size: int) -> None:
    """Raise ValueError, before any training, when ``name`` is unknown or cannot work at ``size``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    if size < FILTER_SIZE:
        raise ValueError(f"images of {size} pixels are smaller than the {FILTER_SIZE}-pixel SSIM window used to test them")


def get_loss(name: str, size: int):
    """The loss ``name`` as ``loss(y_true, y_pred) -> scalar`` for images of ``size`` x ``size``."""
    import tensorflow as tf

    check_loss(name, size)
    if name == "l1":
        return lambda y_true, y_pred: tf.reduce_mean(tf.abs(y_true - y_pred))
    if name == "l2":
        return lambda y_true, y_pred: tf.reduce_mean(tf.square(y_true - y_pred))
    if name == "ssim":
        return lambda y_true, y_pred: 1.0 - tf.reduce_mean(ssim(y_true, y_pred))
    factors = power_factors(size)
    if name == "ms_ssim":
        return lambda y_true, y_pred: 1.0 - tf.reduce_mean(ms_ssim(y_true, y_pred, factors))
    sigma = FILTER_SIGMA * 2 ** (len(factors) - 1)

    def ms_ssim_gl1(y_true, y_pred):
        ms_ssim_loss = 1.0 - tf.reduce_mean(ms_ssim(y_true, y_pred, factors))
        return GL1_ALPHA * ms_ssim_loss + (1.0 - GL1_ALPHA) * gaussian_l1(y_true, y_pred, sigma)

    return ms_ssim_gl1


def ssim(y_true, y_pred, max_val: float = 1.0):
    """SSIM per image, shape (batch,)."""
    import tensorflow as tf

    luminance, contrast_structure = _ssim_maps(y_true, y_pred, max_val)
    return tf.reduce_mean(luminance * contrast_structure, axis=[1, 2, 3])


def ms_ssim(y_true, y_pred, factors, max_val: float = 1.0):
    """MS-SSIM per image, shape (batch,), with each scale's term clamped at ``MS_SSIM_FLOOR``."""
    import tensorflow as tf

    terms = []
    for scale in range(len(factors)):
        if scale > 0:
            y_true, y_pred = _halve(y_true), _halve(y_pred)
        luminance, contrast_structure = _ssim_maps(y_true, y_pred, max_val)
        last = scale == len(factors) - 1
        term = luminance * contrast_structure if last else contrast_structure
        terms.append(tf.reduce_mean(term, axis=[1, 2, 3]))
    terms = tf.maximum(tf.stack(terms, axis=-1), MS_SSIM_FLOOR)
    return tf.reduce_prod(terms ** tf.constant(factors, dtype=terms.dtype), axis=-1)


def gaussian_l1(y_true, y_pred, sigma: float):
    """Mean of the absolute error map convolved with a normalised Gaussian (zero padding, radius 3 sigma)."""
    import tensorflow as tf

    taps = tf.constant(gaussian_taps(sigma), dtype=y_pred.dtype)
    error = tf.abs(y_true - y_pred)
    error = tf.nn.conv2d(error, tf.reshape(taps, (-1, 1, 1, 1)), strides=1, padding="SAME")
    error = tf.nn.conv2d(error, tf.reshape(taps, (1, -1, 1, 1)), strides=1, padding="SAME")
    return tf.reduce_mean(error)


def gaussian_taps(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """1-D normalised Gaussian of radius ``int(truncate * sigma + 0.5)`` (scipy.ndimage's convention)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _gaussian_window(size: int = FILTER_SIZE, sigma: float = FILTER_SIGMA) -> np.ndarray:
    """The 2-D SSIM window, as ``tf.image.ssim`` builds it (centred at (size - 1) / 2, sums to one)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    window = np.outer(taps, taps)
    return (window / window.sum()).astype(np.float32).reshape(size, size, 1, 1)


def _ssim_maps(x, y, max_val: float):
    """Luminance and contrast-structure maps over the valid window positions."""
    import tensorflow as tf

    window = tf.constant(_gaussian_window(), dtype=x.dtype)

    def local_mean(z):
        return tf.nn.conv2d(z, window, strides=1, padding="VALID")

    c1 = (K1 * max_val) ** 2
    c2 = (K2 * max_val) ** 2
    mean_x, mean_y = local_mean(x), local_mean(y)
    mean_xy = mean_x * mean_y
    mean_squares = tf.square(mean_x) + tf.square(mean_y)
    luminance = (2.0 * mean_xy + c1) / (mean_squares + c1)
    covariance = local_mean(x * y) - mean_xy
    variances = local_mean(tf.square(x) + tf.square(y)) - mean_squares
    contrast_structure = (2.0 * covariance + c2) / (variances + c2)
    return luminance, contrast_structure


def _halve(images):
    """2 x 2 average pooling; an odd side is first padded by one mirrored pixel (as tf.image.ssim_multiscale)."""
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    if (height is not None and height % 2) or (width is not None and width % 2):
        images = tf.pad(images, [[0, 0], [0, (height or 0) % 2], [0, (width or 0) % 2], [0, 0]], mode="SYMMETRIC")
    return tf.nn.avg_pool2d(images, ksize=2, strides=2, padding="VALID")
