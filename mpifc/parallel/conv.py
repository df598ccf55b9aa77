"""Channel-parallel convolutions. N batch, C in channels, K out channels, H x W input,
Ho x Wo output, R x S kernel, P ranks in the tensor group, K_r / C_r this rank's
shard (uneven: balanced counts, larger shards first; an empty shard still joins
every collective).

The convolution analogue of the column/row pair of :mod:`mpifc.parallel.linear`:

    OutChannelParallelConv2d   W (K, C, R, S) split on K   (axis 0)  ~ column-parallel
    InChannelParallelConv2d    W (K, C, R, S) split on C   (axis 1)  ~ row-parallel

An out-channel conv followed by an in-channel conv needs no message between them:
the first one's output block (N, K_r, Ho, Wo) is exactly the second one's input
block, and per-channel layers in between (ReLU, pooling, a BatchNorm on the local
channels) keep the block as it is.

Only ``groups=1`` convolutions are sharded here: a grouped conv would split its
channel groups, not its filters, and is not supported.
"""
from __future__ import annotations

import numpy as np

from mpifc.nn import functional as F
from mpifc.nn import init as I
from mpifc.nn._common import place, resolve_dtype, resolve_xp
from mpifc.nn.conv import conv_param_backward
from mpifc.nn.module import Parameter, Sharding
from mpifc.parallel.base import ParallelModule, allgather_axis, take_axis
from mpifc.parallel.describe import conv_flops
from mpifc.parallel.init import input_split, replicated_bias, shard_counts, sharded_parameter


class _ConvGeometry(ParallelModule):
    """Hyper-parameters and output size shared by the channel-parallel convs."""

    def _setup(self, in_channels, out_channels, kernel_size, group, stride, padding, dilation,
               groups, name, dtype, xp):
        if int(groups) != 1:
            raise ValueError(f"{name}: channel-parallel convolutions support groups=1 only "
                             f"(got groups={groups}); use mpifc.nn.Conv2d for a grouped conv")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = F._pair(kernel_size)
        self.stride, self.dilation = F._pair(stride), F._pair(dilation)
        self.padding = F.normalize_padding(padding)
        self.group, self.name = group, name
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)

    def _out_hw(self, H, W):
        (t, b), (l, r) = self.padding
        Ho = F.conv_output_size(H, self.kernel_size[0], self.stride[0], t, b, self.dilation[0])
        Wo = F.conv_output_size(W, self.kernel_size[1], self.stride[1], l, r, self.dilation[1])
        return Ho, Wo

    def _check_image(self, x, C, what=""):
        """x : (N, C, H, W) with C channels and an image the kernel fits, before any message."""
        ok = x.ndim == 4 and x.shape[1] == C
        small = ""
        if ok:
            Ho, Wo = self._out_hw(x.shape[2], x.shape[3])
            if Ho <= 0 or Wo <= 0:
                ok, small = False, f" with H x W at least the kernel's reach (output {Ho}x{Wo})"
        self._check_input(x, ok, lambda: f"(N, {C}, H, W){what}{small}")

    def _conv(self, x, W):
        return F.conv2d_forward(x, W, None, self.stride, self.padding, self.dilation, 1)


