"""Finite-difference checks (float64) of every pure forward/backward pair, plus references.

Shapes are small and odd on purpose; conv and pool cases cover stride, dilation,
groups and asymmetric per-side padding.
"""
import numpy as np
import pytest

from gradcheck import check_gradients
from mpifc.backend import available_backends, backend_module, to_host
from mpifc.nn import functional as F

TOL = 1e-6


@pytest.fixture(params=available_backends())
def xp(request):
    return backend_module(request.param)


def randn(xp, rng, *shape):
    return xp.asarray(rng.standard_normal(shape))


def conv_reference(x, W, b, stride, padding, dilation, groups):
    """Direct (loop over output pixels) convolution on the host, for value checks only."""
    x, W = to_host(x), to_host(W)
    (t, bo), (l, r) = F.normalize_padding(padding)
    sh, sw = F._pair(stride)
    dh, dw = F._pair(dilation)
    xp_ = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    N, C, H, Wd = xp_.shape
    K, Cg, R, S = W.shape
    Ho = (H - dh * (R - 1) - 1) // sh + 1
    Wo = (Wd - dw * (S - 1) - 1) // sw + 1
    y = np.zeros((N, K, Ho, Wo))
    Kg = K // groups
    for k in range(K):
        g = k // Kg
        for i in range(Ho):
            for j in range(Wo):
                patch = xp_[:, g * Cg:(g + 1) * Cg, i * sh:i * sh + dh * (R - 1) + 1:dh,
                            j * sw:j * sw + dw * (S - 1) + 1:dw]
                y[:, k, i, j] = (patch * W[k]).sum(axis=(1, 2, 3))
    if b is not None:
        y += to_host(b)[None, :, None, None]
    return y


CONV_CASES = [
    # (N, C, H, W, K, R, S, stride, padding, dilation, groups)
    (2, 3, 5, 6, 4, 3, 3, 1, 1, 1, 1),
    (1, 2, 7, 5, 3, 3, 2, (2, 1), ((1, 0), (2, 1)), (1, 2), 1),
    (2, 4, 6, 7, 6, 3, 3, 2, 0, 1, 2),
    (1, 4, 5, 5, 4, 1, 1, 1, 0, 1, 4),            # depthwise 1x1
    (2, 3, 9, 8, 2, 3, 3, 3, ((0, 2), (1, 0)), 2, 1),
    (1, 2, 4, 4, 3, 4, 4, 1, ((2, 1), (0, 3)), 1, 1),  # kernel as large as the input
    (3, 1, 5, 3, 2, 2, 3, (1, 2), 0, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"conv{i}" for i in range(len(CONV_CASES))])
def test_conv2d_gradcheck_and_reference(xp, case):
    N, C, H, Wd, K, R, S, stride, padding, dilation, groups = case
    rng = np.random.default_rng(1)
    x = randn(xp, rng, N, C, H, Wd)
    W = randn(xp, rng, K, C // groups, R, S)
    b = randn(xp, rng, K)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y, _ = F.conv2d_forward(x, W, b, **kw)
    ref = conv_reference(x, W, b, stride, padding, dilation, groups)
    np.testing.assert_allclose(to_host(y), ref, rtol=1e-12, atol=1e-12)

    def analytic(g):
        _, c = F.conv2d_forward(x, W, b, **kw)
        dx, dW, db = F.conv2d_backward(g, c)
        return {"x": dx, "W": dW, "b": db}
    err = check_gradients(lambda: F.conv2d_forward(x, W, b, **kw)[0], {"x": x, "W": W, "b": b},
                          analytic, label="conv ")
    assert err <= TOL


def test_conv2d_skip_dx_and_bias(xp):
    rng = np.random.default_rng(2)
    x, W = randn(xp, rng, 2, 3, 5, 5), randn(xp, rng, 4, 3, 3, 3)
    y, c = F.conv2d_forward(x, W, None, padding=1)
    dx, dW, db = F.conv2d_backward(xp.ones_like(y), c, need_dx=False, need_db=False)
    assert dx is None and db is None and dW.shape == W.shape


def test_conv2d_rejects_bad_groups_and_tiny_input(xp):
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="groups"):
        F.conv2d_forward(randn(xp, rng, 1, 3, 5, 5), randn(xp, rng, 4, 1, 3, 3), groups=2)
    with pytest.raises(ValueError, match="too small"):
        F.conv2d_forward(randn(xp, rng, 1, 1, 2, 2), randn(xp, rng, 1, 1, 3, 3))


