"""Device buffers and MPI: CUDA-aware detection and pinned host staging buffers.

Two paths for a CuPy (device) buffer in a collective (:class:`Communicator`):

``device``  the MPI library reads and writes GPU memory itself (CUDA-aware MPI): the
            stream is synchronised so MPI sees finished data, then the device array goes
            to MPI as it is. No copies.
``staged``  the library only takes host memory: the data is copied into a page-locked
            (pinned) host buffer (one device-to-host copy per buffer MPI reads), MPI
            runs on it -- in place where the op allows -- and the result is copied back
            (one host-to-device copy per buffer MPI writes). So a staged allreduce or
            allgather costs two copies, a bcast one on every rank (root: to the host;
            the others: back to the device).

The staging buffers come from a :class:`StagingPool` per communicator, kept and
reused across calls: a training step issues the same calls with the same sizes every
step, so after the first step no call allocates (``StagingPool.allocations`` stops
growing). Each trace event of a device-buffer call carries ``path`` and ``copy_s``
(seconds spent in the copies of that call).

:func:`cuda_aware` decides the path once per process: ``MPIFC_CUDA_AWARE=1`` asserts
and ``=0`` denies CUDA-awareness; otherwise the MPI library is asked
(``MPIX_Query_cuda_support``: Open MPI, MVAPICH2; ``MPIX_GPU_query_support``: MPICH
4), then the vendor's switch is read (``MPICH_GPU_SUPPORT_ENABLED=1``: Cray MPICH;
``MV2_USE_CUDA=1``: MVAPICH2-GDR). Nothing found means staged: always correct.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

from mpifc import backend

_DECIDED: tuple[bool, str] | None = None


def _library_query() -> tuple[bool | None, str]:
    """Ask the loaded MPI library, by symbol, whether it takes CUDA device pointers."""
    from mpi4py import MPI

    handles = []
    for where in (getattr(MPI, "__file__", None), None):
        try:
            handles.append(ctypes.CDLL(where))
        except OSError:
            pass
    for h in handles:
        f = getattr(h, "MPIX_Query_cuda_support", None)
        if f is not None:
            f.restype = ctypes.c_int
            return bool(f()), "MPIX_Query_cuda_support()"
        f = getattr(h, "MPIX_GPU_query_support", None)
        if f is not None:                 # MPICH 4: (MPIX_GPU_SUPPORT_CUDA = 0, &is_supported)
            ok = ctypes.c_int(0)
            if f(ctypes.c_int(0), ctypes.byref(ok)) == 0:
                return bool(ok.value), "MPIX_GPU_query_support(CUDA)"
    return None, ""


def cuda_aware(refresh: bool = False) -> tuple[bool, str]:
    """(whether MPI takes device buffers, how that was decided), once per process."""
    global _DECIDED
    if _DECIDED is not None and not refresh:
        return _DECIDED
    env = os.environ.get("MPIFC_CUDA_AWARE", "").strip()
    if env in ("1", "0"):
        _DECIDED = (env == "1", f"MPIFC_CUDA_AWARE={env}")
        return _DECIDED
    try:
        got, how = _library_query()
    except Exception:       # an MPI without the symbols, or ctypes cannot open it
        got, how = None, ""
    if got is not None:
        _DECIDED = (got, how)
    elif os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1":
        _DECIDED = (True, "MPICH_GPU_SUPPORT_ENABLED=1")
    elif os.environ.get("MV2_USE_CUDA") == "1":
        _DECIDED = (True, "MV2_USE_CUDA=1")
    else:
        _DECIDED = (False, "not detected (set MPIFC_CUDA_AWARE=1 to assert it)")
    return _DECIDED


class StagingPool:
    """Pinned host buffers for staging device data, reused across calls.

    ``take(shape, dtype)`` hands out a free buffer of exactly that many bytes (or
    allocates one); ``give`` returns it once MPI is done with it (at the end of a
    blocking call, at ``wait`` of a non-blocking one). Buffers in flight at once
    (several overlapped gradient buckets) are distinct; in steady state (the same
    calls every step) nothing is allocated.
    """

    def __init__(self):
        self._free: dict[int, list] = {}
        self.allocations = 0          # pinned buffers allocated so far
        self.bytes = 0                # their total size

    def take(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        free = self._free.get(n)
        raw = free.pop() if free else None
        if raw is None:
            raw = backend.pinned_empty(n)
            self.allocations += 1
            self.bytes += n
        return raw.view(dtype).reshape(shape)

    def give(self, buf: np.ndarray) -> None:
        raw = buf.reshape(-1).view(np.uint8)
        self._free.setdefault(raw.size, []).append(raw)
