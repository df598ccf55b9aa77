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


@serial
def test_scratch_equals_the_workspaces_a_step_leaves():
    rows = 64
    cfg, net = _forward("digits-cnn", rows)
    I._local.buffers = {}                  # only this step's workspaces
    net.forward(np.zeros((rows, 1, 8, 8), np.float32))
    net.backward(np.ones((rows, 10), np.float32))
    real = sum(a.nbytes for a in I._local.buffers.values())
    d = describe_step(cfg, 1, 1, global_batch=rows)
    assert d.memory["scratch"] == real
