"""A validation set carved from the training split (``data.validation_split``).

For a training split of N rows and a fraction f (0 <= f < 1), the validation set is
``V = ceil(f * N)`` rows: the first V of one fixed permutation of ``range(N)``
(``default_rng(VALIDATION_STREAM).permutation(N)``), sorted. The training rows are
the other N - V, sorted. The rows depend only on N and f -- not on ``seed``, the dp x
tp layout, the rank count or the loader mode -- so runs with different seeds or
layouts validate on the same samples, and a larger f holds out a superset of a
smaller one's rows. A permutation (not the last rows) keeps a file sorted by class
from giving a one-class validation set.
"""
from __future__ import annotations

import math

import numpy as np

#: the fixed generator key of the validation permutation (independent of the run's seed)
VALIDATION_STREAM = 0x5EED_7A11


def split_rows(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray | None]:
    """(training rows, validation rows) of a split of ``n`` rows; (all, None) for f = 0.

    Raises ConfigError when the validation set would leave no training row."""
    from mpifc.config import ConfigError

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return np.arange(n, dtype=np.int64), None
    v = math.ceil(fraction * n)
    if v >= n:
        raise ConfigError(f"data.validation_split = {fraction} of {n} training rows leaves no "
                         "training row")
    perm = np.random.default_rng(VALIDATION_STREAM).permutation(n)
    return np.sort(perm[v:]).astype(np.int64), np.sort(perm[:v]).astype(np.int64)
