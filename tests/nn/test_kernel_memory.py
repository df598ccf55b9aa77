"""What the conv and BatchNorm kernels keep for backward and the scratch they reuse.

The blocked kernels keep the forward input by reference (no column matrix, no xhat);
their scratch arrays are per-thread workspaces reused across steps; block edges do
not change the result (a tiny block size forces many blocks).
"""
import numpy as np
import pytest

from gradcheck import check_gradients
from mpifc.nn import functional as F
from mpifc.nn import im2col as I


def _kept_bytes(cache, x):
    """Bytes of the arrays in ``cache`` other than x itself (and views of nothing)."""
    total = 0
    for v in cache:
        if isinstance(v, np.ndarray) and v is not x:
            total += v.nbytes
    return total


def test_conv_keeps_no_columns():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 12, 12)).astype(np.float32)
    W = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    _, cache = F.conv2d_forward(x, W, None, 1, 1)
    assert _kept_bytes(cache, x) <= W.nbytes          # only W beside x: no (C*R*S, N*Ho*Wo) matrix


def test_batchnorm_keeps_no_normalised_copy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 16, 12, 12)).astype(np.float32)
    g, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    _, cache, _, _ = F.batchnorm_forward(x, g, b)
    assert _kept_bytes(cache, x) <= 16 * 4 * 4        # per-channel vectors only


def test_conv_scratch_is_reused_across_steps():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 9, 9))
    W = rng.standard_normal((5, 3, 3, 3))
    y, c = F.conv2d_forward(x, W, None, 1, 1)
    F.conv2d_backward(y, c)
    before = dict(I._local.buffers)
    y, c = F.conv2d_forward(x, W, None, 1, 1)
    F.conv2d_backward(y, c)
    after = I._local.buffers
    assert all(after[k] is before[k] for k in before) and len(after) == len(before)


@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 1), (2, 2, ((1, 0), (0, 2))), (3, 1, 0)])
def test_conv_and_bn_blocks_of_one_sample(monkeypatch, groups, stride, padding):
    """Forced one-sample blocks (5 samples): same values as the reference, gradients by finite differences."""
    monkeypatch.setattr(I, "COL_BLOCK_BYTES", 1)
    monkeypatch.setattr(F, "BN_BLOCK_BYTES", 1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6, 7, 6))
    W = rng.standard_normal((6, 6 // groups, 3, 3))
    b = rng.standard_normal(6)
    kw = dict(stride=stride, padding=padding, groups=groups)
    from test_functional import conv_reference
    y, _ = F.conv2d_forward(x, W, b, **kw)
    np.testing.assert_allclose(y, conv_reference(x, W, b, stride, padding, 1, groups), rtol=1e-12, atol=1e-12)

    def analytic(g):
        _, c = F.conv2d_forward(x, W, b, **kw)
        dx, dW, db = F.conv2d_backward(g, c)
        return {"x": dx, "W": dW, "b": db}
    assert check_gradients(lambda: F.conv2d_forward(x, W, b, **kw)[0], {"x": x, "W": W, "b": b},
                           analytic, label="conv blocks ") <= 1e-6
    gam, bet = rng.standard_normal(6), rng.standard_normal(6)

    def bn_analytic(g):
        _, c, _, _ = F.batchnorm_forward(x, gam, bet)
        dx, dg, db = F.batchnorm_backward(g, c)
        return {"x": dx, "gamma": dg, "beta": db}
    assert check_gradients(lambda: F.batchnorm_forward(x, gam, bet)[0],
                           {"x": x, "gamma": gam, "beta": bet}, bn_analytic, label="bn blocks ") <= 1e-6
