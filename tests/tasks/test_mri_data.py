"""The data pipeline: real slices, real sigpy undersampling, the split (no leakage), folders, and the cache."""
from __future__ import annotations

import multiprocessing
import time
from dataclasses import replace

import numpy as np
import pytest

from gridrunner.tasks.mri import dataset, sources, undersampling

SMALL = dataset.DataConfig(size=32, noise="rad15", copies=2, augment=2)  # rad41 is nearly fully sampled at 32 px


@pytest.fixture(scope="module")
def mni32():
    return sources.load_slices(size=32)


@pytest.fixture(scope="module")
def pairs32(tmp_path_factory):
    cache = tmp_path_factory.mktemp("pairs cache")
    train, built_train = dataset.load_pairs(SMALL, "train", cache)
    test, built_test = dataset.load_pairs(SMALL, "test", cache)
    assert built_train and built_test
    return train, test, cache


def test_mni_template_gives_clean_slices_along_three_axes(mni32):
    assert 300 < len(mni32.images) < 620  # 197 + 233 + 189 slices, minus the near-empty ones
    assert mni32.images.shape[1:] == (32, 32) and mni32.images.dtype == np.float32
    assert set(np.unique(mni32.axis)) == {0, 1, 2}
    assert mni32.images.min() >= 0 and mni32.images.max() <= 1
    assert np.all((mni32.images > 0.1).mean(axis=(1, 2)) > 0.02)  # no near-empty slice survived
    assert len(np.unique(mni32.source)) == len(mni32.images)


def test_one_volume_is_split_in_slabs_of_neighbouring_slices(mni32):
    for group in np.unique(mni32.group):
        members = mni32.group == group
        assert len(np.unique(mni32.axis[members])) == 1
        assert np.ptp(mni32.index[members]) < 8


def test_train_and_test_share_no_source_slice_and_no_slab(pairs32):
    train, test, _ = pairs32
    assert not set(train.source) & set(test.source)
    assert not set(train.group) & set(test.group)
    share = len(np.unique(test.source)) / (len(np.unique(test.source)) + len(np.unique(train.source)))
    assert 0.1 < share <= 0.2


def test_train_is_augmented_and_test_is_not(pairs32):
    train, test, _ = pairs32
    assert np.all(np.bincount(train.source)[np.unique(train.source)] == SMALL.augment * SMALL.copies)
    assert np.all(np.bincount(test.source)[np.unique(test.source)] == SMALL.copies)
    first = np.flatnonzero(train.source == train.source[0])
    targets = train.y[first, ..., 0]
    assert not np.allclose(targets[0], targets[-1])  # a second orientation of the same slice
    assert any(np.allclose(dataset.dihedral(targets[0], k), targets[-1]) for k in range(1, 8))


def test_pairs_are_undersampled_versions_of_their_targets(pairs32):
    train, test, _ = pairs32
    for pairs in (train, test):
        assert pairs.x.shape == pairs.y.shape and pairs.x.shape[1:] == (32, 32, 1)
        assert 0.02 < np.abs(pairs.x - pairs.y).mean() < 0.08
    first = np.flatnonzero(test.source == test.source[0])
    assert np.array_equal(test.y[first[0]], test.y[first[1]])
    assert not np.allclose(test.x[first[0]], test.x[first[1]])  # copies have rotated spokes


def test_a_second_load_reads_the_cache(pairs32):
    train, _, cache = pairs32
    again, built = dataset.load_pairs(SMALL, "train", cache)
    assert not built
    np.testing.assert_array_equal(again.x, train.x)
    assert dataset.cache_name(SMALL, "rad15", "train") != dataset.cache_name(replace(SMALL, copies=3), "rad15", "train")
    assert dataset.cache_name(SMALL, "rad15", "test") == dataset.cache_name(replace(SMALL, augment=5), "rad15", "test")
    assert dataset.cache_name(SMALL, "rad15", "test") != dataset.cache_name(SMALL, "pois", "test")


def test_cache_folder_prefers_the_parameter_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path / "env"))
    assert dataset.cache_folder("$SCRATCH/mri", tmp_path / "grid") == tmp_path / "scratch" / "mri"
    assert dataset.cache_folder(None, tmp_path / "grid") == tmp_path / "env"
    monkeypatch.delenv(dataset.CACHE_ENV)
    assert dataset.cache_folder(None, tmp_path / "grid") == tmp_path / "grid" / "cache"


@pytest.mark.parametrize(
    "name, kind, spokes, accel",
    [("rad41", "radial", 41, 0.0), ("RAD15", "radial", 15, 0.0), ("pois", "poisson", 0, 2.0), ("pois4", "poisson", 0, 4.0),
     ("pois2.5", "poisson", 0, 2.5)],
)
def test_noise_names(name, kind, spokes, accel):
    noise = undersampling.parse_noise(name)
    assert (noise.kind, noise.spokes, noise.accel) == (kind, spokes, accel)


