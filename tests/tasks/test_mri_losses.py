"""The five losses against independent references (scikit-image, scipy, numpy, tf.image) on small arrays."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from gridrunner.tasks.mri import losses

tf = pytest.importorskip("tensorflow")


def pair(size=48, batch=3, noise=0.1, seed=0):
    """A smooth random target and a noisy prediction of it, (batch, size, size, 1) float32."""
    rng = np.random.default_rng(seed)
    target = ndimage.gaussian_filter(rng.random((batch, size, size)), sigma=(0, 2, 2))
    target = (target - target.min()) / (target.max() - target.min())
    prediction = np.clip(target + noise * rng.standard_normal(target.shape), 0, 1)
    return target[..., None].astype(np.float32), prediction[..., None].astype(np.float32)


def reference_ssim(target, prediction):
    """scikit-image's SSIM with the settings of Wang et al. (2004), per image."""
    return np.array(
        [
            structural_similarity(t[..., 0], p[..., 0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False)
            for t, p in zip(target.astype(np.float64), prediction.astype(np.float64))
        ]
    )


def reference_ms_ssim(target, prediction, factors):
    """MS-SSIM in numpy/scipy: valid Gaussian windows, 2 x 2 block means between scales."""
    window = np.outer(*(2 * [np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)]))
    window /= window.sum()
    c1, c2 = 0.01**2, 0.03**2

    def local_mean(z):
        return ndimage.correlate(z, window, mode="constant")[5:-5, 5:-5]

    values = []
    for t, p in zip(target[..., 0].astype(np.float64), prediction[..., 0].astype(np.float64)):
        terms = []
        for scale in range(len(factors)):
            if scale:
                t = t.reshape(t.shape[0] // 2, 2, t.shape[1] // 2, 2).mean(axis=(1, 3))
                p = p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2).mean(axis=(1, 3))
            mt, mp = local_mean(t), local_mean(p)
            luminance = (2 * mt * mp + c1) / (mt**2 + mp**2 + c1)
            covariance = local_mean(t * p) - mt * mp
            variances = local_mean(t * t) - mt**2 + local_mean(p * p) - mp**2
            cs = (2 * covariance + c2) / (variances + c2)
            terms.append((luminance * cs if scale == len(factors) - 1 else cs).mean())
        values.append(np.prod(np.maximum(terms, 1e-4) ** np.array(factors)))
    return np.array(values)


def loss_value(name, target, prediction):
    return float(losses.get_loss(name, target.shape[1])(tf.constant(target), tf.constant(prediction)))


def test_l1_and_l2_match_numpy():
    target, prediction = pair()
    assert loss_value("l1", target, prediction) == pytest.approx(np.abs(target - prediction).mean(), rel=1e-5)
    assert loss_value("l2", target, prediction) == pytest.approx(((target - prediction) ** 2).mean(), rel=1e-5)


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.4])
def test_ssim_matches_scikit_image_and_tf_image(noise):
    target, prediction = pair(noise=noise)
    ours = losses.ssim(tf.constant(target), tf.constant(prediction)).numpy()
    np.testing.assert_allclose(ours, reference_ssim(target, prediction), atol=2e-5)
    np.testing.assert_allclose(ours, tf.image.ssim(target, prediction, max_val=1.0).numpy(), atol=2e-5)
    assert loss_value("ssim", target, prediction) == pytest.approx(1 - reference_ssim(target, prediction).mean(), abs=2e-5)


@pytest.mark.parametrize("size, scales", [(32, 2), (64, 3), (128, 4), (176, 5), (256, 5)])
def test_ms_ssim_scales_fit_the_image(size, scales):
    assert losses.ms_ssim_scales(size) == scales
    factors = losses.power_factors(size)
    assert len(factors) == scales and sum(factors) == pytest.approx(1.0)
    assert factors[0] / factors[1] == pytest.approx(0.0448 / 0.2856)


def test_ms_ssim_at_64_uses_three_renormalised_factors():
    assert losses.power_factors(64) == pytest.approx(np.array([0.0448, 0.2856, 0.3001]) / 0.6305)


@pytest.mark.parametrize("size", [32, 64])
def test_ms_ssim_matches_numpy_reference_and_tf_image(size):
    target, prediction = pair(size=size)
    factors = losses.power_factors(size)
    ours = losses.ms_ssim(tf.constant(target), tf.constant(prediction), factors).numpy()
    np.testing.assert_allclose(ours, reference_ms_ssim(target, prediction, factors), atol=2e-5)
    theirs = tf.image.ssim_multiscale(target, prediction, max_val=1.0, power_factors=factors).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert loss_value("ms_ssim", target, prediction) == pytest.approx(1 - ours.mean(), abs=1e-6)


def test_ms_ssim_gl1_is_the_zhao_mix_with_a_scipy_gaussian_l1():
    target, prediction = pair(size=64)
    factors = losses.power_factors(64)
    sigma = 1.5 * 2 ** (len(factors) - 1)
    gaussian_l1 = np.mean([ndimage.gaussian_filter(np.abs(t - p)[..., 0].astype(np.float64), sigma, mode="constant",
                                                   truncate=3.0) for t, p in zip(target, prediction)])
    ms_ssim = reference_ms_ssim(target, prediction, factors).mean()
    expected = 0.84 * (1 - ms_ssim) + 0.16 * gaussian_l1
    assert loss_value("ms_ssim_gl1", target, prediction) == pytest.approx(expected, abs=2e-5)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_every_loss_is_zero_for_a_perfect_prediction_and_grows_with_noise(name):
    target, _ = pair()
    values = [loss_value(name, target, pair(noise=noise)[1]) for noise in (0.0, 0.05, 0.2)]
    assert values[0] == pytest.approx(0.0, abs=1e-4)
    assert values[0] < values[1] < values[2]


@pytest.mark.parametrize("name", losses.LOSSES)
def test_gradients_stay_finite_for_an_anti_correlated_prediction(name):
    """tf.image.ssim_multiscale's gradient is NaN here; the clamped MS-SSIM's is not."""
    target, _ = pair(size=64)
    prediction = tf.Variable(1.0 - target)
    with tf.GradientTape() as tape:
        value = losses.get_loss(name, 64)(tf.constant(target), prediction)
    assert np.isfinite(value.numpy())
    assert np.all(np.isfinite(tape.gradient(value, prediction).numpy()))


def test_unknown_loss_and_too_small_images_are_value_errors():
    with pytest.raises(ValueError, match="unknown loss 'ms-ssim'.*ms_ssim_gl1"):
        losses.check_loss("ms-ssim", 64)
    with pytest.raises(ValueError, match="smaller than the 11-pixel"):
        losses.check_loss("ssim", 8)
