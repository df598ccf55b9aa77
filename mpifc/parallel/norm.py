"""Synchronised BatchNorm: batch statistics over every rank of a group.

N batch, C channels (this rank's channels: all of them, or its block when the
input is channel-sharded), H x W spatial, P ranks in the statistics group.

A BatchNorm whose batch (data parallel) or image (spatial parallel) is split over
a group must normalise with the statistics of the WHOLE batch to equal the serial
layer. :class:`mpifc.nn.norm._BatchNorm` computes per-channel sums in one place
(``batchnorm_stats`` / ``batchnorm_backward_stats``); this layer allreduces them:

    forward   [sum x, sum x^2, count] (C + C + 1) float64   allreduce sum  -> mean, var
    backward  [sum dy, sum dy*xhat]   (C + C)     x.dtype   allreduce sum  -> dx

The forward sums are float64, computed on each rank from data shifted by a local
per-channel value (``batchnorm_stats``): summing (n_r*m_r, M2_r + n_r*m_r^2) over
ranks is Chan's merge of (count, mean, M2) in one allreduce, and float32 inputs
far from zero keep their variance (var = E[x^2] - mean^2 in float32 sums lost it:
output error 876 at an offset of 1e4). Why not the other two ways:

* a shift agreed across ranks, e.g. the running mean (identical on every rank):
  it is 0 in the first step and lags behind whenever the inputs move, exactly
  when the cancellation bites, and it trusts every rank to hold the same buffer;
* an allgather of (count, mean, M2) merged pairwise: P times the message.

The float64 buffer is 2C+1 values (C is at most a few hundred): the bytes do not
matter, and the count travels in it exactly (float64 holds integers to 2**53).

dgamma / dbeta accumulate the LOCAL sums, before the reduction, as every other
parameter gradient does: the data-parallel gradient allreduce (or, for a spatial
group, the caller's gradient reduction) completes them.
"""
from __future__ import annotations

import math

import numpy as np

from mpifc.backend import get_array_module
from mpifc.nn import functional as F
from mpifc.nn.module import Sharding
from mpifc.nn.norm import _BatchNorm
from mpifc.parallel.base import ParallelModule

