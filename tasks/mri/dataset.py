"""Training and test pairs (undersampled input, fully sampled target), built once and cached on disk.

:func:`load_pairs` returns the pairs for one data configuration, one noise and one split.
The first worker to ask builds them; every other row and worker reads the same ``.npz``.

**Split.** Slices are split by *group* (:mod:`gridrunner.tasks.mri.sources`: a whole volume, or a slab
of neighbouring slices of one volume), drawn with ``data_seed``; every augmented and
undersampled copy of a slice stays in its slice's split, so no test slice was ever seen
in training, as in the study.

**Augmentation (train split only).** Each training slice appears in ``augment`` of its 8
rotations by multiples of 90 degrees and flips (the identity always, the others drawn with
``data_seed``), and each of those in ``copies`` undersampled versions (rotated spokes or
redrawn Poisson masks). The test split has the identity orientation and ``copies`` copies.

**Cache.** One file per (data configuration, noise, split), named by a hash of everything
that changes its content (and by the names, sizes and times of your files when ``data`` is
a folder): ``<cache>/mri-<noise>-<split>-<size>px-<hash>.npz``. The cache folder is the
``cache_dir`` parameter (``$VARS`` and ``~`` expanded: point it at a cluster's scratch
space), else ``$GRIDRUNNER_DATA_CACHE``, else ``<grid>/cache``.

**Why the build is safe under concurrency.** A builder holds ``<file>.lock`` (filelock:
``flock`` on POSIX), checks again that the file is still missing, writes to a temporary
name in the same folder and renames it into place. Rename is atomic on POSIX filesystems,
so a reader sees either no file or a whole one; the lock only saves the duplicate work.
An ``flock`` dies with its process, so a killed builder leaves no stale lock. On an NFS
mount where ``flock`` does not exclude across clients, two nodes may both build the same
file: the content is deterministic and each rename is atomic, so that costs time, never
correctness.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from gridrunner.tasks.mri import sources, undersampling

CACHE_VERSION = 1  # bump when the way pairs are built changes, so old caches are not reused
CACHE_ENV = "GRIDRUNNER_DATA_CACHE"
LOCK_TIMEOUT_S = 4 * 3600
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataConfig:
    """Everything that decides which pairs a row trains and is tested on (one row's data parameters)."""

    data: str = sources.MNI  # "mni" or a folder of .nii/.nii.gz/.npy/.png
    size: int = 64  # slices are padded to a square and resized to size x size
    noise: str = "rad41"  # the training (and main test) noise: rad<spokes> or pois[<accel>]
    copies: int = 2  # undersampled copies per slice (rotated spokes / redrawn masks)
    augment: int = 2  # orientations (of 8 rotations/flips) per training slice
    test_fraction: float = 0.2  # share of slices, by group, held out for testing
    slab: int = 8  # neighbouring slices per split group when there is a single volume
    min_foreground: float = 0.05  # drop slices with less than this share of tissue
    data_seed: int = 0  # split, augmentation draws
    recon: str = "adjoint"  # radial reconstruction: "adjoint" or "cg"
    cg_iters: int = 10
    calib: int = 0  # Poisson calibration square side in pixels; 0 = size // 8
    spoke_rotation: float = -1.0  # degrees between radial copies; -1 = interleave (180 / (spokes * copies))

    @classmethod
    def from_params(cls, params: dict) -> "DataConfig":
        """The data parameters of a row; the others are ignored here."""
        names = {f.name for f in fields(cls)}
        config = cls(**{key: value for key, value in params.items() if key in names})
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError for a setting that cannot build data (before anything is built)."""
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"size must be an integer of at least 16 pixels, got {self.size!r}")
        if not 1 <= self.augment <= 8:
            raise ValueError(f"augment must be between 1 and 8 orientations, got {self.augment}")
        if self.copies < 1:
            raise ValueError(f"copies must be at least 1, got {self.copies}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        if self.recon not in undersampling.RECONSTRUCTIONS:
            raise ValueError(f"recon must be one of {undersampling.RECONSTRUCTIONS}, got {self.recon!r}")
        undersampling.parse_noise(self.noise)


@dataclass
class Pairs:
    """``x`` (undersampled) and ``y`` (fully sampled), (n, size, size, 1) float32; the slice ``source`` and split ``group`` of each pair."""

    x: np.ndarray
    y: np.ndarray
    source: np.ndarray
    group: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def cache_folder(cache_dir: str | None = None, grid_dir: str | Path | None = None) -> Path:
    """Where cached pairs live: ``cache_dir``, else ``$GRIDRUNNER_DATA_CACHE``, else ``<grid_dir>/cache``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV)
    if chosen:
        return Path(os.path.expandvars(os.path.expanduser(str(chosen))))
    if grid_dir is None:
        raise ValueError(f"no cache folder: pass cache_dir, set ${CACHE_ENV}, or give a grid directory")
    return Path(grid_dir) / "cache"


