"""Blocked kernels split over threads (a rank owning 2 cores) give the one-thread result."""
import threading

import numpy as np
import pytest

from mpifc.nn import blockpool, hostjit
from mpifc.nn import functional as F


@pytest.fixture(autouse=True)
def numpy_kernels():
    """These tests are about the NumPy kernels' thread shares: no compiled kernels
    (tests/nn/test_hostjit.py checks those against these)."""
    hostjit.set_mode("numpy")
    yield
    hostjit.set_mode(None)


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr(blockpool, "width", lambda: 2)
    monkeypatch.setattr(blockpool, "MIN_SHARE_BYTES", 1)
    monkeypatch.setattr(blockpool, "PASS_MIN_SHARE_BYTES", 1)


def _conv_bn_step(x, W, b, g, be, dy):
    y, c = F.conv2d_forward(x, W, b, 1, 1)
    z, cb, mean, var = F.batchnorm_forward(y, g, be)
    dz, dg, dbe = F.batchnorm_backward(dy, cb)
    dx, dW, db = F.conv2d_backward(dz, c)
    return z, mean, var, dx, dW, db, dg, dbe


def test_shares_cover_the_samples_once(two_threads):
    assert blockpool.shares(5, 100, np) == [(0, 2), (2, 5)]
    assert blockpool.shares(1, 100, np) == [(0, 1)]
    seen = []
    out = blockpool.run(lambda i0, i1: seen.append(threading.get_ident()) or (i0, i1), [(0, 2), (2, 5)])
    assert out == [(0, 2), (2, 5)] and len(set(seen)) == 2     # two threads ran


def test_conv_and_batchnorm_on_two_threads_equal_one(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 4, 9, 8))
    W, b = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6)
    g, be = rng.standard_normal(6), rng.standard_normal(6)
    dy = rng.standard_normal((7, 6, 9, 8))
    monkeypatch.setattr(blockpool, "ENABLED", False)
    one = _conv_bn_step(x, W, b, g, be, dy)
    monkeypatch.setattr(blockpool, "ENABLED", True)
    monkeypatch.setattr(blockpool, "width", lambda: 2)
    monkeypatch.setattr(blockpool, "MIN_SHARE_BYTES", 1)
    monkeypatch.setattr(blockpool, "PASS_MIN_SHARE_BYTES", 1)
    two = _conv_bn_step(x, W, b, g, be, dy)
    for a, c in zip(one, two):
        np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(momentum=0.9), dict(momentum=0.9, weight_decay=0.01, nesterov=True),
                                dict()])
def test_sgd_chunks_on_two_threads_equal_one_thread(monkeypatch, kw):
    from mpifc.nn.module import Parameter
    from mpifc.optim import SGD
    from mpifc.optim import optimizer as O

    monkeypatch.setattr(O, "CHUNK_ELEMENTS", 7)          # many chunks, a short last one
    rng = np.random.default_rng(3)
    shapes, grads = [(5, 9), (13,), ()], []
    for _ in range(3):
        grads.append([rng.standard_normal(s) for s in shapes])

    def run():
        ps = [Parameter(np.linspace(-1, 1, max(1, int(np.prod(s)))).reshape(s), f"p{i}")
              for i, s in enumerate(shapes)]
        opt = SGD(ps, lr=0.1, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.copy()
            opt.step()
        return [p.data for p in ps]
    monkeypatch.setattr(blockpool, "ENABLED", False)
    one = run()
    monkeypatch.setattr(blockpool, "ENABLED", True)
    monkeypatch.setattr(blockpool, "width", lambda: 2)
    monkeypatch.setattr(blockpool, "MIN_SHARE_BYTES", 1)
    monkeypatch.setattr(blockpool, "PASS_MIN_SHARE_BYTES", 1)
    calls = []
    real_run = blockpool.run
    monkeypatch.setattr(blockpool, "run", lambda fn, parts: calls.append(len(parts)) or real_run(fn, parts))
    two = run()
    assert max(calls) == 2                               # the chunks were split over 2 threads
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
