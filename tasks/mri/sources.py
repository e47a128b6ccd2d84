"""Fully sampled 2-D slices: where they come from, and which source each one belongs to.

The study sliced 3-D knee volumes along all three axes, dropped the slices that show
nothing, and cut them to a common square size. This module does the same for

* ``"mni"`` (the default): the MNI152 T1 template that ships inside nilearn
  (``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``,
  197 x 233 x 189 at 1 mm), so nothing is downloaded at run time;
* a folder of your own scans: 3-D volumes (``.nii``, ``.nii.gz``) and 2-D images
  (``.npy``, ``.png``), found recursively and read in sorted order.

Every slice is scaled to [0, 1] by the 99.9th percentile of its volume (its own for a 2-D
image), padded with zeros to a square and resized to ``size`` x ``size``.

Each slice carries a *group*: the unit that the train/test split keeps together, so no
test slice (nor a slice next to it) is ever seen in training. With several volumes a
group is a whole volume; with one volume (the MNI template) it is a slab of ``slab``
neighbouring slices along one axis, because neighbouring slices are nearly identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNI = "mni"
VOLUME_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".npy", ".png")


@dataclass
class Slices:
    """Clean slices and where they came from.

    ``images`` is (n, size, size) float32 in [0, 1]. ``volume``, ``axis`` and ``index`` say
    which volume, axis (-1 for a 2-D image) and position each slice was cut from;
    ``source`` is one integer id per slice, unique across the set; ``group`` is the unit of
    the train/test split.
    """

    images: np.ndarray
    volume: np.ndarray
    axis: np.ndarray
    index: np.ndarray
    source: np.ndarray
    group: np.ndarray


def mni_template_path() -> Path:
    """The MNI152 T1 template file bundled with nilearn."""
    import nilearn.datasets

    path = Path(nilearn.datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.exists():
        raise FileNotFoundError(f"nilearn's bundled MNI152 template is missing: {path}")
    return path


def find_scans(data: str) -> tuple[list[Path], list[Path]]:
    """The 3-D volumes and the 2-D images that ``data`` (``"mni"`` or a folder) stands for."""
    if data == MNI:
        return [mni_template_path()], []
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise ValueError(f"data must be {MNI!r} or a folder of .nii/.nii.gz/.npy/.png files, got {data!r}")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    volumes = [p for p in files if p.name.endswith(VOLUME_SUFFIXES)]
    images = [p for p in files if p.name.endswith(IMAGE_SUFFIXES)]
    if not volumes and not images:
        raise ValueError(f"no .nii, .nii.gz, .npy or .png files under {folder}")
    return volumes, images


def load_slices(
    data: str = MNI,
    size: int = 64,
    min_foreground: float = 0.05,
    slab: int = 8,
    axes: tuple[int, ...] = (0, 1, 2),
) -> Slices:
    """Slice, filter, normalise and resize every scan that ``data`` stands for.

    A slice is kept when at least ``min_foreground`` of its pixels are brighter than 10% of
    the volume's scale. A ``.npy`` file holding a 3-D array counts as a volume.
    """
    volume_paths, image_paths = find_scans(data)
    pieces = []  # (image, volume id, axis, index)
    volume_id = 0
    for path in volume_paths:
        volume = _read_volume(path)
        pieces.extend(_slice_volume(volume, volume_id, axes, min_foreground))
        volume_id += 1
    for path in image_paths:
        image = _read_image(path)
        if image.ndim == 3:
            pieces.extend(_slice_volume(image, volume_id, axes, min_foreground))
        else:
            image = _normalise(image)
            if _foreground(image) >= min_foreground:
                pieces.append((image, volume_id, -1, 0))
        volume_id += 1
    if not pieces:
        raise ValueError(f"no slice of {data!r} has at least {min_foreground:.0%} foreground")

    images = np.stack([_square(image, size) for image, *_ in pieces]).astype(np.float32)
    volume = np.array([p[1] for p in pieces], dtype=np.int64)
    axis = np.array([p[2] for p in pieces], dtype=np.int64)
    index = np.array([p[3] for p in pieces], dtype=np.int64)
    source = np.arange(len(pieces), dtype=np.int64)
    return Slices(images, volume, axis, index, source, _groups(volume, axis, index, slab))


def _groups(volume: np.ndarray, axis: np.ndarray, index: np.ndarray, slab: int) -> np.ndarray:
    """Whole volumes when there are several, else slabs of ``slab`` neighbouring slices per axis."""
    if len(np.unique(volume)) >= 5:
        return volume.copy()
    if slab < 1:
        raise ValueError(f"slab must be at least 1, got {slab}")
    # 2-D images (axis -1) may be neighbouring slices of one scan in file order, so they are
    # slabbed by their file position (their volume id) instead of split one by one.
    is_image = axis < 0
    keys = np.stack(
        [np.where(is_image, -1, volume), axis, np.where(is_image, volume, index) // slab], axis=1
    )
    _, group = np.unique(keys, axis=0, return_inverse=True)
    return group.reshape(-1).astype(np.int64)


def _read_volume(path: Path) -> np.ndarray:
    import nibabel

    volume = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float32)
    volume = np.squeeze(volume)
    if volume.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {volume.shape}")
    return volume


def _read_image(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        image = np.load(path).astype(np.float32)
    else:
        from PIL import Image

        image = np.asarray(Image.open(path).convert("F"), dtype=np.float32)
    image = np.squeeze(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2-D image or a 3-D volume, got shape {image.shape}")
    return image


def _slice_volume(volume: np.ndarray, volume_id: int, axes, min_foreground: float):
    volume = _normalise(volume)
    for axis in axes:
        along = np.moveaxis(volume, axis, 0)  # a view; np.take would copy the volume per slice
        for index, image in enumerate(along):
            if _foreground(image) >= min_foreground:
                yield image, volume_id, axis, index


def _normalise(array: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the 99.9th percentile of the non-zero values (robust to a few hot pixels)."""
    array = np.nan_to_num(array.astype(np.float32))
    array = array - min(float(array.min()), 0.0)
    positive = array[array > 0]
    if positive.size == 0:
        return array
    return np.clip(array / np.percentile(positive, 99.9), 0.0, 1.0)


def _foreground(image: np.ndarray) -> float:
    return float(np.mean(image > 0.1))


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad to a centred square, then resize (with anti-aliasing) to ``size`` x ``size``."""
    from skimage.transform import resize

    side = max(image.shape)
    padding = [((side - n) // 2, side - n - (side - n) // 2) for n in image.shape]
    square = np.pad(image, padding)
    if side == size:
        return square
    return resize(square, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
