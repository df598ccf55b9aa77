"""Out-channel and in-channel parallel convolutions against the serial mpifc.nn.Conv2d.

Every rank builds the same input from a seed; the serial layer (same seed) runs
locally on every rank as the reference. Channel counts are uneven on purpose: 10
over 3 ranks (4, 3, 3) and 2 over 3 or 4 ranks (an empty shard joins every
collective). Two geometries: 3x3 same-padding, and a strided, dilated kernel with
asymmetric per-side padding.
"""
import numpy as np
import pytest

from mpifc import nn
from mpifc.comm import trace, world
from mpifc.parallel import (InChannelParallelConv2d, OutChannelParallelConv2d, SyncBatchNorm2d,
                            match_trace)
from parallel_helpers import block, check

DTYPES = [np.float64, np.float32]
GEOMS = {"same": dict(kernel_size=3, stride=1, padding=1, dilation=1),
         "strided": dict(kernel_size=(3, 2), stride=2, padding=((1, 0), (2, 1)), dilation=(2, 1))}


def _data(shape, dtype, seed=3):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _serial(C, K, dtype, geom, seed):
    ref = nn.Conv2d(C, K, seed=seed, dtype=dtype, **GEOMS[geom])
    ref.bias.data[...] = _data((K,), dtype, seed=5)            # nonzero: checks its placement
    return ref


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("C,K", [(3, 10), (2, 2)])
@pytest.mark.parametrize("geom", sorted(GEOMS))
def test_out_channel_matches_serial(comm, dtype, gather, C, K, geom):
    N, H, W = 2, 7, 6
    x = _data((N, C, H, W), dtype)
    ref = _serial(C, K, dtype, geom, seed=21)
    y_ref = ref.forward(x)
    g = _data(y_ref.shape, dtype, seed=4)
    dx_ref = ref.backward(g)
    layer = OutChannelParallelConv2d(C, K, group=comm, gather_output=gather, seed=21, dtype=dtype,
                                     name="conv1", **GEOMS[geom])
    counts, r = layer.out_counts, comm.rank
    layer.bias.data[...] = block(ref.bias.data, 0, counts, r)
    trace.reset()
    y = layer.forward(x)
    gy = g if gather else np.ascontiguousarray(block(g, 1, counts, r))
    dx = layer.backward(gy)
    missing, extra = match_trace(layer.collectives(x.shape), trace.events())
    bad = []
    check("y", y, y_ref if gather else block(y_ref, 1, counts, r), dtype, bad)
    check("dx", dx, dx_ref, dtype, bad)
    check("W init", layer.weight.data, block(ref.weight.data, 0, counts, r), dtype, bad)
    check("dW", layer.weight.grad, block(ref.weight.grad, 0, counts, r), dtype, bad)
    check("db", layer.bias.grad, block(ref.bias.grad, 0, counts, r), dtype, bad)
    assert layer.output_shape(x.shape) == y.shape
    assert layer.weight.sharding.axis == 0 and layer.weight.sharding.global_shape == ref.weight.shape
    assert layer.bias.sharding.axis == 0 and layer.bias.sharding.global_shape == (K,)
    assert not bad, bad
    assert not missing and not extra, (missing, extra)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sharded_in", [True, False])
