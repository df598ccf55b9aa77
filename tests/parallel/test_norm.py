"""Synchronised BatchNorm against the serial mpifc.nn BatchNorm on the whole batch.

The statistics group splits the batch (data parallel, uneven: 7 samples over 4
ranks is 2, 2, 2, 1; 3 samples over 4 ranks leaves a rank with none) or the image
height (spatial parallel). On a dp x tp grid the input is also channel-sharded
(2 channels over 3 ranks leaves a rank with none) and the checkpoint stores the
full logical gamma, beta and running statistics.
"""
import os
import shutil
import tempfile

import numpy as np
import pytest

from mpifc import nn
from mpifc.comm import Grid, trace, world
from mpifc.parallel import OutChannelParallelConv2d, SyncBatchNorm1d, SyncBatchNorm2d, match_trace
from parallel_helpers import block, check

DTYPES = [np.float64, np.float32]


def _data(shape, dtype, seed=3):
    # an offset mean checks the variance formula, not just a centred input
    return (np.random.default_rng(seed).standard_normal(shape) * 2.0 + 0.5).astype(dtype)


def _rows(a, axis, group):
    """This rank's balanced block of ``a`` along ``axis`` (as the data loader / spatial split)."""
    from mpifc.comm import balanced_counts

    counts = balanced_counts(a.shape[axis], group.size)[0]
    return np.ascontiguousarray(block(a, axis, counts, group.rank)), counts


def _summed(comm, v):
    """Sum of a local gradient over the group, untraced (the test's own bookkeeping)."""
    out = np.empty_like(v)
    from mpi4py import MPI
    comm.mpi.Allreduce(np.ascontiguousarray(v), out, op=MPI.SUM)
    return out


def _identical(comm, v) -> bool:
    allv = comm.mpi.allgather(np.asarray(v).tobytes())
    return all(b == allv[0] for b in allv)


CASES = [("1d", (7, 3), 0), ("1d", (3, 4), 0), ("1d", (6, 3, 5), 0),
         ("2d", (5, 3, 4, 3), 0), ("2d", (2, 3, 7, 3), 2)]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,shape,axis", CASES)
def test_sync_bn_matches_serial(comm, dtype, kind, shape, axis):
    """Two training steps (running stats evolve) then one eval step; split along ``axis``."""
    Ser, Par = (nn.BatchNorm1d, SyncBatchNorm1d) if kind == "1d" else (nn.BatchNorm2d, SyncBatchNorm2d)
    C = shape[1]
    ref = Ser(C, momentum=0.3, dtype=dtype)
    bn = Par(C, comm, momentum=0.3, dtype=dtype, name="bn")
    gamma = np.linspace(0.5, 1.5, C).astype(dtype)
    ref.weight.data[...] = bn.weight.data[...] = gamma
    bad, mism = [], []
    for step in range(3):
        if step == 2:
            ref.eval()
            bn.eval()
        x, g = _data(shape, dtype, seed=step), _data(shape, dtype, seed=10 + step)
        y_ref = ref.forward(x)
        dx_ref = ref.backward(g)
        xr, _ = _rows(x, axis, comm)
        gr, _ = _rows(g, axis, comm)
        trace.reset()
        y = bn.forward(xr)
        dx = bn.backward(gr)
        missing, extra = match_trace(bn.collectives(xr.shape), trace.events())
        mism += missing + extra
        check(f"step {step} y", y, _rows(y_ref, axis, comm)[0], dtype, bad)
        check(f"step {step} dx", dx, _rows(dx_ref, axis, comm)[0], dtype, bad)
        check(f"step {step} running_mean", bn.running_mean, ref.running_mean, dtype, bad)
        check(f"step {step} running_var", bn.running_var, ref.running_var, dtype, bad)
        if step == 2:
            assert not trace.events()                       # eval: no statistics to share
    # dgamma / dbeta are the LOCAL sums: the gradient allreduce of dp completes them
    check("dgamma", _summed(comm, bn.weight.grad), ref.weight.grad, dtype, bad)
    check("dbeta", _summed(comm, bn.bias.grad), ref.bias.grad, dtype, bad)
    same = _identical(comm, np.concatenate([bn.running_mean, bn.running_var]))
    assert int(bn.num_batches_tracked[0]) == 2
    assert not bad, bad
    assert not mism, mism
    assert same, "running statistics differ between ranks"