def test_im2col_col2im_adjoint(xp):
    """<im2col(x), c> == <x, col2im(c)>: col2im is the adjoint the backward relies on."""
    rng = np.random.default_rng(4)
    x = randn(xp, rng, 2, 3, 7, 6)
    kw = dict(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2))
    col, _ = F.im2col(x, 3, 2, **kw)
    c = randn(xp, rng, *col.shape)
    lhs = float((col * c).sum())
    rhs = float((x * F.col2im(c, x.shape, 3, 2, **kw)).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


POOL_CASES = [
    # (H, W, kernel, stride, padding)
    (6, 6, 2, None, 0),
    (7, 5, 3, 2, 1),
    (5, 7, (2, 3), (1, 2), ((1, 0), (0, 1))),
    (4, 4, 3, 1, ((0, 2), (1, 1))),
    (9, 8, 3, 3, 0),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[f"pool{i}" for i in range(len(POOL_CASES))])
@pytest.mark.parametrize("kind", ["max", "avg", "avg_nopad"])
def test_pool_gradcheck(xp, case, kind):
    H, Wd, k, s, p = case
    rng = np.random.default_rng(5)
    # distinct values so no max ties (ties make the max non-differentiable)
    x = xp.asarray(rng.permutation(2 * 3 * H * Wd).reshape(2, 3, H, Wd) / 7.0)
    if kind == "max":
        fwd = lambda: F.maxpool2d_forward(x, k, s, p)  # noqa: E731
        bwd = F.maxpool2d_backward
    else:
        cip = kind == "avg"
        fwd = lambda: F.avgpool2d_forward(x, k, s, p, count_include_pad=cip)  # noqa: E731
        bwd = F.avgpool2d_backward
    err = check_gradients(lambda: fwd()[0], {"x": x}, lambda g: {"x": bwd(g, fwd()[1])},
                          label=f"{kind}pool ")
    assert err <= TOL


def test_pool_values(xp):
    x = xp.asarray(np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4))
    y, _ = F.maxpool2d_forward(x, 2)
    np.testing.assert_array_equal(to_host(y)[0, 0], [[5, 7], [13, 15]])
    y, _ = F.avgpool2d_forward(x, 2)
    np.testing.assert_array_equal(to_host(y)[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    # corner window with padding 1: includes pad zeros unless count_include_pad=False
    y, _ = F.avgpool2d_forward(x, 2, 2, 1)
    assert float(y[0, 0, 0, 0]) == 0.0 / 4
    y, _ = F.avgpool2d_forward(x + 1, 2, 2, 1, count_include_pad=False)
    assert float(y[0, 0, 0, 0]) == 1.0
    y, _ = F.maxpool2d_forward(-x - 1, 2, 2, 1)       # padding never wins a max
    assert float(y[0, 0, 0, 0]) == -1.0


def test_global_avgpool_gradcheck(xp):
    rng = np.random.default_rng(6)
    x = randn(xp, rng, 2, 3, 3, 5)
    err = check_gradients(lambda: F.global_avgpool2d_forward(x), {"x": x},
                          lambda g: {"x": F.global_avgpool2d_backward(g, x.shape)})
    assert err <= TOL


def test_linear_gradcheck(xp):
    rng = np.random.default_rng(7)
    x, W, b = randn(xp, rng, 5, 7), randn(xp, rng, 3, 7), randn(xp, rng, 3)

    def analytic(g):
        dx, dW, db = F.linear_backward(g, x, W)
        return {"x": dx, "W": dW, "b": db}
    assert check_gradients(lambda: F.linear_forward(x, W, b), {"x": x, "W": W, "b": b},
                           analytic, label="linear ") <= TOL


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 4, 5)])
def test_batchnorm_gradcheck(xp, shape):
    rng = np.random.default_rng(8)
    x = randn(xp, rng, *shape) * 3 + 1
    gamma, beta = randn(xp, rng, shape[1]), randn(xp, rng, shape[1])

    def analytic(g):
        _, c, _, _ = F.batchnorm_forward(x, gamma, beta)
        dx, dg, db = F.batchnorm_backward(g, c)
        return {"x": dx, "gamma": dg, "beta": db}
    err = check_gradients(lambda: F.batchnorm_forward(x, gamma, beta)[0],
                          {"x": x, "gamma": gamma, "beta": beta}, analytic, label="bn ")
    assert err <= TOL