def load_pairs(config: DataConfig, split: str, cache: str | Path, noise: str | None = None) -> tuple[Pairs, bool]:
    """The ``split`` pairs for ``config`` and ``noise`` (default ``config.noise``), and whether this call built them."""
    from filelock import FileLock, Timeout

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    noise_spec = undersampling.parse_noise(noise or config.noise)
    path = Path(cache) / cache_name(config, noise_spec.name, split)
    if path.exists():
        return _read(path), False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            if path.exists():  # another worker built it while we waited for the lock
                return _read(path), False
            pairs = build_pairs(config, split, noise_spec)
            _write(path, pairs)
            return pairs, True
    except Timeout:
        raise TimeoutError(f"{path}.lock still held after {LOCK_TIMEOUT_S} s: is another worker stuck building it?") from None


def cache_name(config: DataConfig, noise: str, split: str) -> str:
    """File name of one cache entry: readable prefix, hash of everything that changes the content."""
    key = asdict(config)
    key.update(noise=noise, split=split, version=CACHE_VERSION)
    if split == "test":
        del key["augment"]  # the test split is not augmented
    if key["data"] != sources.MNI:
        key["files"] = _fingerprint(key["data"])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"mri-{noise}-{split}-{config.size}px-{digest}.npz"


def build_pairs(config: DataConfig, split: str, noise: undersampling.Noise) -> Pairs:
    """Slice, split, augment and undersample (no cache). Deterministic for a given config."""
    slices = sources.load_slices(config.data, config.size, config.min_foreground, config.slab)
    test_groups = split_groups(slices.group, config.test_fraction, config.data_seed)
    chosen = np.isin(slices.group, test_groups) == (split == "test")
    images, source, group = slices.images[chosen], slices.source[chosen], slices.group[chosen]
    if len(images) == 0:
        raise ValueError(f"the {split} split is empty: {len(slices.images)} slices in {len(np.unique(slices.group))} groups")

    if split == "train" and config.augment > 1:
        images, source, group = _augment(images, source, group, config.augment, config.data_seed)
    noisy = undersampling.undersample(
        images,
        noise,
        copies=config.copies,
        recon=config.recon,
        cg_iters=config.cg_iters,
        calib=config.calib or None,
        spoke_rotation=None if config.spoke_rotation < 0 else config.spoke_rotation,
    )
    copies = noisy.shape[1]
    return Pairs(
        x=noisy.reshape(-1, config.size, config.size, 1),
        y=np.repeat(images, copies, axis=0)[..., None],
        source=np.repeat(source, copies),
        group=np.repeat(group, copies),
    )


def split_groups(group: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """The groups held out for testing: groups in a seeded random order until ``test_fraction`` of the slices."""
    unique, counts = np.unique(group, return_counts=True)
    if len(unique) < 2:
        raise ValueError("need at least two split groups (volumes or slabs) to hold some out for testing")
    order = np.random.default_rng(seed).permutation(len(unique))
    taken = np.cumsum(counts[order]) <= test_fraction * len(group)
    taken[0] = True  # at least one group
    taken[-1] = False  # and never all of them
    return unique[order[taken]]


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 rotations (by 90 degrees) and flips of a square image; k = 0 is the identity."""
    rotated = np.rot90(image, k % 4, axes=(-2, -1))
    return np.flip(rotated, axis=-1) if k >= 4 else rotated


def _augment(images, source, group, augment: int, seed: int):
    rng = np.random.default_rng([seed, 1])
    out_images, out_source, out_group = [], [], []
    for image, src, grp in zip(images, source, group):
        for k in [0, *(rng.permutation(7)[: augment - 1] + 1)]:
            out_images.append(dihedral(image, int(k)))
            out_source.append(src)
            out_group.append(grp)
    return np.stack(out_images), np.array(out_source), np.array(out_group)


def _fingerprint(data: str) -> list:
    volumes, images = sources.find_scans(data)
    return [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in (*volumes, *images)]


def _read(path: Path) -> Pairs:
    with np.load(path) as archive:
        return Pairs(x=archive["x"], y=archive["y"], source=archive["source"], group=archive["group"])


def _write(path: Path, pairs: Pairs) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    try:
        with open(temporary, "wb") as fh:
            np.savez(fh, x=pairs.x, y=pairs.y, source=pairs.source, group=pairs.group)
        os.replace(temporary, path)  # atomic: readers see no file or the whole file
    finally:
        temporary.unlink(missing_ok=True)