@pytest.mark.mpi(min_size=1)
def test_sync_bn_without_input_grad_reduces_only_forward(comm):
    x = _data((6, 4, 3, 3), np.float64)
    g = _data((6, 4, 3, 3), np.float64, seed=9)
    ref = nn.BatchNorm2d(4, dtype=np.float64)
    ref.forward(x)
    ref.backward(g)
    bn = SyncBatchNorm2d(4, comm, dtype=np.float64, name="bn0")
    bn.input_grad = False
    xr, _ = _rows(x, 0, comm)
    trace.reset()
    bn.forward(xr)
    assert bn.backward(_rows(g, 0, comm)[0]) is None
    missing, extra = match_trace(bn.collectives(xr.shape), trace.events())
    bad = []
    check("dgamma", _summed(comm, bn.weight.grad), ref.weight.grad, np.float64, bad)
    assert len(trace.events()) == (1 if comm.size > 1 else 0)
    assert not bad and not missing and not extra, (bad, missing, extra)


def _layouts(size):
    return [(d, size // d) for d in range(1, size + 1) if size % d == 0]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [5, 2])
def test_conv_sync_bn_on_grid_and_checkpoint(comm, dtype, K):
    """conv(out-channel over tp) -> SyncBN(local channels, dp) on every dp x tp layout.

    Batch split over dp, channels over tp; gamma/beta/running stats are shards with
    a Sharding and the checkpoint holds the serial (full) tensors.
    """
    from mpifc.checkpoint import save
    import h5py

    N, C, H = 5, 2, 5
    x = _data((N, C, H, H), dtype)
    ref = nn.Sequential(nn.Conv2d(C, K, 3, padding=1, seed=7, dtype=dtype), nn.BatchNorm2d(K, dtype=dtype))
    y_ref = ref.forward(x)
    g = _data(y_ref.shape, dtype, seed=4)
    dx_ref = ref.backward(g)
    tmp = comm.bcast_obj(tempfile.mkdtemp(prefix="mpifc-syncbn-") if comm.rank == 0 else None)
    try:
        for dp, tp in _layouts(comm.size):
            grid = Grid(comm, dp, tp)
            tpc, dpc = grid.tp_comm, grid.dp_comm
            conv = OutChannelParallelConv2d(C, K, 3, tpc, padding=1, seed=7, dtype=dtype, name="conv")
            bn = SyncBatchNorm2d(conv.K_r, dpc, channel_group=tpc, dtype=dtype, name="bn")
            model = nn.Sequential(conv, bn)
            xr, bcounts = _rows(x, 0, dpc)
            kc, tr = conv.out_counts, tpc.rank
            gr = np.ascontiguousarray(block(block(g, 0, bcounts, dpc.rank), 1, kc, tr))
            trace.reset()
            y = model.forward(xr)
            dx = model.backward(gr)
            want = conv.collectives(xr.shape) + bn.collectives(conv.output_shape(xr.shape))
            missing, extra = match_trace(want, trace.events())
            bad = []
            lbl = f"dp={dp} tp={tp}"
            check(f"{lbl} y", y, block(block(y_ref, 0, bcounts, dpc.rank), 1, kc, tr), dtype, bad)
            check(f"{lbl} dx", dx, block(dx_ref, 0, bcounts, dpc.rank), dtype, bad)
            check(f"{lbl} dgamma", _summed(dpc, bn.weight.grad), block(ref[1].weight.grad, 0, kc, tr),
                  dtype, bad)
            check(f"{lbl} running_var", bn.running_var, block(ref[1].running_var, 0, kc, tr), dtype, bad)
            assert bn.channel_counts == tuple(kc), (bn.channel_counts, kc)
            assert not bad, bad
            assert not missing and not extra, (lbl, missing, extra)
            # the checkpoint stores full logical tensors, whatever the layout
            path = save(os.path.join(tmp, f"{dp}x{tp}"), model, None, grid, step=1)
            if comm.rank == 0:
                with h5py.File(path, "r") as f:
                    stored = {n: f[f"buffers/1.{n}"][()] for n in ("running_mean", "running_var")}
                    stored["weight"] = f["params/0.weight"][()]
                bad = []
                check(f"{lbl} ckpt running_mean", stored["running_mean"], ref[1].running_mean, dtype, bad)
                check(f"{lbl} ckpt running_var", stored["running_var"], ref[1].running_var, dtype, bad)
                check(f"{lbl} ckpt conv weight", stored["weight"], ref[0].weight.data, dtype, bad)
                assert not bad, bad
    finally:
        comm.mpi.Barrier()
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def test_no_group_is_the_serial_batchnorm():
    """group None (or of size 1): no messages, bit for bit the serial layer."""
    c = world()
    groups = [None] + ([c] if c.size == 1 else [])
    x, g = _data((4, 3, 5, 2), np.float32), _data((4, 3, 5, 2), np.float32, seed=8)
    ref = nn.BatchNorm2d(3)
    y_ref, dx_ref = ref.forward(x), ref.backward(g)
    for grp in groups:
        bn = SyncBatchNorm2d(3, grp)
        trace.reset()
        y, dx = bn.forward(x), bn.backward(g)
        assert not trace.events() and bn.collectives(x.shape) == []
        assert np.array_equal(y, y_ref) and np.array_equal(dx, dx_ref)
        assert np.array_equal(bn.running_var, ref.running_var)
        assert bn.flops(x.shape) == (7 * x.size, 7 * x.size)


def test_bad_channel_counts_are_refused():
    c = world()
    with pytest.raises(ValueError, match="channel_counts"):
        SyncBatchNorm2d(3, None, channel_group=c, channel_counts=[2] * c.size)


def _bn_reference64(x, gamma, beta, eps=1e-5):
    """Training-mode BatchNorm in float64 with a two-pass variance (the exact answer)."""
    x = np.asarray(x, dtype=np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    view = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(view)) ** 2).mean(axis=axes)
    xhat = (x - mean.reshape(view)) / np.sqrt(var.reshape(view) + eps)
    return xhat * gamma.reshape(view) + beta.reshape(view), mean, var


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("offset", [100.0, 1e3, 1e4, -1e4])
@pytest.mark.parametrize("kind,shape,axis", [("2d", (9, 3, 4, 5), 0), ("2d", (4, 2, 7, 3), 2),
                                             ("1d", (50, 3), 0)])
def test_sync_bn_float32_offset_input_is_accurate(comm, offset, kind, shape, axis):
    """float32 inputs far from zero (|mean| >> std): the output stays within 1e-3 of the
    float64 answer (E[x^2] - mean^2 in float32 gave 2.5e-3 at 100, 0.19 at 1e3, 876 at 1e4)."""
    Par = SyncBatchNorm1d if kind == "1d" else SyncBatchNorm2d
    rng = np.random.default_rng(7)
    C = shape[1]
    x = (offset + rng.standard_normal(shape) * (1.0 + np.arange(C)).reshape((1, C) + (1,) * (len(shape) - 2))
         ).astype(np.float32)
    gamma = (1.0 + rng.standard_normal(C)).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    y64, mean64, var64 = _bn_reference64(x, gamma, beta)
    xl, counts = _rows(x, axis, comm)
    bn = Par(C, comm, dtype=np.float32)
    bn.weight.data[...], bn.bias.data[...] = gamma, beta
    y = bn.forward(xl)
    ref = np.ascontiguousarray(block(y64, axis, counts, comm.rank))
    err = float(np.abs(y - ref).max()) if y.size else 0.0
    n = x.size // C
    rv_ref = 0.9 + 0.1 * var64 * n / (n - 1)
    rm_ref = 0.1 * mean64
    ok = err <= 1e-3 and np.allclose(bn.running_var, rv_ref, rtol=1e-4) \
        and np.allclose(bn.running_mean, rm_ref, rtol=1e-5)
    print(f"{'OK ' if ok else 'BAD'} offset {offset:g}: max |y - y64| = {err:.3e}")
    assert ok, (err, bn.running_var, rv_ref, bn.running_mean, rm_ref)