class OutChannelParallelConv2d(_ConvGeometry):
    """2-D convolution with its filters W : (K, C, R, S) split over the group, K_r per rank.

    Contract row:

    ===================================== ============================================ =========================
    layer                                 forward                                      backward
    ===================================== ============================================ =========================
    output-channel-parallel conv          local conv; allgather(v) on channels if      allreduce of input grad
                                          gathered
    ===================================== ============================================ =========================

    Parameters
    ----------
    in_channels, out_channels : C, K
    kernel_size, stride, padding, dilation : as :class:`mpifc.nn.Conv2d`
    group : Communicator that splits the filters (the tensor group)
    bias : learn b : (K,), sharded like the filters (zeros at start, as the serial layer)
    gather_output : allgather(v) the output channels to (N, K, Ho, Wo) on every rank;
        otherwise the output stays sharded (N, K_r, Ho, Wo), ready for an
        :class:`InChannelParallelConv2d`
    name : phase prefix in the trace ("<name>.forward" / "<name>.backward")
    init, rng, seed, dtype, xp : as :class:`mpifc.nn.Conv2d`; only the group root
        draws from ``rng`` (the full W), then scatter(v)s the filters
    groups : must be 1 (grouped convolutions are not sharded)

    Shapes
    ------
    x : (N, C, H, W) replicated over the group -> y : (N, K_r, Ho, Wo), or
    (N, K, Ho, Wo) when gathered. Each rank's dx is the contribution of its
    filters; the backward allreduce sums them into the full input gradient.
    """

    def __init__(self, in_channels, out_channels, kernel_size, group, stride=1, padding=0,
                 dilation=1, bias=True, gather_output=False, *, name="conv",
                 init="kaiming_uniform", rng=None, seed=None, dtype=np.float32, xp=None, groups=1):
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, group, stride, padding, dilation,
                    groups, name, dtype, xp)
        self.gather_output = bool(gather_output)
        self.out_counts = shard_counts(self.out_channels, group)
        self.K_r = self.out_counts[group.rank]
        self.K_off = sum(self.out_counts[: group.rank])
        rng = I.make_rng(rng, seed) if group.rank == 0 else None
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        self.weight = sharded_parameter(group, "weight", lambda: I.initialize(init, shape, rng, self.dtype),
                                        shape, 0, self.out_counts, self.dtype, self.xp)
        self._params = [self.weight]
        self.bias = None
        if bias:
            sh = Sharding(axis=0, group=group.name, counts=tuple(self.out_counts), index=group.rank,
                          global_shape=(self.out_channels,))
            self.bias = Parameter(place(np.zeros(self.K_r), self.xp, self.dtype), "bias", sharding=sh)
            self._params.append(self.bias)
        self._cache = self._y_shape = None

    def forward(self, x):
        """x : (N, C, H, W) -> y : (N, K_r, Ho, Wo), or (N, K, Ho, Wo) with ``gather_output``."""
        self._check_image(x, self.in_channels)
        # local conv with this rank's filters: no communication
        y, self._cache = F.conv2d_forward(x, self.weight.data,
                                          None if self.bias is None else self.bias.data,
                                          self.stride, self.padding, self.dilation, 1)
        if self.gather_output:
            with self.phase("forward"):
                y = allgather_axis(self.group, y, self.out_counts, 1)
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        """dy : (N, K_r, Ho, Wo) (or (N, K, Ho, Wo) when gathered) -> dx : (N, C, H, W)."""
        self._check_grad(dy, self._y_shape)
        if self.gather_output:
            # adjoint of the allgather: dy is replicated, keep my block of channels
            dy = take_axis(dy, 1, self.K_off, self.K_off + self.K_r)
        dx = conv_param_backward(dy, self._cache, self.weight, self.bias, self.input_grad)
        self._cache = None
        if dx is not None:
            # every rank's dx comes from its own filters: sum them
            with self.phase("backward"):
                self.group.allreduce(dx, out=dx)
        return dx

    # --- description ---
    def output_shape(self, input_shape):
        N, C, H, W = input_shape
        Ho, Wo = self._out_hw(H, W)
        return (N, self.out_channels if self.gather_output else self.K_r, Ho, Wo)

    def collectives(self, input_shape):
        N, C, H, W = input_shape
        Ho, Wo = self._out_hw(H, W)
        out = []
        if self.gather_output:
            out.append(self._c("forward", "allgather", self.group, N * self.K_r * Ho * Wo))
        if self.input_grad:
            out.append(self._c("backward", "allreduce", self.group, N * C * H * W))
        return out

    def flops(self, input_shape):
        N, C, H, W = input_shape
        Ho, Wo = self._out_hw(H, W)
        f, b = conv_flops((N, self.K_r, Ho, Wo), self.in_channels, *self.kernel_size)
        return f, (b if self.input_grad else b // 2)

    def __repr__(self):
        return (f"OutChannelParallelConv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, shard {self.K_r}/{self.group.size} ranks, "
                f"gather_output={self.gather_output})")


class InChannelParallelConv2d(_ConvGeometry):
    """2-D convolution with W : (K, C, R, S) split on its input channels, C_r per rank.

    Contract row:

    ===================================== ============================================ ==========================
    layer                                 forward                                      backward
    ===================================== ============================================ ==========================
    input-channel-parallel conv           local conv; allreduce of partial outputs     none for sharded input
                                                                                       (allgather(v) of the input
                                                                                       grad on channels if the
                                                                                       input was whole)
    ===================================== ============================================ ==========================

    Each rank convolves its C_r input channels with its slice of W, giving a partial
    sum of every output channel; the allreduce completes it. The bias is replicated
    and added once, after the reduce.

    Parameters
    ----------
    in_channels, out_channels : C, K
    kernel_size, stride, padding, dilation : as :class:`mpifc.nn.Conv2d`
    group : Communicator that splits the input channels
    bias : learn b : (K,), replicated over the group
    input_is_sharded : the input arrives as this rank's (N, C_r, H, W) block (from an
        :class:`OutChannelParallelConv2d`, possibly through per-channel layers); if
        False it arrives whole (N, C, H, W), the layer takes its block locally, and
        backward allgather(v)s the input gradient on channels
    in_counts : input channels per rank (default: balanced counts of C, which is what
        an OutChannelParallelConv2d with C filters on the same group produces)
    name, init, rng, seed, dtype, xp : as :class:`OutChannelParallelConv2d`
    groups : must be 1

    Shapes
    ------
    x : (N, C_r, H, W) (or (N, C, H, W) when not sharded) -> y : (N, K, Ho, Wo),
    identical on every rank of the group
    """

    def __init__(self, in_channels, out_channels, kernel_size, group, stride=1, padding=0,
                 dilation=1, bias=True, input_is_sharded=True, in_counts=None, *, name="conv",
                 init="kaiming_uniform", rng=None, seed=None, dtype=np.float32, xp=None, groups=1):
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, group, stride, padding, dilation,
                    groups, name, dtype, xp)
        self.input_is_sharded = bool(input_is_sharded)
        self.in_counts, self.C_r, self.C_off = input_split(name, self.in_channels, group, in_counts,
                                                           "in_channels")
        rng = I.make_rng(rng, seed) if group.rank == 0 else None
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        self.weight = sharded_parameter(group, "weight", lambda: I.initialize(init, shape, rng, self.dtype),
                                        shape, 1, self.in_counts, self.dtype, self.xp)
        self._params = [self.weight]
        self.bias = None
        if bias:
            self.bias = replicated_bias(self.out_channels, self.xp, self.dtype)
            self._params.append(self.bias)
        self._cache = self._y_shape = None

    def forward(self, x):
        """x : (N, C_r, H, W) or (N, C, H, W) -> y : (N, K, Ho, Wo), replicated."""
        if self.input_is_sharded:
            self._check_image(x, self.C_r, f": its {self.C_r} of {self.in_channels} input channels")
        else:
            self._check_image(x, self.in_channels)
            x = take_axis(x, 1, self.C_off, self.C_off + self.C_r)   # my block, no message
        # partial sum over my C_r channels of every output channel
        y, self._cache = self._conv(x, self.weight.data)
        with self.phase("forward"):
            self.group.allreduce(y, out=y)
        if self.bias is not None:
            y += self.bias.data.reshape(1, -1, 1, 1)     # once, after the reduce
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        """dy : (N, K, Ho, Wo) replicated -> dx : (N, C_r, H, W), or (N, C, H, W) if not sharded."""
        self._check_grad(dy, self._y_shape)
        # db from dy (replicated, so the same on every rank); the forward conv had no bias
        dx = conv_param_backward(dy, self._cache, self.weight, self.bias, self.input_grad)
        self._cache = None
        if dx is not None and not self.input_is_sharded:
            with self.phase("backward"):
                dx = allgather_axis(self.group, dx, self.in_counts, 1)
        return dx

    # --- description ---
    def _local_in(self, input_shape):
        N, C, H, W = input_shape
        return N, self.C_r, H, W

    def output_shape(self, input_shape):
        N, _, H, W = input_shape
        return (N, self.out_channels) + self._out_hw(H, W)

    def collectives(self, input_shape):
        N, C_r, H, W = self._local_in(input_shape)
        Ho, Wo = self._out_hw(H, W)
        out = [self._c("forward", "allreduce", self.group, N * self.out_channels * Ho * Wo)]
        if self.input_grad and not self.input_is_sharded:
            out.append(self._c("backward", "allgather", self.group, N * C_r * H * W))
        return out

    def flops(self, input_shape):
        N, C_r, H, W = self._local_in(input_shape)
        Ho, Wo = self._out_hw(H, W)
        f, b = conv_flops((N, self.out_channels, Ho, Wo), C_r, *self.kernel_size)
        return f, (b if self.input_grad else b // 2)

    def __repr__(self):
        return (f"InChannelParallelConv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, shard {self.C_r}/{self.group.size} ranks, "
                f"input_is_sharded={self.input_is_sharded})")
