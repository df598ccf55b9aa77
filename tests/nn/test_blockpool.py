"""Blocked kernels split over threads (a rank owning 2 cores) give the one-thread result."""
import threading

import numpy as np
import pytest

from mpifc.nn import blockpool
from mpifc.nn import functional as F


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr(blockpool, "width", lambda: 2)
    monkeypatch.setattr(blockpool, "MIN_SHARE_BYTES", 1)


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
    two = _conv_bn_step(x, W, b, g, be, dy)
    for a, c in zip(one, two):
        np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-12)
