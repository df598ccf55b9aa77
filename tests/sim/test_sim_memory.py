"""The workload's memory model against what the real layers keep for the backward.

After a real forward (training mode) the test walks each layer's saved state (the
attributes a layer sets in forward and reads in backward: ``_cache``, ``_x``,
``_mask``, ``_y``, recursively through tuples and sub-modules) and sums the bytes of
the arrays found there, parameters and buffers left out. describe_step's ``kept``
must give the same bytes per layer (a structural check: no timing). The kernels'
reusable scratch (conv column / dcol / per-image dW blocks, the BatchNorm block) must
match the workspaces the step left behind.
"""
import numpy as np
import pytest

from mpifc.comm import Grid, world
from mpifc.config import load_config
from mpifc.nn import blockpool
from mpifc.nn import im2col as I
from mpifc.nn.module import Module
from mpifc.sim.workload import describe_step

SAVED = ("_cache", "_x", "_mask", "_y")

serial = pytest.mark.skipif(world().size != 1, reason="serial")


def _arrays(v, out):
    if isinstance(v, np.ndarray):
        out.append(v)
    elif isinstance(v, (tuple, list)):
        for e in v:
            _arrays(e, out)


def _kept_by(module, skip, out):
    for k in SAVED:
        _arrays(getattr(module, k, None), out)
    for child in vars(module).values():
        kids = child if isinstance(child, (list, tuple)) else [child]
        for c in kids:
            if isinstance(c, Module):
                _kept_by(c, skip, out)
    return out


def layer_kept_bytes(net):
    """{trace name: bytes of the distinct arrays the layer keeps} after a forward."""
    skip = {id(p.data) for p in net.parameters()}
    res = {}
    for layer, nm in zip(net.layers, net.names):
        seen, total = set(), 0
        for a in _kept_by(layer, skip, []):
            if id(a) in skip or id(a) in seen:
                continue
            seen.add(id(a))
            total += a.nbytes
        res[nm] = total
    return res


def _forward(name, rows):
    from mpifc.models import build_model

    cfg = load_config(name)
    net = build_model(cfg["model"], Grid(world(), 1, 1), seed=0)
    net.train()
    x = np.random.default_rng(0).standard_normal((rows,) + tuple(cfg["model"]["input"]))
    net.forward(x.astype(np.float32))
    return cfg, net


@serial
@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "cifar-cnn", "resnet-small"])
def test_kept_bytes_per_layer_equal_the_layers_caches(name):
    rows = 16
    cfg, net = _forward(name, rows)
    real = layer_kept_bytes(net)
    d = describe_step(cfg, 1, 1, global_batch=rows)
    pred = {nm: d.kept.get(nm, 0.0) for nm in net.names}
    assert pred == pytest.approx(real), name
    assert d.memory["activations"] >= sum(real.values())


@serial
def test_conv_keeps_its_input_not_columns():
    # digits-cnn conv2: input (b, 32, 4, 4) after pool1; its columns would be 9x that
    rows = 64
    cfg, net = _forward("digits-cnn", rows)
    d = describe_step(cfg, 1, 1, global_batch=rows)
    assert d.kept["conv2"] == rows * 32 * 4 * 4 * 4
    assert d.kept["pool1"] == rows * 32 * 4 * 4          # uint8 argmax offsets


def _same_geometry():
    """Two convs on the same (8, 8, 8) geometry with different K (one column buffer,
    two per-image dW blocks), a 1x1 conv (no columns), BN on two shapes."""
    import copy
    cfg = copy.deepcopy(load_config("digits-cnn"))
    cfg["name"] = "geometry"
    cfg["model"]["layers"] = [
        {"type": "conv2d", "out": 8, "kernel": 3, "padding": 1},
        {"type": "batchnorm2d"}, {"type": "relu"},
        {"type": "conv2d", "out": 8, "kernel": 3, "padding": 1},
        {"type": "conv2d", "out": 16, "kernel": 3, "padding": 1},
        {"type": "conv2d", "out": 16, "kernel": 1},
        {"type": "batchnorm2d"}, {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"},
        {"type": "linear", "out": 10}]
    return cfg


@serial
@pytest.mark.parametrize("name", ["digits-cnn", "cifar-cnn", "geometry"])
def test_scratch_equals_the_workspaces_a_step_leaves(name, monkeypatch):
    from mpifc.models import build_model

    monkeypatch.setattr(blockpool, "width", lambda: 1)      # one thread's set (see docs)

    rows = 64
    cfg = _same_geometry() if name == "geometry" else load_config(name)
    net = build_model(cfg["model"], Grid(world(), 1, 1), seed=0)
    net.train()
    I._local.buffers = {}                  # only this step's workspaces
    y = net.forward(np.zeros((rows,) + tuple(cfg["model"]["input"]), np.float32))
    kept = layer_kept_bytes(net)
    net.backward(np.ones_like(y))
    real = sum(a.nbytes for a in I._local.buffers.values())
    d = describe_step(cfg, 1, 1, global_batch=rows)
    assert d.memory["scratch"] == real
    assert {nm: d.kept.get(nm, 0.0) for nm in net.names} == pytest.approx(kept)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
def test_kept_bytes_per_layer_on_every_layout(name):
    """Sharded layers (column/row linear, out/in-channel conv, SyncBatchNorm): each
    rank's layers keep what describe_step says for that rank (its own shards and the
    copies a row linear / in-channel conv takes of a whole input)."""
    from mpifc.comm import balanced_counts
    from mpifc.models import build_model
    from step_oracle import grid_for

    comm = world()
    N, B = comm.size, 24
    cfg = load_config(name)
    for tp in (t for t in range(1, N + 1) if N % t == 0):
        grid = grid_for(comm, N // tp, tp)
        net = build_model(cfg["model"], grid, seed=0)
        net.train()
        counts, displs = balanced_counts(B, grid.dp)
        x = np.random.default_rng(0).standard_normal((B,) + tuple(cfg["model"]["input"]))
        x = x[displs[grid.dp_rank]:displs[grid.dp_rank] + counts[grid.dp_rank]]
        net.forward(np.ascontiguousarray(x, dtype=np.float32))
        real = layer_kept_bytes(net)
        d = describe_step(cfg, grid.dp, tp, global_batch=B, dp_rank=grid.dp_rank,
                          tp_rank=grid.tp_rank)
        assert {nm: d.kept.get(nm, 0.0) for nm in net.names} == pytest.approx(real), \
            (name, grid.dp, tp, grid.tp_rank)