@pytest.mark.parametrize("C,K", [(10, 3), (2, 3)])
@pytest.mark.parametrize("geom", sorted(GEOMS))
def test_in_channel_matches_serial(comm, dtype, sharded_in, C, K, geom):
    N, H, W = 2, 6, 7
    x = _data((N, C, H, W), dtype)
    ref = _serial(C, K, dtype, geom, seed=22)
    y_ref = ref.forward(x)
    g = _data(y_ref.shape, dtype, seed=4)
    dx_ref = ref.backward(g)
    layer = InChannelParallelConv2d(C, K, group=comm, input_is_sharded=sharded_in, seed=22, dtype=dtype,
                                    name="conv2", **GEOMS[geom])
    counts, r = layer.in_counts, comm.rank
    layer.bias.data[...] = ref.bias.data
    xin = np.ascontiguousarray(block(x, 1, counts, r)) if sharded_in else x
    trace.reset()
    y = layer.forward(xin)
    dx = layer.backward(g.copy())
    missing, extra = match_trace(layer.collectives(xin.shape), trace.events())
    bad = []
    check("y", y, y_ref, dtype, bad)
    check("dx", dx, block(dx_ref, 1, counts, r) if sharded_in else dx_ref, dtype, bad)
    check("W init", layer.weight.data, block(ref.weight.data, 1, counts, r), dtype, bad)
    check("dW", layer.weight.grad, block(ref.weight.grad, 1, counts, r), dtype, bad)
    check("db", layer.bias.grad, ref.bias.grad, dtype, bad)
    assert layer.output_shape(xin.shape) == y.shape
    assert layer.weight.sharding.axis == 1 and layer.bias.sharding is None
    assert not bad, bad
    assert not missing and not extra, (missing, extra)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_bn_relu_pool_in_chain(comm, dtype):
    """conv(out) -> BN(local channels) -> ReLU -> maxpool -> conv(in): one message each way.

    10 channels over 3 ranks is 4, 3, 3; BatchNorm normalises each rank's block with
    the full batch (no statistics group) and its gamma/beta/running stats are shards.
    """
    N, C, M, K, H = 3, 2, 10, 3, 8
    x, rng = _data((N, C, H, H), dtype), np.random.default_rng(0)
    ref = nn.Sequential(nn.Conv2d(C, M, 3, padding=1, rng=rng, dtype=dtype), nn.BatchNorm2d(M, dtype=dtype),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(M, K, 3, rng=rng, dtype=dtype))
    y_ref = ref.forward(x)
    g = _data(y_ref.shape, dtype, seed=4)
    dx_ref = ref.backward(g)
    rng = np.random.default_rng(0)
    c1 = OutChannelParallelConv2d(C, M, 3, comm, padding=1, rng=rng, dtype=dtype, name="c1")
    bn = SyncBatchNorm2d(c1.K_r, None, channel_group=comm, channel_counts=c1.out_counts,
                         dtype=dtype, name="bn1")
    par = nn.Sequential(c1, bn, nn.ReLU(), nn.MaxPool2d(2),
                        InChannelParallelConv2d(M, K, 3, comm, rng=rng, dtype=dtype, name="c2"))
    trace.reset()
    y = par.forward(x)
    dx = par.backward(g.copy())
    ops = [(e["phase"], e["op"]) for e in trace.events()]
    counts, r = c1.out_counts, comm.rank
    bad = []
    check("y", y, y_ref, dtype, bad)
    check("dx", dx, dx_ref, dtype, bad)
    check("dW1", c1.weight.grad, block(ref[0].weight.grad, 0, counts, r), dtype, bad)
    check("dgamma", bn.weight.grad, block(ref[1].weight.grad, 0, counts, r), dtype, bad)
    check("dbeta", bn.bias.grad, block(ref[1].bias.grad, 0, counts, r), dtype, bad)
    check("running_var", bn.running_var, block(ref[1].running_var, 0, counts, r), dtype, bad)
    check("dW2", par[4].weight.grad, block(ref[4].weight.grad, 1, counts, r), dtype, bad)
    assert bn.buffer_shardings["running_mean"].global_shape == (M,)
    assert bn.weight.sharding.counts == tuple(counts) and bn.weight.sharding.group == comm.name
    assert ops == [("c2.forward", "allreduce"), ("c1.backward", "allreduce")], ops
    assert not bad, bad


@pytest.mark.mpi(min_size=1)
def test_first_layer_without_input_grad_sends_nothing_back(comm):
    """input_grad=False (the data layer): no input-gradient allreduce / allgather, dx None."""
    x = _data((2, 3, 5, 5), np.float64)
    out = OutChannelParallelConv2d(3, 5, 3, comm, seed=1, dtype=np.float64, name="a")
    inn = InChannelParallelConv2d(3, 4, 3, comm, input_is_sharded=False, seed=2, dtype=np.float64,
                                  name="b")
    out.input_grad = inn.input_grad = False
    ref = nn.Conv2d(3, 5, 3, seed=1, dtype=np.float64)
    ref.forward(x)
    ref.backward(np.ones((2, 5, 3, 3)))
    trace.reset()
    assert out.backward(np.ones((2, out.K_r, 3, 3)) if out.forward(x) is not None else None) is None
    inn.forward(x)
    assert inn.backward(np.ones((2, 4, 3, 3))) is None
    missing, extra = match_trace(out.collectives(x.shape) + inn.collectives(x.shape), trace.events())
    bad = []
    check("dW", out.weight.grad, block(ref.weight.grad, 0, out.out_counts, comm.rank), np.float64, bad)
    assert [e["op"] for e in trace.events()] == ["allreduce"]       # only b's forward
    assert not bad and not missing and not extra, (bad, missing, extra)


def test_grouped_conv_is_refused():
    """groups != 1 is not sharded: a clear error, raised before any message."""
    with pytest.raises(ValueError, match="groups=1 only"):
        OutChannelParallelConv2d(4, 4, 3, world(), groups=2)
    with pytest.raises(ValueError, match="groups=1 only"):
        InChannelParallelConv2d(4, 4, 3, world(), groups=4)


def test_description_single_rank():
    """output_shape / collectives / flops on one rank: serial shapes, no messages, conv flops."""
    c = world()
    if c.size != 1:
        pytest.skip("single-rank description")
    out = OutChannelParallelConv2d(3, 8, 3, c, stride=2, padding=1, gather_output=True, name="o")
    inn = InChannelParallelConv2d(8, 4, (3, 1), c, name="i")
    assert out.output_shape((2, 3, 9, 9)) == (2, 8, 5, 5)
    assert inn.output_shape((2, 8, 5, 5)) == (2, 4, 3, 5)
    assert out.flops((2, 3, 9, 9)) == (2 * 2 * 8 * 25 * 27, 4 * 2 * 8 * 25 * 27)
    assert [k.op for k in out.collectives((2, 3, 9, 9))] == ["allgather", "allreduce"]
    assert [k.count for k in inn.collectives((2, 8, 5, 5))] == [2 * 4 * 3 * 5]
