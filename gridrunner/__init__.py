"""gridrunner: run hyperparameter grids from plain CSV shards, on Slurm or locally, and analyse them.

The library is what the CLI calls; every name here also works in a notebook::

    import gridrunner
    df = gridrunner.load("runs/dncnn")      # one typed DataFrame of every shard
"""
from gridrunner.context import Context
from gridrunner.errors import ExprError, GridError, Interrupted, ShardError, SpecError

__version__ = "0.1.0"

__all__ = ["Context", "ExprError", "GridError", "Interrupted", "ShardError", "SpecError", "load"]


def load(grid_dir=None):
    """Every shard of a grid as one typed pandas DataFrame (see :func:`gridrunner.frame.load`)."""
    from gridrunner.frame import load as _load

    return _load(grid_dir)
