"""Spatial-parallel conv and pooling (image height split over the ranks) against serial.

The row plan is checked by brute force on one process (every small geometry, 1-5
bands); the layers run under mpiexec on odd heights (11 rows over 3 ranks is 4, 4, 3),
with stride, per-side padding and dilation at the image border, a rank with no
output rows, and a conv -> BN -> pool -> conv chain compared with the serial model.
Halo exchange and halo add are adjoint-tested with the communicator (tests/comm).
"""
import itertools

import numpy as np
import pytest

from mpifc import nn
from mpifc.comm import balanced_counts, trace
from mpifc.nn import functional as F
from mpifc.parallel import (SpatialGather, SpatialParallelAvgPool2d, SpatialParallelConv2d,
                            SpatialParallelMaxPool2d, SyncBatchNorm2d, match_trace)
from mpifc.parallel.describe import collectives as describe_collectives
from mpifc.parallel.spatial import plan_rows, row_bands, split_rows
from parallel_helpers import check

DTYPES = [np.float64, np.float32]


def _data(shape, dtype, seed=3):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _summed(comm, v):
    from mpi4py import MPI
    out = np.empty_like(v)
    comm.mpi.Allreduce(np.ascontiguousarray(v), out, op=MPI.SUM)     # untraced bookkeeping
    return out


# --------------------------------------------------------------------------- #
# the plan, by brute force (serial)
# --------------------------------------------------------------------------- #
def _needs_far_rows(H, R, s, d, pt, pb, P, Ho):
    """True when some rank's outputs read a real row owned by a non-neighbour."""
    ins, outs = row_bands(H, P), row_bands(Ho, P)
    owner = [r for r, (a, b) in enumerate(ins) for _ in range(a, b)]
    for r, (p, q) in enumerate(outs):
        for i in range(p, q):
            for j in range(R):
                row = i * s - pt + d * j
                if 0 <= row < H and abs(owner[row] - r) > 1:
                    return True
    return False


def test_row_plan_reproduces_serial_rows():
    """Every rank's halo-extended, trimmed, border-padded band convolves to exactly its
    balanced block of the serial output rows; halos only from neighbours."""
    n = 0
    for H, R, s, d, (pt, pb), P in itertools.product(range(1, 13), range(1, 5), (1, 2, 3), (1, 2),
                                                     ((0, 0), (1, 0), (2, 1)), range(1, 6)):
        Ho = F.conv_output_size(H, R, s, pt, pb, d)
        if Ho <= 0 or _needs_far_rows(H, R, s, d, pt, pb, P, Ho):
            with pytest.raises(ValueError):
                plan_rows(H, R, s, pt, pb, d, P)
            continue
        plan = plan_rows(H, R, s, pt, pb, d, P)
        x = np.arange(1.0, H + 1).reshape(1, 1, H, 1)
        w = np.random.default_rng(R).integers(1, 6, (1, 1, R, 1)).astype(float)   # exact, no zero tap
        y, _ = F.conv2d_forward(x, w, None, s, ((pt, pb), (0, 0)), d)
        assert plan.out_counts == balanced_counts(Ho, P)[0] and plan.lo[0] == 0 and plan.hi[-1] == 0
        for r in range(P):
            a, b = plan.in_rows(r)
            p, q = plan.out_rows(r)
            assert (r == 0 or plan.lo[r] <= plan.in_counts[r - 1]) and \
                   (r == P - 1 or plan.hi[r] <= plan.in_counts[r + 1])
            if q == p:
                continue
            ext = x[:, :, a - plan.lo[r]:b + plan.hi[r]]
            u0, u1 = plan.use[r]
            yl, _ = F.conv2d_forward(ext[:, :, u0:u1], w, None, s, (plan.pad[r], (0, 0)), d)
            assert np.array_equal(yl, y[:, :, p:q]), (H, R, s, d, pt, pb, P, r)
            n += 1
    assert n > 1000


def test_too_many_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="beyond its neighbours"):
        plan_rows(4, 5, 1, 2, 2, 1, 4)              # a 5-row window over 1-row bands
    with pytest.raises(ValueError, match="too small"):
        plan_rows(2, 3, 1, 0, 0, 1, 1)
    with pytest.raises(ValueError, match="in_counts"):
        plan_rows(7, 3, 1, 1, 1, 1, 2, in_counts=(3, 3))