@pytest.mark.parametrize("name", ["radial", "rad", "rad0", "pois1", "spiral8"])
def test_bad_noise_names_are_value_errors(name):
    with pytest.raises(ValueError):
        undersampling.parse_noise(name)


def test_radial_density_covers_the_sampled_disc():
    coord = undersampling.radial_trajectory(41, 64)
    assert undersampling.radial_density(coord).sum() == pytest.approx(np.pi * 32**2, rel=0.03)


def test_dense_radial_sampling_gives_the_image_back(mni32):
    """With far more spokes than Nyquist needs, the density-weighted adjoint reconstructs the slice.

    Only the corners of k-space outside the sampled disc are lost (a little resolution).
    """
    images = mni32.images[::40]
    dense = undersampling.undersample(images, undersampling.parse_noise("rad200"))[:, 0]
    assert dense.mean() / images.mean() == pytest.approx(1.0, abs=0.02)
    assert np.abs(dense - images).mean() < 0.01


def test_fewer_spokes_and_higher_acceleration_are_worse(mni32):
    images = mni32.images[::20]

    def error(name):
        return np.abs(undersampling.undersample(images, undersampling.parse_noise(name))[:, 0] - images).mean()

    assert error("rad200") < error("rad41") < error("rad15")
    assert error("pois2") < error("pois6")



def test_poisson_mask_has_the_acceleration_and_a_full_centre():
    mask = undersampling.poisson_mask(64, 3.0, calib=8)
    assert 64 * 64 / mask.sum() == pytest.approx(3.0, abs=0.1)
    assert np.all(mask[28:36, 28:36] == 1)


def test_cg_reconstruction_is_closer_than_the_adjoint(mni32):
    images = mni32.images[::60]
    noise = undersampling.parse_noise("rad41")
    adjoint = undersampling.undersample(images, noise)[:, 0]
    cg = undersampling.undersample(images, noise, recon="cg", cg_iters=10)[:, 0]
    assert np.abs(cg - images).mean() < np.abs(adjoint - images).mean()


def test_a_folder_of_volumes_and_images(tmp_path):
    import nibabel
    from PIL import Image

    rng = np.random.default_rng(0)
    blob = np.zeros((24, 24, 24), dtype=np.float32)
    blob[4:20, 6:18, 5:19] = 1 + rng.random((16, 12, 14))
    nibabel.save(nibabel.Nifti1Image(blob, np.eye(4)), tmp_path / "knee.nii.gz")
    np.save(tmp_path / "volume.npy", blob[::-1].copy())
    (tmp_path / "slices").mkdir()
    for i in range(3):
        Image.fromarray((blob[:, :, 8 + i] / 2 * 255).astype(np.uint8)).save(tmp_path / "slices" / f"s{i}.png")
    np.save(tmp_path / "slices" / "s9.npy", blob[:, 10, :])

    slices = sources.load_slices(str(tmp_path), size=32, slab=4)
    axes_of_volumes = [set(slices.axis[slices.volume == v]) for v in np.unique(slices.volume)]
    assert axes_of_volumes.count({0, 1, 2}) == 2  # the NIfTI and the 3-D .npy
    assert axes_of_volumes.count({-1}) == 4  # three PNGs and one 2-D .npy
    assert slices.images.shape[1:] == (32, 32) and slices.images.max() <= 1

    config = dataset.DataConfig(data=str(tmp_path), size=32, copies=1, augment=1, slab=4, test_fraction=0.3)
    train = dataset.build_pairs(config, "train", undersampling.parse_noise("rad41"))
    test = dataset.build_pairs(config, "test", undersampling.parse_noise("rad41"))
    assert len(train) and len(test) and not set(train.group) & set(test.group)


def test_a_folder_without_scans_is_a_value_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no .nii"):
        sources.load_slices(str(tmp_path))
    with pytest.raises(ValueError, match="'mni' or a folder"):
        sources.load_slices(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "change, message",
    [({"size": 8}, "size"), ({"augment": 9}, "augment"), ({"test_fraction": 1.0}, "test_fraction"),
     ({"noise": "rad"}, "unknown noise"), ({"recon": "sense"}, "recon")],
)
def test_bad_data_settings_are_value_errors(change, message):
    with pytest.raises(ValueError, match=message):
        dataset.DataConfig.from_params(change)


def _load_at(start_at: float, cache: str):
    """In a fresh process: wait for the common start time, then ask for the same pairs."""
    while time.time() < start_at:
        time.sleep(0.005)
    _, built = dataset.load_pairs(dataset.DataConfig(size=32, copies=1, augment=1, data_seed=7), "test", cache)
    return built


@pytest.mark.slow
def test_concurrent_processes_build_the_cache_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        start_at = time.time() + 8  # every process has imported numpy and the task modules by then
        built = pool.starmap(_load_at, [(start_at, str(tmp_path))] * 4)
    assert sorted(built) == [False, False, False, True]
    assert len(list(tmp_path.glob("*.npz"))) == 1
    assert not list(tmp_path.glob("*.tmp"))
