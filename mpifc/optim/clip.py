"""Gradient clipping by global L2 norm, completable across shards."""
from __future__ import annotations

import math

import numpy as np

from mpifc.backend import get_array_module


def grad_sq_sum(params):
    """Sum of squared gradient entries over ``params`` on this rank (a Python float).

    Device (CuPy) gradients are summed on the device (in float64) and read back once,
    not once per parameter."""
    total, on_device = 0.0, None
    for p in params:
        g = p.grad
        xp = get_array_module(g)
        g1 = g.reshape(-1)
        sq = xp.dot(g1, g1)              # one BLAS pass, no temporary g*g
        if xp is np:
            total += float(sq)
        else:
            sq = sq.astype(np.float64)
            on_device = sq if on_device is None else on_device + sq
    if on_device is not None:
        total += float(on_device)        # the one device-to-host read
    return total


def clip_grad_norm(params, max_norm, norm_reduce=None, eps=1e-6, error_if_nonfinite=False,
                   counted=None):
    """Scale all gradients by min(1, max_norm / (norm + eps)); return the norm before clipping.

    Parameters
    ----------
    params : list of Parameter (this rank's shards)
    max_norm : float
    norm_reduce : callable(sq_sum) -> sq_sum, optional. Completes the sum of squares
        across ranks, e.g. ``lambda s: comm.allreduce_obj(s)`` over the tensor-parallel
        group. The caller counts each replicated tensor once (pass it on one rank only,
        or divide its share), so the completed sum equals the serial one.
    error_if_nonfinite : raise if the norm is nan or inf (else gradients are left alone)
    counted : the params whose squares this rank adds to the sum (default: all of
        ``params``); e.g. replicated tensors on one rank of their group only. All of
        ``params`` are scaled.

    Returns
    -------
    total_norm : float, the global norm before clipping
    """
    params = list(params)
    sq = grad_sq_sum(params if counted is None else counted)
    if norm_reduce is not None:
        sq = float(norm_reduce(sq))
    total = math.sqrt(sq) if sq >= 0 else math.nan
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise FloatingPointError(f"gradient norm is {total}")
        return total
    coef = max_norm / (total + eps)
    if coef < 1.0:
        for p in params:
            p.grad *= coef
    return total
