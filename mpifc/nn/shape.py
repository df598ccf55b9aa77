"""Shape-only layers (no arithmetic)."""
from __future__ import annotations

import math

from mpifc.nn.module import Module


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1*d2*...), from ``start_dim`` on."""

    def __init__(self, start_dim=1):
        super().__init__()
        self.start_dim = int(start_dim)

    def forward(self, x):
        self._shape = x.shape
        return x.reshape(x.shape[: self.start_dim] + (math.prod(x.shape[self.start_dim:]),))  # 0 rows work

    def backward(self, dy):
        return dy.reshape(self._shape)
