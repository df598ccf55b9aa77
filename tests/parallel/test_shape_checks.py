"""Every sharded layer checks what it is given BEFORE any message (mpifc.nn.ShapeError).

Each case gives every rank the same unfit array, so every rank raises: the test
asserts the error names the layer and the shapes, that no collective was traced
(nothing reached MPI), and that the layer still works afterwards. Ranks whose
shapes differ from each other are tested as separate jobs in
tests/parallel/test_shape_mismatch_jobs.py.
"""
import numpy as np
import pytest

from mpifc import nn
from mpifc.comm import trace
from mpifc.nn import ShapeError
from mpifc.parallel import (ColumnParallelLinear, DataParallel, InChannelParallelConv2d,
                            OutChannelParallelConv2d, ParallelSoftmaxCrossEntropy, RowParallelLinear,
                            SpatialGather, SpatialParallelConv2d, SpatialParallelMaxPool2d,
                            SyncBatchNorm1d, SyncBatchNorm2d)

f32 = np.float32


def _x(*shape, dtype=f32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def refused(fn, *words, allowed=()):
    """fn() raises ShapeError naming ``words``, before any traced collective (but those
    in the phases ``allowed``)."""
    trace.reset()
    with pytest.raises(ShapeError) as ei:
        fn()
    sent = [e for e in trace.events() if e["phase"] not in allowed]
    assert sent == [], sent
    msg = str(ei.value)
    print("refused:", msg)
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.mark.mpi(min_size=1)
def test_column_linear_refuses_before_any_message(comm):
    fc = ColumnParallelLinear(6, 5, comm, gather_output=True, seed=1, name="fc1")
    refused(lambda: fc.forward(_x(4, 7)), "fc1", "ColumnParallelLinear", "(4, 7)", "(N, ..., 6)",
            f"rank {comm.rank}")
    refused(lambda: fc.forward(_x(4, 6, dtype=np.float64)), "fc1", "float64", "float32")
    y = fc.forward(_x(4, 3, 6))
    refused(lambda: fc.backward(_x(4, 5)), "fc1", "output gradient", "(4, 5)", "(4, 3, 5)")
    refused(lambda: fc.backward(_x(4, 3, 5, dtype=np.float64)), "fc1", "float64")
    assert fc.backward(np.ones_like(y)).shape == (4, 3, 6)       # still works


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("sharded", [True, False])
def test_row_linear_refuses_before_any_message(comm, sharded):
    fc = RowParallelLinear(7, 3, comm, input_is_sharded=sharded, seed=1, name="fc2")
    D = fc.D_r if sharded else 7
    refused(lambda: fc.forward(_x(4, D + 1)), "fc2", f"(4, {D + 1})", f"(N, ..., {D})")
    y = fc.forward(_x(2, 4, D))
    refused(lambda: fc.backward(_x(2, 3)), "fc2", "output gradient", "(2, 3)", "(2, 4, 3)")
    assert fc.backward(np.ones_like(y)).shape == (2, 4, D)


@pytest.mark.mpi(min_size=1)
def test_class_parallel_loss_refuses_before_any_message(comm):
    loss = ParallelSoftmaxCrossEntropy(10, comm, name="xent")
    Q = loss.Q_r
    refused(lambda: loss.forward(_x(4, Q + 1), np.zeros(4, np.int64)), "xent", f"(4, {Q + 1})")
    refused(lambda: loss.forward(_x(4, Q), np.zeros(5, np.int64)), "xent", "target", "(5,)")
    refused(lambda: loss.forward(_x(4, Q), np.zeros(4, f32)), "xent", "target", "float32")
    assert np.isfinite(float(loss.forward(_x(4, Q), np.zeros(4, np.int64))))


@pytest.mark.mpi(min_size=1)
def test_channel_parallel_convs_refuse_before_any_message(comm):
    c1 = OutChannelParallelConv2d(3, 4, 3, comm, gather_output=False, seed=1, name="conv1")
    refused(lambda: c1.forward(_x(2, 4, 6, 6)), "conv1", "(2, 4, 6, 6)", "(N, 3, H, W)")
    refused(lambda: c1.forward(_x(2, 3, 6)), "conv1", "(2, 3, 6)")
    refused(lambda: c1.forward(_x(2, 3, 2, 6)), "conv1", "kernel", "0x4")    # 2 rows < kernel 3
    y = c1.forward(_x(2, 3, 6, 6))
    refused(lambda: c1.backward(_x(2, y.shape[1], 5, 4)), "conv1", "output gradient")
    c2 = InChannelParallelConv2d(4, 2, 1, comm, seed=2, name="conv2")
    C_r = c2.C_r
    refused(lambda: c2.forward(_x(2, C_r + 1, 4, 4)), "conv2", f"(N, {C_r}, H, W)", "of 4 input channels")
    z = c2.forward(y)
    refused(lambda: c2.backward(_x(3, 2, 4, 4)), "conv2", "output gradient", "(3, 2, 4, 4)")
    c2.backward(np.ones_like(z))
    c1.backward(np.ones_like(y))


@pytest.mark.mpi(min_size=1)
def test_sync_batchnorm_refuses_before_any_message(comm):
    bn = SyncBatchNorm2d(3, comm, name="bn1")
    refused(lambda: bn.forward(_x(2, 4, 3, 3)), "bn1", "(2, 4, 3, 3)", "C = 3")
    refused(lambda: bn.forward(_x(2, 3, 3)), "bn1", "(2, 3, 3)")
    refused(lambda: bn.forward(_x(2, 3, 3, 3, dtype=np.float64)), "bn1", "float64")
    y = bn.forward(_x(2, 3, 3, 3))
    refused(lambda: bn.backward(_x(2, 3, 3, 4)), "bn1", "output gradient", "(2, 3, 3, 4)")
    bn.backward(np.ones_like(y))
    bn1 = SyncBatchNorm1d(5, comm, name="bn2")
    refused(lambda: bn1.forward(_x(4, 6)), "bn2", "(4, 6)", "C = 5")


@pytest.mark.mpi(min_size=1)
def test_spatial_layers_refuse_before_any_message(comm):
    H = 8
    conv = SpatialParallelConv2d(2, 3, 3, comm, H, padding=1, seed=1, name="sconv")
    n_r = conv.in_counts[comm.rank]
    refused(lambda: conv.forward(_x(1, 2, n_r + 1, 5)), "sconv", f"{n_r} of {H} rows")
    refused(lambda: conv.forward(_x(1, 4, n_r, 5)), "sconv", "(N, 2, rows, W)")
    y = conv.forward(_x(1, 2, n_r, 5))
    refused(lambda: conv.backward(_x(1, 3, y.shape[2], 4)), "sconv", "output gradient")
    conv.backward(np.ones_like(y))
    pool = SpatialParallelMaxPool2d(2, comm, H, name="spool")
    refused(lambda: pool.forward(_x(1, 2, n_r + 2, 4)), "spool", f"{n_r} of {H} rows")
    gather = SpatialGather(comm, H, name="sgather")
    refused(lambda: gather.forward(_x(1, 2, n_r + 1, 4)), "sgather", f"{n_r} of {H} rows")
    g = gather.forward(_x(1, 2, n_r, 4))
    refused(lambda: gather.backward(_x(1, 2, H + 1, 4)), "sgather", "output gradient")
    assert gather.backward(np.ones_like(g)).shape == (1, 2, n_r, 4)


@pytest.mark.mpi(min_size=2)
def test_data_parallel_refuses_replicas_that_differ_on_every_rank(comm):
    """A replica built from another config (rank 1: 3 outputs, the others 2) is refused on
    every rank at construction, before the bcasts that would truncate or scramble."""
    out = 3 if comm.rank == 1 else 2
    model = nn.Sequential(nn.Linear(4, out, seed=1), nn.ReLU())
    msg = refused(lambda: DataParallel(model, comm), "DataParallel", "replicas differ", "rank 1",
                  allowed=("dp.init.check",))
    assert "(3, 4)" in msg and "(2, 4)" in msg
    # the same config everywhere still builds
    DataParallel(nn.Sequential(nn.Linear(4, 2, seed=1)), comm)

