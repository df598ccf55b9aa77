"""Small helpers the layer classes share: backend and dtype resolution."""
from __future__ import annotations

import numpy as np

from mpifc.backend import backend_module, to_device


def resolve_xp(xp):
    """Backend module from a name ("numpy"/"cupy"), a module, or None (NumPy)."""
    if xp is None:
        return np
    if isinstance(xp, str):
        return backend_module(xp)
    return xp


def resolve_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def place(host_array, xp, dtype):
    """A host array on backend ``xp`` with ``dtype``, C-contiguous."""
    return to_device(np.ascontiguousarray(host_array, dtype=dtype), xp)