# --------------------------------------------------------------------------- #
# the layers (MPI)
# --------------------------------------------------------------------------- #
CONV_GEOMS = {
    "same3": dict(kernel_size=3, stride=1, padding=1, dilation=1),
    "s2d2": dict(kernel_size=(3, 2), stride=2, padding=((2, 1), (1, 0)), dilation=(2, 1)),
    "k3s3-empty-band": dict(kernel_size=3, stride=3, padding=0, dilation=1),   # H=7: Ho=2
}


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom,H", [("same3", 11), ("s2d2", 11), ("k3s3-empty-band", 7)])
@pytest.mark.parametrize("reduce_grads", [True, False])
def test_spatial_conv_matches_serial(comm, dtype, geom, H, reduce_grads):
    N, C, K, W = 2, 3, 4, 5
    x = _data((N, C, H, W), dtype)
    ref = nn.Conv2d(C, K, seed=31, dtype=dtype, **CONV_GEOMS[geom])
    ref.bias.data[...] = _data((K,), dtype, seed=5)
    y_ref = ref.forward(x)
    g = _data(y_ref.shape, dtype, seed=4)
    dx_ref = ref.backward(g)
    layer = SpatialParallelConv2d(C, K, group=comm, in_height=H, seed=31, dtype=dtype, name="sc",
                                  reduce_grads=reduce_grads, **CONV_GEOMS[geom])
    layer.bias.data[...] = ref.bias.data
    xr = split_rows(x, comm)
    trace.reset()
    y = layer.forward(xr)
    dx = layer.backward(split_rows(g, comm, layer.out_counts))
    missing, extra = match_trace(layer.collectives(xr.shape), trace.events())
    bad = []
    check("W init", layer.weight.data, ref.weight.data, dtype, bad)
    check("y", y, split_rows(y_ref, comm, layer.out_counts), dtype, bad)
    check("dx", dx, split_rows(dx_ref, comm), dtype, bad)
    dW, db = layer.weight.grad, layer.bias.grad
    if not reduce_grads:                 # left to the caller: the sum over the group is the gradient
        dW, db = _summed(comm, dW), _summed(comm, db)
    check("dW", dW, ref.weight.grad, dtype, bad)
    check("db", db, ref.bias.grad, dtype, bad)
    assert layer.output_shape(xr.shape) == y.shape
    assert not bad, bad
    assert not missing and not extra, (missing, extra)


POOLS = [("max", dict(kernel_size=2), 8), ("max", dict(kernel_size=3, stride=2, padding=1), 11),
         ("avg", dict(kernel_size=3, stride=2, padding=1, count_include_pad=False), 11),
         ("avg", dict(kernel_size=(3, 2), stride=1, padding=((1, 0), (0, 0))), 9)]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,kw,H", POOLS)
def test_spatial_pool_matches_serial(comm, dtype, kind, kw, H):
    N, C, W = 2, 3, 6
    x = _data((N, C, H, W), dtype)
    x[:, :, 1::3] = x[:, :, ::3][:, :, : x[:, :, 1::3].shape[2]]   # ties across band borders
    ref = (nn.MaxPool2d if kind == "max" else nn.AvgPool2d)(**kw)
    par = (SpatialParallelMaxPool2d if kind == "max" else SpatialParallelAvgPool2d)(
        group=comm, in_height=H, name="sp", dtype=dtype, **kw)
    y_ref = ref.forward(x)
    g = _data(y_ref.shape, dtype, seed=4)
    dx_ref = ref.backward(g)
    xr = split_rows(x, comm)
    trace.reset()
    y = par.forward(xr)
    dx = par.backward(split_rows(g, comm, par.out_counts))
    missing, extra = match_trace(par.collectives(xr.shape), trace.events())
    bad = []
    check("y", y, split_rows(y_ref, comm, par.out_counts), dtype, bad)
    check("dx", dx, split_rows(dx_ref, comm), dtype, bad)
    if kw == dict(kernel_size=2) and H % (2 * comm.size) == 0:
        assert not trace.events()           # 2x2/2 on even bands: nothing crosses a border
    assert not bad, bad
    assert not missing and not extra, (missing, extra)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_spatial_chain_matches_serial(comm, dtype):
    """conv -> SyncBN(spatial group) -> ReLU -> maxpool -> conv, split by rows == serial.

    Each layer's balanced output bands are the next one's input bands (default in_counts);
    the trace of the step is the sum of the layers' descriptions.
    """
    N, C, M, K, H, W = 2, 2, 4, 3, 17, 5
    x = _data((N, C, H, W), dtype)
    rng = np.random.default_rng(0)
    ref = nn.Sequential(nn.Conv2d(C, M, 3, padding=1, rng=rng, dtype=dtype), nn.BatchNorm2d(M, dtype=dtype),
                        nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                        nn.Conv2d(M, K, 3, stride=2, padding=(0, 1), dilation=(2, 1), rng=rng, dtype=dtype))
    y_ref = ref.forward(x)
    g = _data(y_ref.shape, dtype, seed=4)
    dx_ref = ref.backward(g)
    rng = np.random.default_rng(0)
    c1 = SpatialParallelConv2d(C, M, 3, comm, H, padding=1, rng=rng, dtype=dtype, name="c1")
    pool = SpatialParallelMaxPool2d(3, comm, c1.out_height, stride=2, padding=1, dtype=dtype, name="p1")
    c2 = SpatialParallelConv2d(M, K, 3, comm, pool.out_height, stride=2, padding=(0, 1), dilation=(2, 1),
                               rng=rng, dtype=dtype, name="c2")
    par = nn.Sequential(c1, SyncBatchNorm2d(M, comm, dtype=dtype, name="bn"), nn.ReLU(), pool, c2)
    assert c1.out_counts == pool.in_counts and pool.out_counts == c2.in_counts
    xr = split_rows(x, comm)
    trace.reset()
    y = par.forward(xr)
    dx = par.backward(split_rows(g, comm, c2.out_counts))
    missing, extra = match_trace(describe_collectives(par, xr.shape), trace.events())
    bad = []
    check("y", y, split_rows(y_ref, comm, c2.out_counts), dtype, bad)
    check("dx", dx, split_rows(dx_ref, comm), dtype, bad)
    check("dW1", c1.weight.grad, ref[0].weight.grad, dtype, bad)
    check("dW2", c2.weight.grad, ref[4].weight.grad, dtype, bad)
    check("dgamma", _summed(comm, par[1].weight.grad), ref[1].weight.grad, dtype, bad)
    check("running_var", par[1].running_var, ref[1].running_var, dtype, bad)
    assert not bad, bad
    assert not missing and not extra, (missing, extra)