def test_batchnorm_split_stats_equal_whole(xp):
    """Summing the stats of two halves (what a synced BN allreduces) equals the whole batch."""
    rng = np.random.default_rng(9)
    x = randn(xp, rng, 6, 4, 3, 3)
    gamma, beta = randn(xp, rng, 4), randn(xp, rng, 4)
    y, c, mean, var = F.batchnorm_forward(x, gamma, beta)
    np.testing.assert_allclose(to_host(mean), to_host(x.mean(axis=(0, 2, 3))), rtol=1e-12)
    np.testing.assert_allclose(to_host(var), to_host(x.var(axis=(0, 2, 3))), rtol=1e-10)
    parts = [F.batchnorm_stats(x[:2]), F.batchnorm_stats(x[2:])]
    sums = [F.batchnorm_moments_to_sums(*p) for p in parts]
    s = sums[0][0] + sums[1][0]
    ss = sums[0][1] + sums[1][1]
    n = parts[0][2] + parts[1][2]
    mean_m, m2_m = F.batchnorm_sums_to_moments(s, ss, n)
    ys, cs = [], []
    for xs in (x[:2], x[2:]):
        yi, ci, _, _ = F.batchnorm_forward_from_stats(xs, gamma, beta, mean_m, m2_m, n)
        ys.append(yi)
        cs.append(ci)
    np.testing.assert_allclose(to_host(xp.concatenate(ys)), to_host(y), rtol=1e-10, atol=1e-12)
    dy = randn(xp, rng, *x.shape)
    dx, _, _ = F.batchnorm_backward(dy, c)
    bs = [F.batchnorm_backward_stats(dy[:2], cs[0]), F.batchnorm_backward_stats(dy[2:], cs[1])]
    sdy, sdyx = bs[0][0] + bs[1][0], bs[0][1] + bs[1][1]
    dxs = [F.batchnorm_backward_from_stats(dy[:2], cs[0], sdy, sdyx, n),
           F.batchnorm_backward_from_stats(dy[2:], cs[1], sdy, sdyx, n)]
    np.testing.assert_allclose(to_host(xp.concatenate(dxs)), to_host(dx), rtol=1e-9, atol=1e-12)


def test_batchnorm_eval_gradcheck(xp):
    rng = np.random.default_rng(10)
    x = randn(xp, rng, 3, 4, 2, 3)
    gamma, beta = randn(xp, rng, 4), randn(xp, rng, 4)
    rm, rv = randn(xp, rng, 4), xp.asarray(rng.uniform(0.5, 2, 4))

    def analytic(g):
        _, c = F.batchnorm_forward_eval(x, gamma, beta, rm, rv)
        dx, dg, db = F.batchnorm_backward_eval(g, c)
        return {"x": dx, "gamma": dg, "beta": db}
    err = check_gradients(lambda: F.batchnorm_forward_eval(x, gamma, beta, rm, rv)[0],
                          {"x": x, "gamma": gamma, "beta": beta}, analytic, label="bn-eval ")
    assert err <= TOL


