"""What a sharded layer communicates and computes, described without running it.

Every layer in :mod:`mpifc.parallel` answers three questions about one training
step (forward + backward) on THIS rank, from the shape of its local input:

    layer.output_shape(input_shape) -> tuple            local output shape
    layer.collectives(input_shape)  -> list[Collective] the messages it will issue
    layer.flops(input_shape)        -> (fwd, bwd)       floating-point operations

``Collective.count`` / ``bytes`` follow the trace convention of
:mod:`mpifc.comm.communicator`: the element count of this rank's buffer argument
(the input of a reducing or gathering op, the sent block of a sendrecv). Tests
compare these predictions with the real trace of a training step, so a silent
extra or missing message fails; the simulator (:mod:`mpifc.sim`) uses the same
lists as its analytic workload.

Layers of :mod:`mpifc.nn` (serial, no communication) are described by the
functions below (:func:`output_shape`, :func:`collectives`, :func:`flops`), which
dispatch to a layer's own method when it has one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from mpifc.nn import functional as F


class Collective(NamedTuple):
    """One communication call a layer issues in a training step (on this rank).

    phase    trace phase label, e.g. ``"fc1.backward"``
    op       communicator method: allreduce, allgather, sendrecv, iallreduce, ...
    group    communicator name: "tp", "dp", "world", ...
    count    elements in this rank's buffer argument (trace convention)
    itemsize bytes per element
    """

    phase: str
    op: str
    group: str
    count: int
    itemsize: int

    @property
    def bytes(self) -> int:
        return self.count * self.itemsize

    def key(self) -> tuple:
        """(phase, op, group, count, bytes): the fields a trace event is matched on."""
        return (self.phase, self.op, self.group, int(self.count), int(self.bytes))


def event_key(e: dict) -> tuple:
    """The :meth:`Collective.key` of a trace event dict."""
    return (e["phase"], e["op"], e["comm"], int(e["count"]), int(e["bytes"]))


def _prod(shape) -> int:
    return int(math.prod(shape))


# --------------------------------------------------------------------------- #
# dispatch over layers (parallel layers carry their own methods)
# --------------------------------------------------------------------------- #
def output_shape(layer, input_shape) -> tuple:
    """Local output shape of ``layer`` (a parallel layer or a serial mpifc.nn layer)."""
    input_shape = tuple(int(s) for s in input_shape)
    if hasattr(layer, "output_shape"):
        return tuple(layer.output_shape(input_shape))
    name = type(layer).__name__
    if name == "Sequential":
        for sub in layer.layers:
            input_shape = output_shape(sub, input_shape)
        return input_shape
    if name == "Linear":
        return input_shape[:-1] + (layer.out_features,)
    if name == "Conv2d":
        N, C, H, W = input_shape
        (t, b), (l, r) = layer.padding
        Ho = F.conv_output_size(H, layer.kernel_size[0], layer.stride[0], t, b, layer.dilation[0])
        Wo = F.conv_output_size(W, layer.kernel_size[1], layer.stride[1], l, r, layer.dilation[1])
        return (N, layer.out_channels, Ho, Wo)
    if name in ("MaxPool2d", "AvgPool2d"):
        N, C, H, W = input_shape
        (t, b), (l, r) = layer.padding
        Ho = F.conv_output_size(H, layer.kernel_size[0], layer.stride[0], t, b)
        Wo = F.conv_output_size(W, layer.kernel_size[1], layer.stride[1], l, r)
        return (N, C, Ho, Wo)
    if name == "GlobalAvgPool2d":
        return input_shape[:2]
    if name == "Flatten":
        return input_shape[: layer.start_dim] + (_prod(input_shape[layer.start_dim:]),)
    # elementwise layers (activations, dropout, normalisation) keep the shape
    return input_shape


def collectives(layer, input_shape) -> list[Collective]:
    """Messages of one training step of ``layer`` (serial layers send none)."""
    if hasattr(layer, "collectives"):
        return list(layer.collectives(tuple(input_shape)))
    if type(layer).__name__ == "Sequential":
        out, shape = [], tuple(input_shape)
        for sub in layer.layers:
            out += collectives(sub, shape)
            shape = output_shape(sub, shape)
        return out
    return []


def flops(layer, input_shape) -> tuple[int, int]:
    """(forward, backward) floating-point operations on this rank; 2 per multiply-add.

    Backward counts the weight-gradient and the input-gradient products (the
    latter is skipped at run time on a first layer with ``input_grad=False``).
    Elementwise layers count one operation per element each way.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if hasattr(layer, "flops"):
        return tuple(layer.flops(input_shape))
    name = type(layer).__name__
    if name == "Sequential":
        f = b = 0
        shape = input_shape
        for sub in layer.layers:
            lf, lb = flops(sub, shape)
            f, b = f + lf, b + lb
            shape = output_shape(sub, shape)
        return f, b
    out = output_shape(layer, input_shape)
    if name == "Linear":
        return linear_flops(_prod(input_shape[:-1]), layer.in_features, layer.out_features)
    if name == "Conv2d":
        R, S = layer.kernel_size
        return conv_flops(out, layer.in_channels // layer.groups, R, S)
    if name in ("MaxPool2d", "AvgPool2d"):
        R, S = layer.kernel_size
        return _prod(out) * R * S, _prod(input_shape)
    if name in ("Flatten",):
        return 0, 0
    return _prod(input_shape), _prod(input_shape)


def linear_flops(rows: int, D: int, F_: int) -> tuple[int, int]:
    """GEMM flops of y = x W^T on (rows, D) x (F, D): forward 2*rows*D*F, backward twice that."""
    f = 2 * rows * D * F_
    return f, 2 * f


def conv_flops(out_shape, c_per_group: int, R: int, S: int) -> tuple[int, int]:
    """im2col GEMM flops of a convolution producing ``out_shape`` = (N, K, Ho, Wo)."""
    f = 2 * _prod(out_shape) * c_per_group * R * S
    return f, 2 * f


def match_trace(expected: list[Collective], events: list[dict]) -> tuple[list, list]:
    """Compare predicted collectives with trace events as multisets.

    Returns
    -------
    missing : keys predicted but not in the trace
    extra : keys in the trace but not predicted
    """
    from collections import Counter

    want = Counter(c.key() for c in expected)
    got = Counter(event_key(e) for e in events)
    missing = sorted((want - got).elements())
    extra = sorted((got - want).elements())
    return missing, extra