@pytest.mark.mpi(min_size=1)
def test_spatial_conv_first_layer_skips_the_halo_add(comm):
    """input_grad=False: no halo add in backward, only the weight-gradient allreduce."""
    x = _data((1, 2, 9, 4), np.float64)
    layer = SpatialParallelConv2d(2, 3, 3, comm, 9, padding=1, seed=2, dtype=np.float64, name="first")
    layer.input_grad = False
    ref = nn.Conv2d(2, 3, 3, padding=1, seed=2, dtype=np.float64)
    ref.forward(x)
    ref.backward(np.ones((1, 3, 9, 4)))
    xr = split_rows(x, comm)
    trace.reset()
    layer.forward(xr)
    assert layer.backward(np.ones(layer.output_shape(xr.shape))) is None
    missing, extra = match_trace(layer.collectives(xr.shape), trace.events())
    bad = []
    check("dW", layer.weight.grad, ref.weight.grad, np.float64, bad)
    assert all(e["phase"] != "first.backward" or e["op"] == "allreduce" for e in trace.events())
    assert not bad and not missing and not extra, (bad, missing, extra)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_spatial_gather_into_a_dense_head(comm, dtype):
    """conv (split rows) -> SpatialGather -> Flatten -> Linear (replicated) == serial."""
    N, C, K, H, W, F_ = 2, 2, 3, 9, 4, 5
    x = _data((N, C, H, W), dtype)
    ref = nn.Sequential(nn.Conv2d(C, K, 3, stride=2, padding=1, seed=1, dtype=dtype), nn.Flatten(),
                        nn.Linear(K * 5 * 2, F_, seed=2, dtype=dtype))
    y_ref = ref.forward(x)
    g = _data(y_ref.shape, dtype, seed=4)
    dx_ref = ref.backward(g)
    conv = SpatialParallelConv2d(C, K, 3, comm, H, stride=2, padding=1, seed=1, dtype=dtype, name="c")
    gather = SpatialGather(comm, conv.out_height, dtype=dtype, name="g")
    par = nn.Sequential(conv, gather, nn.Flatten(), nn.Linear(K * 5 * 2, F_, seed=2, dtype=dtype))
    xr = split_rows(x, comm)
    trace.reset()
    y = par.forward(xr)
    dx = par.backward(g.copy())
    missing, extra = match_trace(describe_collectives(par, xr.shape), trace.events())
    bad = []
    check("y", y, y_ref, dtype, bad)
    check("dx", dx, split_rows(dx_ref, comm), dtype, bad)
    check("dW conv", conv.weight.grad, ref[0].weight.grad, dtype, bad)
    check("dW fc", par[3].weight.grad, ref[2].weight.grad, dtype, bad)
    assert gather.output_shape(conv.output_shape(xr.shape)) == (N, K, 5, 2)
    assert not bad, bad
    assert not missing and not extra, (missing, extra)
