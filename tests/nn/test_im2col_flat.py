"""The flat-shift im2col/col2im of 'same' convolutions == the per-row 2-D copies.

A stride-1 conv whose output is H x W copies each kernel offset as one shift of the
flattened plane (mpifc.nn.im2col); the 2-D path is the reference. Padding entries
of the column buffer must come out zero even when the buffer held other data, and
col2im must ignore whatever the gradient holds there.
"""
import numpy as np
import pytest

from mpifc.nn import functional as F
from mpifc.nn import hostjit, im2col
from mpifc.nn.im2col import col2im_block, im2col_block

# (R, S, padding, dilation): every one gives a 'same' output on any H x W
SAME = [(3, 3, 1, 1), (5, 5, 2, 1), (3, 3, 2, 2), (2, 2, ((0, 1), (0, 1)), 1),
        (3, 1, (1, 0), 1), (1, 3, (0, 1), 1), (3, 3, ((1, 1), (2, 0)), 1), (7, 7, 3, 1),
        (3, 3, ((2, 0), (0, 2)), 1)]
SIZES = [(16, 16), (5, 9), (1, 4), (3, 3), (2, 1)]


def _both(plan, fn):
    flat, plan.flat = plan.flat, None
    try:
        ref = fn()
    finally:
        plan.flat = flat
    return ref, fn()


@pytest.fixture(params=["numpy", "numba"])
def kernels(request, monkeypatch):
    """The flat path in NumPy, and as the compiled kernels (mpifc.nn.hostjit) on planes
    of every size (their threshold, JIT_MIN_PLANE, lowered)."""
    if request.param == "numba":
        pytest.importorskip("numba")
        monkeypatch.setattr(im2col, "JIT_MIN_PLANE", 1)
    hostjit.set_mode(request.param)
    yield request.param
    hostjit.set_mode(None)


@pytest.mark.parametrize("R,S,pad,dil", SAME)
@pytest.mark.parametrize("H,W", SIZES)
@pytest.mark.parametrize("dt", [np.float64, np.float32])
def test_flat_copies_equal_the_2d_copies(R, S, pad, dil, H, W, dt, kernels):
    rng = np.random.default_rng(R * 100 + S * 10 + H)
    x = rng.standard_normal((2, 3, H, W)).astype(dt)
    plan = F._conv_plan(x.shape, R, S, 1, pad, dil)
    assert plan.flat is not None                      # the case under test
    dcol = rng.standard_normal(plan.col_shape(2)).astype(dt)   # nonzero at padding entries too

    def unfold():
        col = np.zeros(plan.col_shape(2), dtype=dt)
        im2col_block(rng.standard_normal(x.shape).astype(dt), col, plan)   # a buffer reused:
        im2col_block(x, col, plan)                                          # stale data first
        return col

    def fold():
        dx = np.full(x.shape, np.nan, dtype=dt)
        col2im_block(dcol.copy(), dx, plan)
        return dx
    col_ref, col_flat = _both(plan, unfold)
    np.testing.assert_array_equal(col_flat, col_ref)
    dx_ref, dx_flat = _both(plan, fold)
    tol = 1e-13 if dt == np.float64 else 1e-5
    np.testing.assert_allclose(dx_flat, dx_ref, rtol=tol, atol=tol)


def test_only_same_stride_1_convs_take_the_flat_path():
    shape = (1, 2, 8, 8)
    assert F._conv_plan(shape, 3, 3, 1, 1, 1).flat is not None
    assert F._conv_plan(shape, 3, 3, 2, 1, 1).flat is None      # stride 2
    assert F._conv_plan(shape, 3, 3, 1, 0, 1).flat is None      # 'valid': 6 x 6
    assert F._conv_plan(shape, 1, 1, 1, 0, 1).flat is None      # 1x1: the columns are x


@pytest.mark.parametrize("shape", [(2, 0, 6, 7), (0, 3, 6, 7)])
def test_flat_path_with_no_channels_or_no_images(shape, kernels):
    # a rank of a channel-sharded conv may hold no input channel (2 channels, 3 ranks)
    x = np.zeros(shape)
    W = np.ones((3, shape[1], 3, 3))
    y, cache = F.conv2d_forward(x, W, None, 1, 1)
    assert y.shape == (shape[0], 3, 6, 7) and not y.any()
    dx, dW, _ = F.conv2d_backward(np.ones(y.shape), cache)
    assert dx.shape == shape and dW.shape == W.shape and not dW.any()
