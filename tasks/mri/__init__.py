"""MRI data, losses and training shared by the study's tasks (:mod:`gridrunner.tasks.dncnn`, :mod:`gridrunner.tasks.unet`).

* :mod:`gridrunner.tasks.mri.sources`: fully sampled 2-D slices (the MNI152 template bundled with nilearn,
  or a folder of your scans) and the group each belongs to for the train/test split.
* :mod:`gridrunner.tasks.mri.undersampling`: radial (``rad41``, ``rad15``) and Poisson-disc (``pois``)
  undersampling with sigpy.
* :mod:`gridrunner.tasks.mri.dataset`: split, augmentation and the on-disk cache of pairs, built once.
* :mod:`gridrunner.tasks.mri.losses`: l1, l2, ssim, ms_ssim, ms_ssim_gl1.
* :mod:`gridrunner.tasks.mri.training`: the training loop, checkpoint/resume, and the test metrics.

Importing this package loads numpy only; TensorFlow, sigpy and nibabel load when used.
"""
from gridrunner.tasks.mri.dataset import DataConfig, load_pairs
from gridrunner.tasks.mri.losses import LOSSES, get_loss
from gridrunner.tasks.mri.training import TrainingConfig, train_and_evaluate

__all__ = ["DataConfig", "LOSSES", "TrainingConfig", "get_loss", "load_pairs", "train_and_evaluate"]
