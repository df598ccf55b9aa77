"""Array backend: the only module in mpifc that imports cupy.

Math is written once against ``xp`` (NumPy or CuPy), picked from the data::

    xp = get_array_module(x)
    y = xp.maximum(x, 0)

A NumPy-only machine never imports cupy: the import is attempted lazily, the
first time a caller asks whether a GPU backend exists, and its failure is cached.
"""
from __future__ import annotations

import numpy as np

_cupy = None          # the cupy module once imported
_cupy_tried = False   # import attempted (success or not)


def _try_cupy():
    global _cupy, _cupy_tried
    if not _cupy_tried:
        _cupy_tried = True
        try:
            import cupy  # noqa: PLC0415 - lazy on purpose
            cupy.cuda.runtime.getDeviceCount()
            _cupy = cupy
        except Exception:  # no cupy, no driver or no device: NumPy only
            _cupy = None
    return _cupy


def cupy_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    return _try_cupy() is not None


def is_device_array(x) -> bool:
    """True for a CuPy array. Never imports cupy for a NumPy array."""
    mod = type(x).__module__
    return mod.startswith("cupy")


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if is_device_array(a):
            return _try_cupy()
    return np


def backend_module(name: str):
    """Module for a backend name: ``"numpy"`` or ``"cupy"``."""
    if name == "numpy":
        return np
    if name == "cupy":
        cp = _try_cupy()
        if cp is None:
            raise RuntimeError("backend 'cupy' requested but cupy or a CUDA device is not available")
        return cp
    raise ValueError(f"unknown backend {name!r}; expected 'numpy' or 'cupy'")


def available_backends() -> list[str]:
    """Names of the backends usable here, NumPy first."""
    return ["numpy"] + (["cupy"] if cupy_available() else [])


def to_host(x):
    """Return a NumPy array for ``x`` (no copy when it already is one)."""
    if is_device_array(x):
        return x.get()
    return np.asarray(x)


def to_device(x, xp):
    """Place ``x`` on the backend ``xp`` (numpy or cupy)."""
    if xp is np:
        return to_host(x)
    return xp.asarray(x)


def synchronize(x=None) -> None:
    """Wait for the current CUDA stream, so MPI sees finished data. No-op on NumPy."""
    if x is not None and not is_device_array(x):
        return
    cp = _cupy if _cupy_tried else None
    if cp is not None:
        cp.cuda.get_current_stream().synchronize()


def cuda_aware_mpi() -> bool:
    """Whether the MPI library can take device pointers directly.

    Set ``MPIFC_CUDA_AWARE=1`` to assert it (e.g. Open MPI built with UCX/CUDA,
    MVAPICH2-GDR, Cray MPICH with ``MPICH_GPU_SUPPORT_ENABLED=1``). Default: stage
    through host memory, which is always correct.
    """
    import os

    return os.environ.get("MPIFC_CUDA_AWARE", "0") == "1"
