"""2-D convolution, NCHW. N batch, C in channels, K out channels, G groups, R x S kernel."""
from __future__ import annotations

import numpy as np

from mpifc.nn import functional as F
from mpifc.nn import init as I
from mpifc.nn._common import place, resolve_dtype, resolve_xp
from mpifc.nn.module import Module, Parameter


def conv_param_backward(dy, cache, weight, bias, need_dx):
    """``F.conv2d_backward`` with dW (and db) added to ``weight`` (and ``bias``): the
    gradient step every convolution layer shares. Returns dx (None without ``need_dx``)."""
    dx, dW, db = F.conv2d_backward(dy, cache, need_dx=need_dx, need_db=bias is not None)
    weight.add_grad(dW)
    if bias is not None:
        bias.add_grad(db)
    return dx


class Conv2d(Module):
    """Convolution (cross-correlation) via im2col + one GEMM, forward and backward.

    Parameters
    ----------
    in_channels, out_channels : C, K
    kernel_size, stride, dilation : int or (h, w)
    padding : int, (ph, pw) or ((top, bottom), (left, right))
    groups : G, divides C and K; W has shape (K, C/G, R, S)
    bias : learn b : (K,) (zeros at start)
    init, rng, seed, dtype, xp : as in :class:`mpifc.nn.Linear`
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, *, init="kaiming_uniform", rng=None, seed=None,
                 dtype=np.float32, xp=None):
        super().__init__()
        C, K, G = int(in_channels), int(out_channels), int(groups)
        if G < 1 or C % G or K % G:
            raise ValueError(f"groups={G} must divide in_channels={C} and out_channels={K}")
        self.in_channels, self.out_channels, self.groups = C, K, G
        self.kernel_size = F._pair(kernel_size)
        self.stride, self.dilation = F._pair(stride), F._pair(dilation)
        self.padding = F.normalize_padding(padding)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        rng = I.make_rng(rng, seed)
        W = I.initialize(init, (K, C // G) + self.kernel_size, rng, self.dtype)
        self.weight = Parameter(place(W, self.xp, self.dtype), "weight")
        self._params = [self.weight]
        self.bias = None
        if bias:
            self.bias = Parameter(place(I.zeros(K, self.dtype), self.xp, self.dtype), "bias")
            self._params.append(self.bias)
        self._cache = None

    def forward(self, x):
        """x : (N, C, H, W) -> y : (N, K, Ho, Wo)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d expects (N, {self.in_channels}, H, W), got shape {x.shape}")
        y, self._cache = F.conv2d_forward(x, self.weight.data,
                                          None if self.bias is None else self.bias.data,
                                          self.stride, self.padding, self.dilation, self.groups)
        return y

    def backward(self, dy):
        """dy : (N, K, Ho, Wo) -> dx : (N, C, H, W) (None when ``input_grad`` is False)."""
        dx = conv_param_backward(dy, self._cache, self.weight, self.bias, self.input_grad)
        self._cache = None
        return dx

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None})")
