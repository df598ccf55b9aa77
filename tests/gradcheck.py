"""Finite-difference gradient check shared by the layer and loss tests.

The scalar probed is L = sum(f() * g) for a fixed random g, so one analytic
backward with dy = g gives every gradient at once. Each element of each checked
array is perturbed in place by +-eps (central difference, float64).

The error reported per array is max|analytic - numeric| / max(max|analytic|,
max|numeric|, 1e-12): a relative error on the tensor's scale, printed like
llm.c's check_tensor ("OK, maxdiff = ...").
"""
from __future__ import annotations

import numpy as np

from mpifc.backend import get_array_module, to_host


def numerical_grad(f, a, g, eps=1e-6):
    """d sum(f()*g) / d a by central differences, perturbing ``a`` in place."""
    xp = get_array_module(a)
    grad = np.zeros(a.shape, dtype=np.float64)
    flat = a.reshape(-1)            # a view: writes go to a
    gh = g
    for i in range(flat.size):
        old = flat[i].item()
        flat[i] = old + eps
        lp = float(xp.sum(f() * gh))
        flat[i] = old - eps
        lm = float(xp.sum(f() * gh))
        flat[i] = old
        grad.reshape(-1)[i] = (lp - lm) / (2 * eps)
    return grad


def check_gradients(f, arrays, analytic, seed=0, eps=1e-6, tol=1e-6, label=""):
    """Compare analytic and numerical gradients; return the worst relative error.

    Parameters
    ----------
    f : callable() -> y, reads the arrays below (perturbed in place)
    arrays : dict name -> float64 array (C-contiguous) to check
    analytic : callable(g) -> dict name -> gradient, where g = dL/dy
    """
    y = f()
    xp = get_array_module(y)
    rng = np.random.default_rng(seed)
    g = xp.asarray(rng.standard_normal(np.shape(y)))
    got = analytic(g)
    worst = 0.0
    for name, a in arrays.items():
        assert a.dtype == np.float64 and a.flags.c_contiguous, name
        num = numerical_grad(f, a, g, eps)
        ana = to_host(got[name]).astype(np.float64)
        assert ana.shape == num.shape, f"{label}{name}: grad shape {ana.shape} != {num.shape}"
        scale = max(np.abs(ana).max(initial=0.0), np.abs(num).max(initial=0.0), 1e-12)
        err = float(np.abs(ana - num).max(initial=0.0) / scale)
        worst = max(worst, err)
        verdict = "OK" if err <= tol else "NOT OK"
        print(f"{label}{name:>10s}: {verdict}, maxdiff = {err:.3e}")
    return worst
