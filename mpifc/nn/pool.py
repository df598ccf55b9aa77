"""Pooling layers, NCHW. N batch, C channels, H x W input, Ho x Wo output."""
from __future__ import annotations

from mpifc.nn import functional as F
from mpifc.nn.module import Module


class MaxPool2d(Module):
    """Max over R x S windows; stride defaults to the kernel; padding per side allowed.

    x : (N, C, H, W) -> y : (N, C, Ho, Wo)
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = F._pair(kernel_size)
        self.stride = F._pair(stride) if stride is not None else self.kernel_size
        self.padding = F.normalize_padding(padding)
        self._cache = None

    def forward(self, x):
        y, self._cache = F.maxpool2d_forward(x, self.kernel_size, self.stride, self.padding)
        return y

    def backward(self, dy):
        dx = F.maxpool2d_backward(dy, self._cache)
        self._cache = None
        return dx


class AvgPool2d(Module):
    """Mean over R x S windows (padding counted as zeros unless ``count_include_pad=False``).

    x : (N, C, H, W) -> y : (N, C, Ho, Wo)
    """

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__()
        self.kernel_size = F._pair(kernel_size)
        self.stride = F._pair(stride) if stride is not None else self.kernel_size
        self.padding = F.normalize_padding(padding)
        self.count_include_pad = bool(count_include_pad)
        self._cache = None

    def forward(self, x):
        y, self._cache = F.avgpool2d_forward(x, self.kernel_size, self.stride, self.padding,
                                             self.count_include_pad)
        return y

    def backward(self, dy):
        dx = F.avgpool2d_backward(dy, self._cache)
        self._cache = None
        return dx


class GlobalAvgPool2d(Module):
    """Mean over H and W: x : (N, C, H, W) -> y : (N, C)."""

    def forward(self, x):
        self._shape = x.shape
        return F.global_avgpool2d_forward(x)

    def backward(self, dy):
        return F.global_avgpool2d_backward(dy, self._shape)