class _SyncBatchNorm(_BatchNorm):
    """BatchNorm over all axes but the channel axis, statistics summed over ``group``.

    Contract (no row of its own in the table; it serves the data-parallel and the
    spatial-parallel rows):

    ======================= ============================================= ==============================================
    layer                   forward                                       backward
    ======================= ============================================= ==============================================
    synchronised BatchNorm  allreduce of [sum x, sum x^2, count] (2C+1,   allreduce of [sum dy, sum dy*xhat] (2C)
                            float64) in training; none in eval            in training (none if ``input_grad`` is False)
    ======================= ============================================= ==============================================

    With ``group`` None or of size 1 it sends nothing and is the serial BatchNorm.

    Parameters
    ----------
    num_features : C, the channels THIS rank normalises (its block when the input is
        channel-sharded)
    group : Communicator that splits the batch (dp) or the image (spatial), or None
    eps, momentum, affine, dtype, xp : as :class:`mpifc.nn.BatchNorm2d`
    channel_group : Communicator that splits the channels (tp) when the input is a
        channel block, e.g. the output of an OutChannelParallelConv2d; None otherwise
    channel_counts : channels per rank of ``channel_group`` (default: gathered from
        every rank's ``num_features`` once, at construction). With a channel group,
        gamma, beta, running_mean and running_var carry a :class:`Sharding` (axis 0,
        global shape (sum(channel_counts),)) so checkpoints store full tensors.
    name : phase prefix in the trace ("<name>.forward" / "<name>.backward")

    Running statistics are identical on every rank of ``group``: they are updated
    from the allreduced sums.
    """

    def __init__(self, num_features, group, eps=1e-5, momentum=0.1, affine=True, *,
                 channel_group=None, channel_counts=None, name="bn", dtype=np.float32, xp=None):
        super().__init__(num_features, eps, momentum, affine, dtype=dtype, xp=xp)
        self.group, self.name = group, name
        self.channel_group = channel_group
        self.buffer_shardings = {}
        self.channel_counts = None
        if channel_group is not None:
            if channel_counts is None:
                channel_counts = channel_group.allgather_obj(self.num_features)
            counts = tuple(int(c) for c in channel_counts)
            if len(counts) != channel_group.size or counts[channel_group.rank] != self.num_features:
                raise ValueError(f"{name}: channel_counts {counts} do not fit {channel_group.size} "
                                 f"ranks with {self.num_features} channels on rank {channel_group.rank}")
            self.channel_counts = counts
            sh = Sharding(axis=0, group=channel_group.name, counts=counts, index=channel_group.rank,
                          global_shape=(sum(counts),))
            self.weight.sharding = sh
            self.bias.sharding = sh
            self.buffer_shardings = {"running_mean": sh, "running_var": sh}

    @property
    def _syncs(self) -> bool:
        return self.group is not None and self.group.size > 1

    phase = ParallelModule.phase
    _c = ParallelModule._c

    # --- the hooks of _BatchNorm ---
    def reduce_stats(self, mean, m2, count):
        """Chan's merge of (mean, M2, count): [sum x, sum x^2, count] (float64) summed over
        the group in one allreduce."""
        if not self._syncs:
            return mean, m2, count
        s, ss = F.batchnorm_moments_to_sums(mean, m2, count)
        xp = get_array_module(s)
        C = self.num_features
        buf = xp.empty(2 * C + 1, dtype=np.float64)
        buf[:C], buf[C:2 * C] = s, ss
        buf[2 * C] = count
        with self.phase("forward"):
            self.group.allreduce(buf, out=buf)
        # the merged count stays a 0-d float64 array where x lives (exact: a sum of
        # integers below 2**53); reading it back would be a scalar read per layer and step
        count = buf[2 * C]
        return (*F.batchnorm_sums_to_moments(buf[:C], buf[C:2 * C], count), count)

    def reduce_backward_stats(self, sum_dy, sum_dy_xhat):
        """[sum dy, sum dy*xhat] summed over the group in one allreduce."""
        if not self._syncs:
            return sum_dy, sum_dy_xhat
        xp = get_array_module(sum_dy)
        C = self.num_features
        buf = xp.empty(2 * C, dtype=self.dtype)
        buf[:C], buf[C:] = sum_dy, sum_dy_xhat
        with self.phase("backward"):
            self.group.allreduce(buf, out=buf)
        return buf[:C], buf[C:]

    def _check(self, x):
        """(N, C, ...) with this rank's C channels and the layer's dtype, before any message."""
        self._check_input(x, x.ndim in self._ndim and x.shape[1] == self.num_features,
                          lambda: ("(N, C, H, W)" if self._ndim == (4,) else "(N, C) or (N, C, L)")
                          + f" with C = {self.num_features}")

    _where = ParallelModule._where
    _refuse = ParallelModule._refuse
    _check_input = ParallelModule._check_input
    _check_grad = ParallelModule._check_grad

    # --- forward / backward: the base class, plus an empty channel block and input_grad ---
    # (a ReLU fused after it, mpifc.nn.fuse, comes in as relu=True / mask)
    def _forward(self, x, relu):
        if self.num_features == 0 and self.training:
            # an empty channel shard: no statistics, but the same messages as its group
            self._check(x)
            local = x.shape[0] * math.prod(x.shape[2:])
            empty = get_array_module(x).zeros(0, dtype=np.float64)
            _, _, count = self.reduce_stats(empty, empty, local)
            if local < 2 and count < 2:       # read the merged count only when it may be short
                raise ValueError(f"{type(self).__name__} needs more than one value per channel "
                                 f"in training mode (got {int(count)})")
            self.num_batches_tracked += 1
            self._cache = ("empty",)
            self._x_shape = x.shape
            return (x.copy(), get_array_module(x).zeros(x.shape, dtype=bool)) if relu else x.copy()
        y = super()._forward(x, relu)
        self._x_shape = x.shape
        return y

    def backward(self, dy, mask=None):
        self._check_grad(dy, getattr(self, "_x_shape", None) if self._cache is not None else None)
        if self._cache[0] == "empty":
            self._cache = None
            if not self.input_grad:
                return None
            empty = get_array_module(dy).zeros(0, dtype=self.dtype)
            self.reduce_backward_stats(empty, empty)
            return dy.copy() if mask is None else dy * mask
        if self._cache[0] == "train" and not self.input_grad:
            # no input gradient: the local sums give dgamma, dbeta; nothing to reduce
            _, cache, _ = self._cache
            dbeta, dgamma = F.batchnorm_backward_stats(dy, cache, mask)
            if self.affine:
                self.weight.add_grad(dgamma)
                self.bias.add_grad(dbeta)
            self._cache = None
            return None
        return super().backward(dy, mask)

    # --- description ---
    def output_shape(self, input_shape):
        return tuple(input_shape)

    def collectives(self, input_shape):
        if not (self._syncs and self.training):
            return []
        C = self.num_features
        out = [self._c("forward", "allreduce", self.group, 2 * C + 1)._replace(itemsize=8)]
        if self.input_grad:
            out.append(self._c("backward", "allreduce", self.group, 2 * C))
        return out

    def flops(self, input_shape):
        """Forward: sums (3/element) and normalise + affine (4); backward: sums (3) and dx (4)."""
        n = math.prod(input_shape)
        return 7 * n, 7 * n

    def __repr__(self):
        g = "none" if self.group is None else f"{self.group.name}({self.group.size})"
        ch = "" if self.channel_counts is None else f", channels {self.channel_counts} over tp"
        return f"{type(self).__name__}({self.num_features}, group={g}{ch})"


class SyncBatchNorm1d(_SyncBatchNorm):
    """Synchronised BatchNorm on (N, C) or (N, C, L) inputs; see :class:`_SyncBatchNorm`."""

    _ndim = (2, 3)


class SyncBatchNorm2d(_SyncBatchNorm):
    """Synchronised BatchNorm on (N, C, H, W) inputs, statistics over N, H, W and the
    group; see :class:`_SyncBatchNorm`."""

    _ndim = (4,)

