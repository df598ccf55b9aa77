"""Tensor-parallel fully connected layers. N batch, D in features, F out features,
P ranks in the tensor group, F_r / D_r this rank's shard (uneven: balanced counts).
Inputs may have any leading shape (N, ..., D), e.g. (N, T, D) for a sequence: the
features are always the LAST axis, and that is the axis the layers split and gather.

A column layer followed by a row layer needs no communication between them: the
column layer's output shard (N, F_r) is exactly the row layer's input shard.
"""
from __future__ import annotations

import numpy as np

from mpifc.nn import functional as F
from mpifc.nn import init as I
from mpifc.nn._common import place, resolve_dtype, resolve_xp
from mpifc.nn.module import Parameter, Sharding
from mpifc.parallel.base import ParallelModule, allgather_axis, take_axis
from mpifc.parallel.describe import linear_flops
from mpifc.parallel.init import input_split, replicated_bias, sharded_parameter, shard_counts


def _zeros_shard(name, n_local, counts, group, dtype, xp, n_global):
    """A zero-initialised sharded vector (the serial bias is zeros: nothing to scatter)."""
    sh = Sharding(axis=0, group=group.name, counts=tuple(counts), index=group.rank,
                  global_shape=(n_global,))
    return Parameter(place(np.zeros(n_local), xp, dtype), name, sharding=sh)


