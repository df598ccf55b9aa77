"""Shared checks for the sharded-layer tests (imported as parallel_helpers)."""
from __future__ import annotations

import numpy as np

from mpifc.backend import to_host

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def rel_err(got, ref) -> float:
    """max|got - ref| / max(max|ref|, 1e-30): error on the tensor's scale."""
    got, ref = np.asarray(to_host(got), dtype=np.float64), np.asarray(to_host(ref), dtype=np.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"shape {got.shape} != {ref.shape}")
    if ref.size == 0:
        return 0.0
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def check(label, got, ref, dtype, failures: list):
    """Record (not raise) a comparison, llm.c style, so every collective runs first."""
    e = rel_err(got, ref)
    ok = e <= TOL[np.dtype(dtype).type]
    print(f"{'OK ' if ok else 'BAD'} {label}: maxdiff = {e:.3e}")
    if not ok:
        failures.append(f"{label}: rel err {e:.3e}")


def block(a, axis, counts, index):
    """This rank's block of ``a`` along ``axis`` under ``counts``."""
    off = int(sum(counts[:index]))
    sl = [slice(None)] * a.ndim
    sl[axis] = slice(off, off + int(counts[index]))
    return a[tuple(sl)]