@pytest.mark.parametrize("shape,n_axes", [((4, 7), 1), ((2, 3, 5), 1), ((2, 3, 4), 2)])
def test_layernorm_gradcheck(xp, shape, n_axes):
    rng = np.random.default_rng(11)
    x = randn(xp, rng, *shape)
    gamma, beta = randn(xp, rng, *shape[-n_axes:]), randn(xp, rng, *shape[-n_axes:])

    def analytic(g):
        _, c = F.layernorm_forward(x, gamma, beta, n_axes)
        return dict(zip(("x", "gamma", "beta"), F.layernorm_backward(g, c)))
    err = check_gradients(lambda: F.layernorm_forward(x, gamma, beta, n_axes)[0],
                          {"x": x, "gamma": gamma, "beta": beta}, analytic, label="ln ")
    assert err <= TOL


ACTS = {
    "relu": (F.relu_forward, F.relu_backward),
    "leaky_relu": (lambda x: F.leaky_relu_forward(x, 0.2), lambda d, c: F.leaky_relu_backward(d, c, 0.2)),
    "gelu": (F.gelu_forward, F.gelu_backward),
    "tanh": (F.tanh_forward, F.tanh_backward),
    "sigmoid": (F.sigmoid_forward, F.sigmoid_backward),
}


@pytest.mark.parametrize("name", sorted(ACTS))
def test_activation_gradcheck(xp, name):
    fwd, bwd = ACTS[name]
    rng = np.random.default_rng(12)
    x = randn(xp, rng, 3, 5, 2)
    x[xp.abs(x) < 1e-3] = 0.5            # keep away from the ReLU kink
    err = check_gradients(lambda: fwd(x)[0], {"x": x}, lambda g: {"x": bwd(g, fwd(x)[1])}, label=name + " ")
    assert err <= TOL


def test_activation_values(xp):
    x = xp.asarray([-1000.0, -1.0, 0.0, 2.0, 1000.0])
    with np.errstate(over="ignore"):       # the reference overflows to inf (fine: 1/inf = 0)
        ref = 1 / (1 + np.exp(-to_host(x)))
    np.testing.assert_allclose(to_host(F.sigmoid_forward(x)[0]), ref, rtol=1e-12)
    g = to_host(F.gelu_forward(xp.asarray([-3.0, 0.0, 1.0]))[0])
    np.testing.assert_allclose(g, [-0.0036373920817729943, 0.0, 0.8411919906082768], rtol=1e-12)


def test_dropout_mask_scaling_and_grad(xp):
    rng_cls = np.random.default_rng if xp is np else xp.random.default_rng
    x = xp.ones((200, 50))
    y, mask = F.dropout_forward(x, 0.3, rng_cls(0))
    kept = to_host(y != 0)
    assert abs(kept.mean() - 0.7) < 0.02
    np.testing.assert_allclose(to_host(y)[kept], 1 / 0.7)
    dy = xp.asarray(np.random.default_rng(1).standard_normal((200, 50)))
    np.testing.assert_array_equal(to_host(F.dropout_backward(dy, mask)), to_host(dy * mask))
    y2, _ = F.dropout_forward(x, 0.3, rng_cls(0))
    np.testing.assert_array_equal(to_host(y), to_host(y2))           # seeded: same mask