class ColumnParallelLinear(ParallelModule):
    """y = x @ W.T + b with W : (F, D) split on its output rows, F_r rows per rank.

    Contract row:

    ============================================ ============================================ =========================
    layer                                        forward                                      backward
    ============================================ ============================================ =========================
    column-parallel linear (W split on outputs)  local GEMM; allgather(v) of outputs only if  allreduce of input grad
                                                 gathered
    ============================================ ============================================ =========================

    Parameters
    ----------
    in_features, out_features : D, F
    group : Communicator that splits the outputs (the tensor group)
    bias : learn b : (F,), sharded like W's rows (zeros at start, as the serial layer)
    gather_output : allgather(v) the outputs to (N, F) on every rank; otherwise the
        output stays sharded (N, F_r), ready for a :class:`RowParallelLinear`
    name : phase prefix in the trace ("<name>.forward" / "<name>.backward")
    init, rng, seed, dtype, xp : as :class:`mpifc.nn.Linear`; only the group root
        draws from ``rng`` (the full W), then scatter(v)s the rows

    Shapes
    ------
    x : (N, ..., D) replicated over the group -> y : (N, ..., F_r), or (N, ..., F) when
    gathered (on the last axis)
    """

    def __init__(self, in_features, out_features, group, bias=True, gather_output=False, *,
                 name="fc", init="kaiming_uniform", rng=None, seed=None, dtype=np.float32, xp=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.group, self.name, self.gather_output = group, name, bool(gather_output)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        self.out_counts = shard_counts(self.out_features, group)
        self.F_r = self.out_counts[group.rank]
        rng = I.make_rng(rng, seed) if group.rank == 0 else None
        shape = (self.out_features, self.in_features)
        self.weight = sharded_parameter(group, "weight", lambda: I.initialize(init, shape, rng, self.dtype),
                                        shape, 0, self.out_counts, self.dtype, self.xp)
        self._params = [self.weight]
        self.bias = None
        if bias:
            self.bias = _zeros_shard("bias", self.F_r, self.out_counts, group, self.dtype, self.xp,
                                     self.out_features)
            self._params.append(self.bias)
        self._x = self._y_shape = None

    def forward(self, x):
        """x : (N, ..., D) -> y : (N, ..., F_r), or (N, ..., F) with ``gather_output``."""
        self._check_input(x, x.ndim >= 1 and x.shape[-1] == self.in_features,
                          lambda: f"(N, ..., {self.in_features})")
        self._x = x
        # local GEMM on this rank's output rows of W: no communication
        y = F.linear_forward(x, self.weight.data, None if self.bias is None else self.bias.data)
        if self.gather_output:
            with self.phase("forward"):
                y = allgather_axis(self.group, y, self.out_counts, -1)
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        """dy : (N, ..., F_r) or (N, ..., F) when gathered -> dx : (N, ..., D), summed over the group."""
        self._check_grad(dy, self._y_shape)
        if self.gather_output:
            # adjoint of the allgather: every rank holds the full (replicated) dy; keep my block
            off = sum(self.out_counts[: self.group.rank])
            dy = take_axis(dy, -1, off, off + self.F_r)
        x, self._x = self._x, None
        # db, dW in row blocks (each may start its data-parallel allreduce), then dx
        if self.bias is not None:
            self.bias.accumulate_rows(lambda r0, r1, out: F.linear_backward_bias(dy, r0, r1, out))
        self.weight.accumulate_rows(lambda r0, r1, out: F.linear_backward_weight(dy, x, r0, r1, out))
        dx = F.linear_backward_input(dy, self.weight.data) if self.input_grad else None
        if dx is not None:
            # each rank's dx is the contribution of its output features: sum them
            with self.phase("backward"):
                self.group.allreduce(dx, out=dx)
        return dx

    # --- description ---
    def output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + ((self.out_features if self.gather_output else self.F_r),)

    def collectives(self, input_shape):
        rows = int(np.prod(input_shape[:-1]))
        out = []
        if self.gather_output:
            out.append(self._c("forward", "allgather", self.group, rows * self.F_r))
        if self.input_grad:
            out.append(self._c("backward", "allreduce", self.group, rows * self.in_features))
        return out

    def flops(self, input_shape):
        f, b = linear_flops(int(np.prod(input_shape[:-1])), self.in_features, self.F_r)
        return f, (b if self.input_grad else b // 2)

    def __repr__(self):
        return (f"ColumnParallelLinear({self.in_features}, {self.out_features}, shard {self.F_r}/"
                f"{self.group.size} ranks, gather_output={self.gather_output})")


class RowParallelLinear(ParallelModule):
    """y = x @ W.T + b with W : (F, D) split on its input columns, D_r columns per rank.

    Contract row:

    ========================================= ====================================== =================================
    layer                                     forward                                backward
    ========================================= ====================================== =================================
    row-parallel linear (W split on inputs)   local GEMM; allreduce of outputs       input grad stays sharded
                                                                                     (allgather(v) only if input was
                                                                                     not)
    ========================================= ====================================== =================================

    The bias is replicated and added once, after the allreduce.

    Parameters
    ----------
    in_features, out_features : D, F
    group : Communicator that splits the inputs
    bias : learn b : (F,), replicated over the group
    input_is_sharded : the input arrives as this rank's (N, D_r) block (e.g. from a
        :class:`ColumnParallelLinear`); if False it arrives whole (N, D) and the layer
        takes its block locally, and backward allgather(v)s the input gradient
    in_counts : input features per rank (default: balanced counts of D). A channel-
        sharded conv flattened into this layer passes channels_per_rank * H * W.
    name, init, rng, seed, dtype, xp : as :class:`ColumnParallelLinear`

    Shapes
    ------
    x : (N, ..., D_r) (or (N, ..., D) when not sharded) -> y : (N, ..., F) replicated
    over the group
    """

    def __init__(self, in_features, out_features, group, bias=True, input_is_sharded=True,
                 in_counts=None, *, name="fc", init="kaiming_uniform", rng=None, seed=None,
                 dtype=np.float32, xp=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.group, self.name, self.input_is_sharded = group, name, bool(input_is_sharded)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        self.in_counts, self.D_r, self.D_off = input_split(name, self.in_features, group, in_counts)
        rng = I.make_rng(rng, seed) if group.rank == 0 else None
        shape = (self.out_features, self.in_features)
        self.weight = sharded_parameter(group, "weight", lambda: I.initialize(init, shape, rng, self.dtype),
                                        shape, 1, self.in_counts, self.dtype, self.xp)
        self._params = [self.weight]
        self.bias = None
        if bias:
            self.bias = replicated_bias(self.out_features, self.xp, self.dtype)
            self._params.append(self.bias)
        self._x = self._y_shape = None

    def forward(self, x):
        """x : (N, ..., D_r) or (N, ..., D) -> y : (N, ..., F), identical on every rank of the group."""
        D = self.D_r if self.input_is_sharded else self.in_features
        self._check_input(x, x.ndim >= 1 and x.shape[-1] == D,
                          lambda: f"(N, ..., {D})" + (f": its {D} of {self.in_features} input "
                                                      "features" if self.input_is_sharded else ""))
        if not self.input_is_sharded:
            x = take_axis(x, -1, self.D_off, self.D_off + self.D_r)   # my block, no message
        self._x = x
        y = F.linear_forward(x, self.weight.data)          # partial sum over my D_r inputs
        with self.phase("forward"):
            self.group.allreduce(y, out=y)
        if self.bias is not None:
            y += self.bias.data                            # once, after the reduce
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        """dy : (N, ..., F) replicated -> dx : (N, ..., D_r), or (N, ..., D) when the input was not
        sharded (gathered on the last axis)."""
        self._check_grad(dy, self._y_shape)
        x, self._x = self._x, None
        # db (dy is replicated, so the same on every rank), dW in row blocks, then dx
        if self.bias is not None:
            self.bias.accumulate_rows(lambda r0, r1, out: F.linear_backward_bias(dy, r0, r1, out))
        self.weight.accumulate_rows(lambda r0, r1, out: F.linear_backward_weight(dy, x, r0, r1, out))
        dx = F.linear_backward_input(dy, self.weight.data) if self.input_grad else None
        if dx is not None and not self.input_is_sharded:
            with self.phase("backward"):
                dx = allgather_axis(self.group, dx, self.in_counts, -1)
        return dx

    # --- description ---
    def output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_features,)

    def collectives(self, input_shape):
        rows = int(np.prod(input_shape[:-1]))
        out = [self._c("forward", "allreduce", self.group, rows * self.out_features)]
        if self.input_grad and not self.input_is_sharded:
            out.append(self._c("backward", "allgather", self.group, rows * self.D_r))
        return out

    def flops(self, input_shape):
        f, b = linear_flops(int(np.prod(input_shape[:-1])), self.D_r, self.out_features)
        return f, (b if self.input_grad else b // 2)

    def __repr__(self):
        return (f"RowParallelLinear({self.in_features}, {self.out_features}, shard {self.D_r}/"
                f"{self.group.size} ranks, input_is_sharded={self.input_is_sharded})")
