"""A BatchNorm and the ReLU after it, fused (mpifc.nn.fuse), give the unfused results.

The oracle is the same layers run one by one (``fuse.ENABLED = False``); the fused
loop must also hand the ReLU its mask, so a caller that runs the backward layer by
layer gets the same gradients.
"""
import numpy as np
import pytest

import mpifc.nn as nn
from mpifc.nn import fuse, hostjit

pytest.importorskip("numba")


def _net(dt):
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, dtype=dt), nn.BatchNorm2d(6, dtype=dt), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1, dtype=dt), nn.BatchNorm2d(4, dtype=dt),
                        nn.LeakyReLU(0.1), nn.BatchNorm2d(4, dtype=dt), nn.ReLU())
    for i, p in enumerate(net.parameters()):
        p.data[...] = np.random.default_rng(i).standard_normal(p.shape).astype(dt) * 0.5
    return net


def _step(net, x, dy, layerwise=False):
    y = net.forward(x)
    if layerwise:                      # a caller's own backward loop
        for layer in reversed(net.layers):
            dy = layer.backward(dy)
        dx = dy
    else:
        dx = net.backward(dy)
    return [y, dx] + [p.grad.copy() for p in net.parameters()] + [
        l.running_var.copy() for l in net.layers if isinstance(l, nn.BatchNorm2d)]


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("layerwise", [False, True])
def test_fused_pairs_equal_the_layers_one_by_one(monkeypatch, dt, layerwise):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 3, 8, 8)) + 3).astype(dt)
    dy = rng.standard_normal((5, 4, 4, 4)).astype(dt)
    monkeypatch.setattr(hostjit, "_state", {"mode": "numba", "mod": None})
    calls = []
    real = nn.BatchNorm2d.forward_relu
    monkeypatch.setattr(nn.BatchNorm2d, "forward_relu", lambda self, x: calls.append(1) or real(self, x))
    fused = _step(_net(dt), x, dy, layerwise)
    assert len(calls) == 2                       # bn1 + relu, bn3 + relu; not bn2 + leaky relu
    monkeypatch.setattr(fuse, "ENABLED", False)
    plain = _step(_net(dt), x, dy, layerwise)
    assert len(calls) == 2
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6 if dt == np.float32 else 1e-13, atol=1e-6)


def test_no_fusion_in_eval_mode_or_without_the_kernels(monkeypatch):
    net = _net(np.float32)
    x = np.ones((2, 3, 8, 8), np.float32)
    monkeypatch.setattr(nn.BatchNorm2d, "forward_relu", None)      # a call would fail
    net.eval()
    net.forward(x)
    net.train()
    with hostjit.using("numpy"):
        y = net.forward(x)
        net.backward(np.ones_like(y))


def test_backward_reports_each_layer_in_the_unfused_order(monkeypatch):
    """DataParallel starts its bucket allreduces from fuse.backward's on_layer: a fused
    pair reports its ReLU, then its BatchNorm, as the layer-by-layer loop did."""
    monkeypatch.setattr(hostjit, "_state", {"mode": "numba", "mod": None})
    net = _net(np.float64)
    y = net.forward(np.random.default_rng(1).standard_normal((2, 3, 8, 8)))
    seen = []
    fuse.backward(net.layers, np.ones_like(y), seen.append)
    assert seen == list(reversed(net.layers))
    assert not any(getattr(layer, "_relu_fused", False) for layer in net.layers)
