"""DnCNN and U-Net: they build for a spread of parameters, the U-Net reduces to a DnCNN, bad shapes are ValueErrors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gridrunner.tasks import dncnn, unet

keras = pytest.importorskip("keras")


def images(size=32, batch=2):
    return np.random.default_rng(0).random((batch, size, size, 1)).astype(np.float32)


def layer_types(model):
    return [type(layer).__name__ for layer in model.layers]


@pytest.mark.parametrize("depth, filters, kernel", [(0, 4, 3), (1, 8, 5), (4, 16, 3), (7, 8, 7)])
@pytest.mark.parametrize("skip", dncnn.SKIPS)
def test_dncnn_builds_and_keeps_the_image_shape(depth, filters, kernel, skip):
    model = dncnn.get_model(depth, filters, kernel, skip)
    assert model(images(), training=False).shape == (2, 32, 32, 1)
    kinds = layer_types(model)
    assert kinds.count("BatchNormalization") == depth
    assert kinds.count("Conv2D") == depth + 2
    adds = {"none": 0, "dncnn": 1, "resnet": 1 + depth // 2}[skip]
    assert kinds.count("Add") == adds


def test_dncnn_parameter_count_follows_the_architecture():
    depth, filters, kernel = 5, 16, 3
    model = dncnn.get_model(depth, filters, kernel, "dncnn")
    first = kernel * kernel * filters + filters
    block = kernel * kernel * filters * filters + 4 * filters  # conv without bias, BN's 4 vectors
    last = kernel * kernel * filters + 1
    assert model.count_params() == first + depth * block + last


def test_dncnn_skip_predicts_input_plus_residual():
    model = dncnn.get_model(2, 4, 3, "dncnn")
    for layer in model.layers:
        if layer.name == "last":
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    x = images()
    np.testing.assert_allclose(model(x, training=False).numpy(), x, atol=1e-6)


@pytest.mark.parametrize(
    "filters, reps",
    [
        ([8], [1]),
        ([8, 16, 8], [1, 2, 1]),
        ([8, 8, 4, 8, 8], [2, 2, 2, 2, 2]),
        ([4, 8, 16, 8, 16, 8, 4], [1, 1, 1, 1, 1, 1, 1]),
    ],
)
@pytest.mark.parametrize("sampling, uskip, dncnn_skip", [(True, True, True), (True, False, False), (False, True, True)])
def test_unet_builds_for_depths_and_switches(filters, reps, sampling, uskip, dncnn_skip):
    model = unet.get_model(filters, reps, 3, sampling, uskip, dncnn_skip, image_size=32)
    assert model(images(), training=False).shape == (2, 32, 32, 1)
    kinds = layer_types(model)
    half = len(filters) // 2
    assert kinds.count("MaxPooling2D") == (half if sampling else 0)
    assert kinds.count("Conv2DTranspose") == (half if sampling else 0)
    assert kinds.count("Concatenate") == (half if uskip else 0)
    assert kinds.count("Add") == (1 if dncnn_skip else 0)
    assert kinds.count("Conv2D") == sum(reps) + 1


def test_the_studys_unet_shapes_build_at_256():
    shallow = unet.get_model([266] * 5, [3] * 5, 9, image_size=256)
    deep = unet.get_model([100, 200, 400, 200, 400, 200, 100], [2] * 7, 5, image_size=256)
    assert shallow.output_shape == deep.output_shape == (None, None, None, 1)


@pytest.mark.parametrize("filters, reps", [([16] * 3, [2, 1, 2]), ([8] * 5, [1] * 5)])
def test_unet_without_sampling_and_uskip_is_exactly_a_dncnn(filters, reps):
    """The study's special case: sampling false, uskip false, dncnn_skip true."""
    u = unet.get_model(filters, reps, 3, sampling=False, uskip=False, dncnn_skip=True)
    d = dncnn.get_model(depth=sum(reps) - 1, filters=filters[0], kernel=3, skip="dncnn")
    assert layer_types(u) == layer_types(d)
    assert u.count_params() == d.count_params()
    d.set_weights(u.get_weights())
    x = images()
    for training in (False, True):
        np.testing.assert_array_equal(u(x, training=training).numpy(), d(x, training=training).numpy())


@pytest.mark.parametrize(
    "filters, reps, size, message",
    [
        ([8, 8, 8], [2, 2], 64, "one entry per level"),
        ([8, 8], [2, 2], 64, "must be odd"),
        ([8] * 9, [1] * 9, 16, "pools 4 times.*divisible by 16"),
        ([8] * 7, [1] * 7, 36, "divisible by 8"),
        ([8, 0, 8], [1, 1, 1], 64, "at least one filter"),
        ("[8, 8", [1], 64, "list of whole numbers"),
    ],
)
def test_impossible_unets_are_value_errors(filters, reps, size, message):
    with pytest.raises(ValueError, match=message):
        unet.check_model(filters, reps, 3, True, size)


def test_without_sampling_any_depth_fits_any_size():
    unet.check_model([8] * 9, [1] * 9, 3, sampling=False, image_size=16)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"depth": -1}, "depth"), ({"filters": 0}, "filters"), ({"kernel": 2.5}, "kernel"),
     ({"skip": "dense"}, "dncnn, resnet, none"), ({"bn_momentum": 1.0}, "bn_momentum")],
)
def test_impossible_dncnns_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dncnn.check_model(**kwargs)


def test_importing_the_tasks_loads_no_tensorflow():
    code = (
        "import sys, gridrunner.tasks.dncnn, gridrunner.tasks.unet, gridrunner.tasks.mri; "
        "heavy = [m for m in ('tensorflow', 'keras', 'sigpy', 'nibabel', 'skimage') if m in sys.modules]; "
        "print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
