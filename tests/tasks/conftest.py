"""Fixtures for the MRI task tests: one data cache per session, and small, fast row parameters.

Every test uses real TensorFlow and the real MNI slices (nilearn's bundled template), at
32 x 32 so that a 20-step training run takes a couple of seconds on one CPU core.
"""
from __future__ import annotations

import os

import pytest

# Quieter TensorFlow logs in test output; oneDNN stays on (turning it off doubles CPU time).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SMALL_DATA = {"size": 32, "copies": 1, "augment": 1, "noise": "rad15"}  # rad41 is nearly fully sampled at 32 px


@pytest.fixture(scope="session")
def mri_cache(tmp_path_factory):
    """A data cache folder shared by the whole session (the pairs are built once)."""
    return tmp_path_factory.mktemp("mri cache")


@pytest.fixture
def small_row(mri_cache):
    """Parameters for a tiny, fast row: 32 x 32 slices, one thread, the session's cache."""
    return {**SMALL_DATA, "cache_dir": str(mri_cache), "threads": 1, "examples": 2}