def test_embedding_gradcheck(xp):
    rng = np.random.default_rng(13)
    E = randn(xp, rng, 6, 3)
    idx = xp.asarray([[0, 5, 5], [2, 0, 1]])
    err = check_gradients(lambda: F.embedding_forward(idx, E), {"E": E},
                          lambda g: {"E": F.embedding_backward(g, idx, 6)})
    assert err <= TOL


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("form", ["offsets", "padded"])
def test_embedding_bag_gradcheck_and_values(xp, mode, form):
    rng = np.random.default_rng(14)
    E = randn(xp, rng, 7, 4)
    bags = [[1, 2, 2], [], [6], [0, 3, 4, 5]]          # includes an empty bag
    if form == "offsets":
        idx = xp.asarray(sum(bags, []))
        offsets = xp.asarray(np.cumsum([0] + [len(b) for b in bags[:-1]]))
        mask = None
    else:
        L = max(len(b) for b in bags)
        idx = xp.asarray([b + [0] * (L - len(b)) for b in bags])
        mask = xp.asarray([[1] * len(b) + [0] * (L - len(b)) for b in bags], dtype=bool)
        offsets = None
    y, _ = F.embedding_bag_forward(E, idx, offsets, mask, mode)
    Eh = to_host(E)
    ref = np.stack([Eh[b].sum(0) / (max(len(b), 1) if mode == "mean" else 1) if b else np.zeros(4)
                    for b in bags])
    np.testing.assert_allclose(to_host(y), ref, rtol=1e-12, atol=1e-15)

    def analytic(g):
        _, c = F.embedding_bag_forward(E, idx, offsets, mask, mode)
        return {"E": F.embedding_bag_backward(g, c)}
    err = check_gradients(lambda: F.embedding_bag_forward(E, idx, offsets, mask, mode)[0], {"E": E},
                          analytic, label=f"bag-{form}-{mode} ")
    assert err <= TOL


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_cross_entropy_gradcheck(xp, smoothing):
    rng = np.random.default_rng(15)
    z = randn(xp, rng, 6, 5) * 3
    t = xp.asarray([0, 4, -100, 2, 2, 1])
    f = lambda: F.softmax_cross_entropy_forward(z, t, smoothing)  # noqa: E731
    err = check_gradients(lambda: f()[0], {"z": z},
                          lambda g: {"z": F.softmax_cross_entropy_backward(f()[1], g)}, label="ce ")
    assert err <= TOL


def test_cross_entropy_values(xp):
    z = xp.asarray([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0]])
    t = xp.asarray([0, 2, -1])
    loss, _ = F.softmax_cross_entropy_forward(z, t, ignore_index=-1)
    assert np.isfinite(float(loss))                       # stable for huge logits
    np.testing.assert_allclose(float(loss), (0.0 + np.log(3.0)) / 2, rtol=1e-12)
    # label smoothing: reference -(sum_q q log p) with q = (1-e) onehot + e/Q
    zh = np.array([[0.5, -1.0, 2.0]])
    lp = zh - zh.max() - np.log(np.exp(zh - zh.max()).sum())
    q = 0.9 * np.eye(3)[[1]] + 0.1 / 3
    loss, _ = F.softmax_cross_entropy_forward(xp.asarray(zh), xp.asarray([1]), 0.1)
    np.testing.assert_allclose(float(loss), -(q * lp).sum(), rtol=1e-12)
    loss, c = F.softmax_cross_entropy_forward(z, xp.asarray([-100, -100, -100]))
    assert float(loss) == 0.0 and float(xp.abs(F.softmax_cross_entropy_backward(c)).max()) == 0.0
    if xp is np:
        with pytest.raises(ValueError):
            F.softmax_cross_entropy_forward(z, xp.asarray([0, 3, 1]))
    else:       # on a device: no host read per call; a NaN loss instead
        loss, _ = F.softmax_cross_entropy_forward(z, xp.asarray([0, 3, 1]))
        assert np.isnan(float(loss))


def test_mse_gradcheck(xp):
    rng = np.random.default_rng(16)
    p, t = randn(xp, rng, 4, 3), randn(xp, rng, 4, 3)
    err = check_gradients(lambda: F.mse_forward(p, t)[0], {"p": p},
                          lambda g: {"p": F.mse_backward(F.mse_forward(p, t)[1], g)})
    assert err <= TOL


def _sigmoid_exact(x):
    """Logistic function in long double: 1/(1+exp(-x)) for x >= 0, exp(x)/(1+exp(x)) below."""
    x = np.asarray(x, dtype=np.longdouble)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-14)])
