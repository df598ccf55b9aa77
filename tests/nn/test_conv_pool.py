"""A rank with several cores runs large 'same' convs on its OpenMP pool (no thread
shares): parallel compiled unfold/fold kernels and every product on oneMKL
(mpifc.nn.functional._pool_kernels). The result must be the shares' and the one-thread
result to rounding, on every geometry the flat path takes, and the path must be
taken exactly when it should."""
import numpy as np
import pytest

from mpifc.nn import blockpool, hostblas, hostjit, im2col
from mpifc.nn import functional as F
from mpifc.nn.im2col import col2im_block, col2im_planes, im2col_block, im2col_planes

pytest.importorskip("numba")

SAME = [(3, 3, 1, 1), (5, 5, 2, 1), (3, 3, 2, 2), (2, 2, ((0, 1), (0, 1)), 1),
        (3, 1, (1, 0), 1), (3, 3, ((1, 1), (2, 0)), 1), (3, 3, ((2, 0), (0, 2)), 1)]


@pytest.fixture
def kernels():
    hostjit.set_mode("numba")
    yield hostjit.kernels(np)
    hostjit.set_mode(None)


@pytest.mark.parametrize("R,S,pad,dil", SAME)
@pytest.mark.parametrize("H,W", [(16, 16), (5, 9), (1, 4), (2, 1)])
@pytest.mark.parametrize("dt", [np.float64, np.float32])
def test_plane_kernels_equal_numpys_unfold_and_fold(R, S, pad, dil, H, W, dt, kernels):
    rng = np.random.default_rng(R * 100 + S * 10 + H)
    x = rng.standard_normal((3, 2, H, W)).astype(dt)
    plan = F._conv_plan(x.shape, R, S, 1, pad, dil)
    dcol = rng.standard_normal(plan.col_shape(3)).astype(dt)   # nonzero at padding entries too
    ref, col = np.zeros(plan.col_shape(3), dt), np.zeros(plan.col_shape(3), dt)
    with hostjit.using("numpy"):
        im2col_block(x, ref, plan)
    im2col_planes(rng.standard_normal(x.shape).astype(dt), col, plan, kernels)   # stale data first
    im2col_planes(x, col, plan, kernels)
    np.testing.assert_array_equal(col, ref)
    dx_ref, dx = np.full(x.shape, np.nan, dt), np.full(x.shape, np.nan, dt)
    with hostjit.using("numpy"):
        col2im_block(dcol.copy(), dx_ref, plan)
    col2im_planes(dcol.copy(), dx, plan, kernels)
    tol = 1e-13 if dt == np.float64 else 1e-5
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol)


def _pool_ready():
    if hostblas.lib() is None:
        pytest.skip("oneMKL not installed (the mkl extra): the pool path needs it")


def _conv(x, W, b, dy, pad, groups=1):
    y, cache = F.conv2d_forward(x, W, b, 1, pad, 1, groups)
    return (y,) + tuple(F.conv2d_backward(dy, cache))


@pytest.mark.parametrize("dt,tol", [(np.float64, 1e-12), (np.float32, 2e-4)])
@pytest.mark.parametrize("N,C,K,H,groups", [(9, 8, 16, 12, 1), (5, 8, 8, 7, 2), (1, 3, 4, 5, 1)])
def test_pool_conv_equals_the_thread_shares(dt, tol, N, C, K, H, groups, kernels, monkeypatch):
    _pool_ready()
    rng = np.random.default_rng(N + C + K)
    x = rng.standard_normal((N, C, H, H)).astype(dt)
    W = rng.standard_normal((K, C // groups, 3, 3)).astype(dt)
    b = rng.standard_normal(K).astype(dt)
    dy = rng.standard_normal((N, K, H, H)).astype(dt)
    monkeypatch.setattr(blockpool, "width", lambda: 2)
    monkeypatch.setattr(blockpool, "MIN_SHARE_BYTES", 1)
    monkeypatch.setattr(im2col, "COL_BLOCK_BYTES", 4 * x[0].nbytes * 9)    # several blocks
    calls = []
    real = im2col.im2col_planes
    monkeypatch.setattr(F, "im2col_planes", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(F, "POOL_MIN_MACS", 10 ** 12)
    shares = _conv(x, W, b, dy, 1, groups)
    assert not calls                                   # above the threshold: shares
    monkeypatch.setattr(F, "POOL_MIN_MACS", 1)
    pool = _conv(x, W, b, dy, 1, groups)
    assert calls                                       # the pool path ran
    for a, c in zip(shares, pool):
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(c, a, rtol=tol, atol=tol * scale)


def test_pool_path_only_where_it_pays(kernels, monkeypatch):
    _pool_ready()
    plan = F._conv_plan((64, 32, 16, 16), 3, 3, 1, 1, 1)
    monkeypatch.setattr(blockpool, "width", lambda: 2)
    assert F._pool_kernels(plan, np, 64, 288, 256) is not None       # the classifier's 2nd conv
    assert F._pool_kernels(plan, np, 32, 27, 1024) is None           # its 1st: 0.9 M per image
    monkeypatch.setattr(blockpool, "width", lambda: 1)
    assert F._pool_kernels(plan, np, 64, 288, 256) is None           # one core: nothing to pool
    monkeypatch.setattr(blockpool, "width", lambda: 2)
    strided = F._conv_plan((64, 32, 16, 16), 3, 3, 2, 1, 1)
    assert F._pool_kernels(strided, np, 64, 288, 64) is None         # not a 'same' conv
    with hostjit.using("numpy"):
        assert F._pool_kernels(plan, np, 64, 288, 256) is None       # no compiled kernels
    with hostblas.using("numpy"):
        assert F._pool_kernels(plan, np, 64, 288, 256) is None       # no oneMKL
