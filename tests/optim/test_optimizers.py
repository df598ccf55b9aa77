"""Optimizer steps against their closed-form updates, written out by hand."""
import numpy as np
import pytest

from mpifc.backend import available_backends, backend_module, to_host
from mpifc.nn import Parameter
from mpifc.optim import SGD, Adam, AdamW

GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-0.25, 0.75, 1.0]), np.array([1.5, 0.0, -0.5])]
P0 = np.array([1.0, -2.0, 0.5])


@pytest.fixture(params=available_backends())
def xp(request):
    return backend_module(request.param)


def run(xp, opt_cls, **kw):
    p = Parameter(xp.asarray(P0.copy()), "w")
    opt = opt_cls([p], **kw)
    out = []
    for g in GRADS:
        p.grad[...] = xp.asarray(g)
        opt.step()
        out.append(to_host(p.data).copy())
    return out


def test_sgd_plain(xp):
    got = run(xp, SGD, lr=0.1)
    p = P0.copy()
    for g, q in zip(GRADS, got):
        p = p - 0.1 * g
        np.testing.assert_allclose(q, p, rtol=1e-15)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_weight_decay(xp, nesterov):
    lr, mu, wd = 0.1, 0.9, 0.01
    got = run(xp, SGD, lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
    p, b = P0.copy(), None
    for g, q in zip(GRADS, got):
        g = g + wd * p
        b = g.copy() if b is None else mu * b + g
        p = p - lr * (g + mu * b if nesterov else b)
        np.testing.assert_allclose(q, p, rtol=1e-14)


def test_sgd_dampening(xp):
    got = run(xp, SGD, lr=0.5, momentum=0.5, dampening=0.2)
    p, b = P0.copy(), None
    for g, q in zip(GRADS, got):
        b = g.copy() if b is None else 0.5 * b + 0.8 * g
        p = p - 0.5 * b
        np.testing.assert_allclose(q, p, rtol=1e-14)


@pytest.mark.parametrize("cls,wd", [(Adam, 0.0), (Adam, 0.1), (AdamW, 0.1)])
def test_adam_family(xp, cls, wd):
    lr, b1, b2, eps = 0.01, 0.8, 0.99, 1e-8
    got = run(xp, cls, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p, m, v = P0.copy(), np.zeros(3), np.zeros(3)
    for t, (g, q) in enumerate(zip(GRADS, got), start=1):
        if cls is Adam:
            g = g + wd * p
        else:
            p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(q, p, rtol=1e-13)


def test_zero_grad_state_dict_roundtrip(xp):
    p = Parameter(xp.asarray(P0.copy()), "w")
    opt = Adam([("layer.w", p)], lr=0.1)
    p.grad[...] = 1.0
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["slots"]) == ["layer.w/exp_avg", "layer.w/exp_avg_sq"] and sd["step"] == 1
    q = Parameter(xp.asarray(to_host(p.data).copy()), "w")
    opt2 = Adam([("layer.w", q)], lr=0.5)
    opt2.load_state_dict(sd)
    p.grad[...] = 0.3
    q.grad[...] = 0.3
    opt.step()
    opt2.step()
    np.testing.assert_allclose(to_host(q.data), to_host(p.data), rtol=1e-15)
    opt.zero_grad()
    assert float(xp.abs(p.grad).sum()) == 0.0


def test_bad_arguments():
    p = Parameter(np.zeros(2), "w")
    with pytest.raises(ValueError):
        SGD([], lr=0.1)
    with pytest.raises(ValueError):
        SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        Adam([p], betas=(1.0, 0.9))
    with pytest.raises(TypeError):
        SGD([np.zeros(2)], lr=0.1)
