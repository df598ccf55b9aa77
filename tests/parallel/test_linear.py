"""Column/row-parallel linear and the class-parallel loss against their serial twins.

Every rank builds the same input from a seed; the serial layer (mpifc.nn, same
seed) runs locally on every rank as the reference. Shapes are uneven on purpose:
10 classes and 7 features over 3 or 4 ranks, and 2 outputs over 3 or 4 ranks
(an empty shard still joins every collective).
"""
import numpy as np
import pytest

from mpifc import nn
from mpifc.comm import trace
from mpifc.parallel import ColumnParallelLinear, ParallelSoftmaxCrossEntropy, RowParallelLinear
from mpifc.parallel.describe import match_trace
from parallel_helpers import block, check

DTYPES = [np.float64, np.float32]


def _data(shape, dtype, seed=3):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("D,F", [(7, 10), (5, 2)])
def test_column_parallel_matches_serial(comm, dtype, gather, D, F):
    N = 6
    x, g = _data((N, D), dtype), _data((N, F), dtype, seed=4)
    ref = nn.Linear(D, F, seed=11, dtype=dtype)
    ref.bias.data[...] = _data((F,), dtype, seed=5)          # a nonzero bias checks its shard
    y_ref = ref.forward(x)
    dx_ref = ref.backward(g)
    layer = ColumnParallelLinear(D, F, comm, gather_output=gather, seed=11, dtype=dtype, name="fc")
    layer.bias.data[...] = block(ref.bias.data, 0, layer.out_counts, comm.rank)
    trace.reset()
    y = layer.forward(x)
    gy = g if gather else np.ascontiguousarray(block(g, 1, layer.out_counts, comm.rank))
    dx = layer.backward(gy)
    missing, extra = match_trace(layer.collectives((N, D)), trace.events())
    bad = []
    check("y", y, y_ref if gather else block(y_ref, 1, layer.out_counts, comm.rank), dtype, bad)
    check("dx", dx, dx_ref, dtype, bad)
    check("dW", layer.weight.grad, block(ref.weight.grad, 0, layer.out_counts, comm.rank), dtype, bad)
    check("db", layer.bias.grad, block(ref.bias.grad, 0, layer.out_counts, comm.rank), dtype, bad)
    check("W init", layer.weight.data, block(ref.weight.data, 0, layer.out_counts, comm.rank), dtype, bad)
    assert layer.weight.sharding.global_shape == (F, D) and layer.weight.sharding.axis == 0
    assert not bad, bad
    assert not missing and not extra, (missing, extra)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sharded_in", [True, False])
@pytest.mark.parametrize("D,F", [(7, 10), (2, 3)])
def test_row_parallel_matches_serial(comm, dtype, sharded_in, D, F):
    N = 5
    x, g = _data((N, D), dtype), _data((N, F), dtype, seed=4)
    ref = nn.Linear(D, F, seed=12, dtype=dtype)
    ref.bias.data[...] = _data((F,), dtype, seed=5)
    y_ref = ref.forward(x)
    dx_ref = ref.backward(g)
    layer = RowParallelLinear(D, F, comm, input_is_sharded=sharded_in, seed=12, dtype=dtype, name="fc2")
    layer.bias.data[...] = ref.bias.data
    xin = np.ascontiguousarray(block(x, 1, layer.in_counts, comm.rank)) if sharded_in else x
    trace.reset()
    y = layer.forward(xin)
    dx = layer.backward(g.copy())
    missing, extra = match_trace(layer.collectives(xin.shape), trace.events())
    bad = []
    check("y", y, y_ref, dtype, bad)
    check("dx", dx, block(dx_ref, 1, layer.in_counts, comm.rank) if sharded_in else dx_ref, dtype, bad)
    check("dW", layer.weight.grad, block(ref.weight.grad, 1, layer.in_counts, comm.rank), dtype, bad)
    check("db", layer.bias.grad, ref.bias.grad, dtype, bad)
    assert layer.weight.sharding.axis == 1 and layer.bias.sharding is None
    assert not bad, bad
    assert not missing and not extra, (missing, extra)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_then_row_needs_no_gather(comm, dtype):
    """fc1 (column) -> ReLU -> fc2 (row): one forward allreduce, one backward allreduce."""
    N, D, H, F = 4, 6, 1000, 3     # 1000 features over 3 ranks: 334, 333, 333
    x, g = _data((N, D), dtype), _data((N, F), dtype, seed=4)
    rng = np.random.default_rng(0)
    ref = nn.Sequential(nn.Linear(D, H, rng=rng, dtype=dtype), nn.ReLU(), nn.Linear(H, F, rng=rng, dtype=dtype))
    y_ref = ref.forward(x)
    dx_ref = ref.backward(g)
    rng = np.random.default_rng(0)
    par = nn.Sequential(ColumnParallelLinear(D, H, comm, rng=rng, dtype=dtype, name="fc1"), nn.ReLU(),
                        RowParallelLinear(H, F, comm, rng=rng, dtype=dtype, name="fc2"))
    trace.reset()
    y = par.forward(x)
    dx = par.backward(g.copy())
    ops = [(e["phase"], e["op"]) for e in trace.events()]
    bad = []
    check("y", y, y_ref, dtype, bad)
    check("dx", dx, dx_ref, dtype, bad)
    counts = par[0].out_counts
    check("dW1", par[0].weight.grad, block(ref[0].weight.grad, 0, counts, comm.rank), dtype, bad)
    check("dW2", par[2].weight.grad, block(ref[2].weight.grad, 1, counts, comm.rank), dtype, bad)
    assert ops == [("fc2.forward", "allreduce"), ("fc1.backward", "allreduce")], ops
    assert not bad, bad


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Q", [10, 2])
def test_class_parallel_loss_and_accuracy(comm, dtype, Q):
    N = 9
    rng = np.random.default_rng(8)
    z = rng.standard_normal((N, Q)).astype(dtype)
    z[0, :] = 1.0                                   # a tie: argmax must pick the first class
    t = rng.integers(0, Q, N)
    ref = nn.SoftmaxCrossEntropy()
    l_ref = ref.forward(z, t)
    d_ref = ref.backward()
    acc_ref = int((z.argmax(1) == t).sum())
    loss = ParallelSoftmaxCrossEntropy(Q, comm, dtype=dtype)
    zl = np.ascontiguousarray(block(z, 1, loss.counts, comm.rank))
    trace.reset()
    l = loss.forward(zl, t)
    correct = loss.correct()
    d = loss.backward()
    missing, extra = match_trace(loss.collectives(zl.shape, accuracy=True), trace.events())
    bad = []
    check("loss", np.asarray(l), np.asarray(l_ref), dtype, bad)
    check("dlogits", d, block(d_ref, 1, loss.counts, comm.rank), dtype, bad)
    assert correct == acc_ref, (correct, acc_ref)
    assert not bad, bad
    assert not missing and not extra, (missing, extra)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("D,F", [(7, 10), (5, 2)])
