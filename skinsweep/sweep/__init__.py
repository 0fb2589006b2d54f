"""Sweep stage: recipes and their search space, the Ray Tune + Optuna runner, ``s3://`` storage and the
live progress view. Only :mod:`skinsweep.sweep.runner` imports Ray."""
