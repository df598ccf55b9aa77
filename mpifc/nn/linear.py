"""Fully connected layer. N batch, D in features, F out features; any leading shape (N, ..., D)."""
from __future__ import annotations

import numpy as np

from mpifc.nn import functional as F
from mpifc.nn import init as I
from mpifc.nn._common import place, resolve_dtype, resolve_xp
from mpifc.nn.module import Module, Parameter


class Linear(Module):
    """y = x @ W.T + b with W : (F, D), b : (F,).

    Parameters
    ----------
    in_features, out_features : D, F
    bias : whether to learn b (initialised to zeros)
    init : initialiser name or callable for W (default He uniform, ReLU gain)
    rng, seed : numpy Generator or seed for the initialiser
    dtype : float32 (default) or float64
    xp : "numpy", "cupy" or a backend module
    """

    def __init__(self, in_features, out_features, bias=True, *, init="kaiming_uniform",
                 rng=None, seed=None, dtype=np.float32, xp=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        rng = I.make_rng(rng, seed)
        W = I.initialize(init, (self.out_features, self.in_features), rng, self.dtype)
        self.weight = Parameter(place(W, self.xp, self.dtype), "weight")
        self._params = [self.weight]
        self.bias = None
        if bias:
            self.bias = Parameter(place(I.zeros(self.out_features, self.dtype), self.xp, self.dtype), "bias")
            self._params.append(self.bias)
        self._x = None

    def forward(self, x):
        """x : (N, ..., D) -> y : (N, ..., F)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects {self.in_features} input features, got shape {x.shape}")
        self._x = x
        return F.linear_forward(x, self.weight.data, None if self.bias is None else self.bias.data)

    def backward(self, dy):
        """dy : (N, ..., F) -> dx : (N, ..., D) (None when ``input_grad`` is False)."""
        x, self._x = self._x, None
        # db, then dW a row block at a time (Parameter.accumulate_rows: each finished
        # block may start its data-parallel allreduce), then dx, which hides the last one
        if self.bias is not None:
            self.bias.accumulate_rows(lambda r0, r1, out: F.linear_backward_bias(dy, r0, r1, out))
        self.weight.accumulate_rows(lambda r0, r1, out: F.linear_backward_weight(dy, x, r0, r1, out))
        return F.linear_backward_input(dy, self.weight.data) if self.input_grad else None

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias is not None})"