def test_column_parallel_sequence_input_matches_serial(comm, dtype, gather, D, F):
    """(N, T, D) input: the gathered axis is the last (features), not axis 1 (time)."""
    N, T = 3, 4
    x, g = _data((N, T, D), dtype), _data((N, T, F), dtype, seed=4)
    ref = nn.Linear(D, F, seed=11, dtype=dtype)
    ref.bias.data[...] = _data((F,), dtype, seed=5)
    y_ref = ref.forward(x)
    dx_ref = ref.backward(g)
    layer = ColumnParallelLinear(D, F, comm, gather_output=gather, seed=11, dtype=dtype, name="fc")
    layer.bias.data[...] = block(ref.bias.data, 0, layer.out_counts, comm.rank)
    trace.reset()
    y = layer.forward(x)
    gy = g if gather else np.ascontiguousarray(block(g, 2, layer.out_counts, comm.rank))
    dx = layer.backward(gy)
    missing, extra = match_trace(layer.collectives((N, T, D)), trace.events())
    bad = []
    check("y", y, y_ref if gather else block(y_ref, 2, layer.out_counts, comm.rank), dtype, bad)
    check("dx", dx, dx_ref, dtype, bad)
    check("dW", layer.weight.grad, block(ref.weight.grad, 0, layer.out_counts, comm.rank), dtype, bad)
    check("db", layer.bias.grad, block(ref.bias.grad, 0, layer.out_counts, comm.rank), dtype, bad)
    assert layer.output_shape((N, T, D)) == y.shape
    assert not bad, bad
    assert not missing and not extra, (missing, extra)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sharded_in", [True, False])
@pytest.mark.parametrize("D,F", [(7, 10), (2, 3)])
def test_row_parallel_sequence_input_matches_serial(comm, dtype, sharded_in, D, F):
    """(N, T, D) input: the input gradient is gathered on the last axis."""
    N, T = 2, 5
    x, g = _data((N, T, D), dtype), _data((N, T, F), dtype, seed=4)
    ref = nn.Linear(D, F, seed=12, dtype=dtype)
    ref.bias.data[...] = _data((F,), dtype, seed=5)
    y_ref = ref.forward(x)
    dx_ref = ref.backward(g)
    layer = RowParallelLinear(D, F, comm, input_is_sharded=sharded_in, seed=12, dtype=dtype, name="fc2")
    layer.bias.data[...] = ref.bias.data
    xin = np.ascontiguousarray(block(x, 2, layer.in_counts, comm.rank)) if sharded_in else x
    trace.reset()
    y = layer.forward(xin)
    dx = layer.backward(g.copy())
    missing, extra = match_trace(layer.collectives(xin.shape), trace.events())
    bad = []
    check("y", y, y_ref, dtype, bad)
    check("dx", dx, block(dx_ref, 2, layer.in_counts, comm.rank) if sharded_in else dx_ref, dtype, bad)
    check("dW", layer.weight.grad, block(ref.weight.grad, 1, layer.in_counts, comm.rank), dtype, bad)
    check("db", layer.bias.grad, ref.bias.grad, dtype, bad)
    assert not bad, bad
    assert not missing and not extra, (missing, extra)