def test_sigmoid_relative_error_over_the_whole_range(xp, dtype, tol):
    """Relative error of sigmoid and of its derivative on [-80, 80]: 0.5*(1+tanh(x/2))
    returned exactly 0 below x ~ -37 (relative error 1 there, 1.7e-4 at -30)."""
    x = np.linspace(-80, 80, 1601).astype(dtype)
    y, cache = F.sigmoid_forward(xp.asarray(x))
    dx = F.sigmoid_backward(xp.ones(x.shape, dtype=dtype), cache)
    s = _sigmoid_exact(x)
    ds = s * _sigmoid_exact(-x.astype(np.longdouble))
    y, dx = to_host(y), to_host(dx)
    assert y.dtype == dtype and dx.dtype == dtype
    ey = float(np.max(np.abs(y - s) / s))
    ed = float(np.max(np.abs(dx - ds) / ds))
    assert ey <= tol and ed <= 4 * tol, (ey, ed)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 5e-5), (np.float64, 1e-13)])
def test_gelu_relative_error_in_the_left_tail(xp, dtype, tol):
    """GELU (tanh form) = x * sigmoid(2u): 0.5*x*(1 + tanh(u)) was exactly 0 below x ~ -5.5
    in float32 (-9.5 in float64) though the true value is ~1e-20 there. The tolerance is
    the conditioning of u itself: a rounding of u moves sigmoid(2u) by |2u| ulps."""
    x = np.linspace(-12, 6, 361).astype(dtype)
    x = x[x != 0]
    y, cache = F.gelu_forward(xp.asarray(x))
    dx = F.gelu_backward(xp.ones(x.shape, dtype=dtype), cache)
    xl = x.astype(np.longdouble)
    c = np.sqrt(np.longdouble(2) / np.pi)
    u = c * (xl + np.longdouble(0.044715) * xl ** 3)
    s = _sigmoid_exact(2 * u)
    ref = xl * s
    dref = s + xl * 2 * s * _sigmoid_exact(-2 * u) * c * (1 + 3 * np.longdouble(0.044715) * xl * xl)
    y, dx = to_host(y), to_host(dx)
    tiny = np.finfo(dtype).tiny                 # below it the true value is not representable
    ky, kd = np.abs(ref) > tiny, np.abs(dref) > tiny
    assert ky[0] or dtype == np.float32          # float64 reaches the end of the range
    ey = float(np.max(np.abs(y - ref)[ky] / np.abs(ref[ky])))
    ed = float(np.max(np.abs(dx - dref)[kd] / np.abs(dref[kd])))
    assert ey <= tol and ed <= 10 * tol, (ey, ed)


@pytest.mark.parametrize("k,s,p", [(2, None, 0), ((3, 2), None, 0), ((2, 3), None, 0), (2, 1, 0),
                                   (3, 2, 1)])
def test_maxpool_ties_go_to_the_first_maximum(xp, k, s, p):
    """With many tied values, dy reaches the first maximum of each window in raster order
    (the two-stage path for tiling windows and the generic loop agree with a reference)."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, size=(2, 3, 7, 8)).astype(np.float64)
    y, c = F.maxpool2d_forward(xp.asarray(x), k, s, p)
    dy = rng.standard_normal(y.shape) + 2.0
    dx = to_host(F.maxpool2d_backward(xp.asarray(dy), c))
    R, S = F._pair(k)
    sh, sw = F._pair(s if s is not None else k)
    (t, _), (l, _) = F.normalize_padding(p)
    xpad = np.pad(x, ((0, 0), (0, 0), (t, t), (l, l)), constant_values=-np.inf)
    ref_y, ref_dx = np.empty(y.shape), np.zeros_like(xpad)
    for n, ch, i, j in np.ndindex(*y.shape):
        win = xpad[n, ch, i * sh:i * sh + R, j * sw:j * sw + S]
        a = int(np.argmax(win))                     # first maximum in raster order
        ref_y[n, ch, i, j] = win.flat[a]
        ref_dx[n, ch, i * sh + a // S, j * sw + a % S] += dy[n, ch, i, j]
    np.testing.assert_array_equal(to_host(y), ref_y)
    np.testing.assert_allclose(dx, ref_dx[:, :, t:t + x.shape[2], l:l + x.shape[3]], rtol=1e-12)
