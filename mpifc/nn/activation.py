"""Elementwise activations and dropout; any input shape."""
from __future__ import annotations

import numpy as np

from mpifc.backend import get_array_module
from mpifc.nn import functional as F
from mpifc.nn.init import make_rng
from mpifc.nn.module import Module


class ReLU(Module):
    """y = max(x, 0)."""

    def forward(self, x):
        y, self._mask = F.relu_forward(x)
        return y

    def backward(self, dy):
        return F.relu_backward(dy, self._mask)


class LeakyReLU(Module):
    """y = x if x > 0 else slope * x."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        y, self._mask = F.leaky_relu_forward(x, self.negative_slope)
        return y

    def backward(self, dy):
        return F.leaky_relu_backward(dy, self._mask, self.negative_slope)


class GELU(Module):
    """GELU, tanh approximation (as GPT-2 / PyTorch ``approximate="tanh"``)."""

    def forward(self, x):
        y, self._cache = F.gelu_forward(x)
        return y

    def backward(self, dy):
        return F.gelu_backward(dy, self._cache)


class Tanh(Module):
    def forward(self, x):
        y, self._y = F.tanh_forward(x)
        return y

    def backward(self, dy):
        return F.tanh_backward(dy, self._y)


class Sigmoid(Module):
    def forward(self, x):
        y, self._y = F.sigmoid_forward(x)
        return y

    def backward(self, dy):
        return F.sigmoid_backward(dy, self._y)


class Dropout(Module):
    """Inverted dropout in training mode, identity in eval mode.

    Parameters
    ----------
    p : drop probability in [0, 1)
    rng, seed : numpy Generator or seed. On CuPy data a cupy Generator is seeded
        once from ``rng`` so the masks are drawn on the device.
    """

    def __init__(self, p=0.5, *, rng=None, seed=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self._rng = make_rng(rng, seed)
        self._dev_rng = None
        self._mask = None

    def _rng_for(self, x):
        xp = get_array_module(x)
        if xp is np:
            return self._rng
        if self._dev_rng is None:
            self._dev_rng = xp.random.default_rng(int(self._rng.integers(2**63 - 1)))
        return self._dev_rng

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        y, self._mask = F.dropout_forward(x, self.p, self._rng_for(x))
        return y

    def backward(self, dy):
        return dy if self._mask is None else F.dropout_backward(dy, self._mask)
