"""Normalisation layers. N batch, C channels, H x W spatial, E normalised shape."""
from __future__ import annotations

import numpy as np

from mpifc.nn import functional as F
from mpifc.nn._common import place, resolve_dtype, resolve_xp
from mpifc.nn.module import Module, Parameter, ShapeError


class _BatchNorm(Module):
    """BatchNorm over all axes but the channel axis 1.

    Training: normalise with the batch mean and biased variance, and update the
    running statistics with ``momentum`` (running = (1-m)*running + m*batch, the
    running variance uses the unbiased batch variance). Eval: use the running
    statistics (a fixed affine map).

    The batch statistics are float64 moments of shifted data (exact for inputs far
    from zero, see ``functional.batchnorm_stats``). A synced BatchNorm overrides
    :meth:`reduce_stats` (merge the moments) and :meth:`reduce_backward_stats` to
    allreduce the per-channel sums. dgamma/dbeta
    accumulate the LOCAL sums (before any reduction), as data-parallel gradient
    averaging expects.

    Buffers: ``running_mean``, ``running_var`` (C,), ``num_batches_tracked`` (1,).
    """

    _ndim = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, *,
                 dtype=np.float32, xp=None):
        super().__init__()
        C = self.num_features = int(num_features)
        self.eps, self.momentum, self.affine = float(eps), float(momentum), bool(affine)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        self.weight = Parameter(place(np.ones(C), self.xp, self.dtype), "weight")
        self.bias = Parameter(place(np.zeros(C), self.xp, self.dtype), "bias")
        self._params = [self.weight, self.bias] if self.affine else []
        self.running_mean = place(np.zeros(C), self.xp, self.dtype)
        self.running_var = place(np.ones(C), self.xp, self.dtype)
        self.num_batches_tracked = place(np.zeros(1), self.xp, np.int64)
        self._buffer_names = ["running_mean", "running_var", "num_batches_tracked"]
        self._cache = None

    # --- hooks for a synced BatchNorm ---
    def reduce_stats(self, mean, m2, count):
        """Merge the moments (mean, M2 : (C,) float64, count) across ranks. Identity here."""
        return mean, m2, count

    def reduce_backward_stats(self, sum_dy, sum_dy_xhat):
        """Combine (sum dy, sum dy*xhat) across ranks. Identity here."""
        return sum_dy, sum_dy_xhat

    def _check(self, x):
        if x.ndim not in self._ndim or x.shape[1] != self.num_features:
            raise ShapeError(f"{type(self).__name__}({self.num_features}) got input shape {x.shape}")

    def forward(self, x):
        return self._forward(x, relu=False)

    def forward_relu(self, x):
        """``relu(self.forward(x))`` in one pass (training mode; :mod:`mpifc.nn.fuse`):
        returns (y, mask) with the ReLU's mask for its backward, which then goes through
        :meth:`backward` with ``mask`` instead of the ReLU."""
        if not self.training:
            raise RuntimeError("forward_relu fuses the training-mode BatchNorm only")
        return self._forward(x, relu=True)

    def _forward(self, x, relu):
        self._check(x)
        gamma, beta = self.weight.data, self.bias.data
        if not self.training:
            y, cache = F.batchnorm_forward_eval(x, gamma, beta, self.running_mean,
                                                self.running_var, self.eps)
            self._cache = ("eval", cache)
            return y
        mean, m2, local, shifted = F.batchnorm_stats(x, return_shifted=True)
        mean, m2, count = self.reduce_stats(mean, m2, local)
        # a merged count (SyncBatchNorm: a 0-d array where x lives) is at least the local
        # one: read it back only when the local count alone is too small
        if local < 2 and count < 2:
            raise ValueError(f"{type(self).__name__} needs more than one value per channel "
                             f"in training mode (got {int(count)})")
        y, cache, mean, var, *mask = F.batchnorm_forward_from_stats(
            x, gamma, beta, mean, m2, count, self.eps, shifted, relu=relu)
        m, dt = self.momentum, self.dtype
        # in place: checkpoint loaders and buffers() hold references to these arrays
        self.running_mean *= 1.0 - m
        self.running_mean += (m * mean).astype(dt)
        self.running_var *= 1.0 - m
        self.running_var += ((m * count / (count - 1)) * var).astype(dt)
        self.num_batches_tracked += 1
        self._cache = ("train", cache, count)
        return (y, mask[0]) if relu else y

    def backward(self, dy, mask=None):
        """dx from dy; ``mask``: that of a ReLU fused by :meth:`forward_relu`, whose
        backward (dy * mask) then runs inside this one's passes."""
        if self._cache[0] == "eval":
            dx, dgamma, dbeta = F.batchnorm_backward_eval(dy, self._cache[1])
        else:
            _, cache, count = self._cache
            dbeta, dgamma = F.batchnorm_backward_stats(dy, cache, mask)
            sum_dy, sum_dy_xhat = self.reduce_backward_stats(dbeta, dgamma)
            dx = F.batchnorm_backward_from_stats(dy, cache, sum_dy, sum_dy_xhat, count, mask)
        if self.affine:
            self.weight.add_grad(dgamma)
            self.bias.add_grad(dbeta)
        self._cache = None
        return dx


class BatchNorm1d(_BatchNorm):
    """BatchNorm on (N, C) or (N, C, L) inputs; see :class:`_BatchNorm`."""

    _ndim = (2, 3)


class BatchNorm2d(_BatchNorm):
    """BatchNorm on (N, C, H, W) inputs, statistics over N, H, W; see :class:`_BatchNorm`."""

    _ndim = (4,)


class LayerNorm(Module):
    """Normalise over the trailing axes of shape E = ``normalized_shape``; gamma, beta : E."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, *,
                 dtype=np.float32, xp=None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(d) for d in normalized_shape)
        self.eps, self.affine = float(eps), bool(elementwise_affine)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        self.weight = Parameter(place(np.ones(self.normalized_shape), self.xp, self.dtype), "weight")
        self.bias = Parameter(place(np.zeros(self.normalized_shape), self.xp, self.dtype), "bias")
        self._params = [self.weight, self.bias] if self.affine else []

    def forward(self, x):
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm{self.normalized_shape} got input shape {x.shape}")
        y, self._cache = F.layernorm_forward(x, self.weight.data, self.bias.data, k, self.eps)
        return y

    def backward(self, dy):
        dx, dgamma, dbeta = F.layernorm_backward(dy, self._cache)
        if self.affine:
            self.weight.add_grad(dgamma)
            self.bias.add_grad(dbeta)
        self._cache = None
        return dx
