"""Keep freed host memory in the process, so NumPy's temporaries stop page-faulting.

Every NumPy operation allocates its result; a training step allocates and frees
hundreds of arrays of a few hundred KiB to a few MiB. glibc's defaults hand such
memory back to the kernel on free (arrays >= 128 KiB are mmap'ed and unmapped,
and the heap top above 128 KiB is trimmed), so the next step takes it back one page
fault per 4 KiB page -- kernel time that grows with the rank count on a node. On
the 2-core test machine the digits-cnn step (batch 64, one rank) ran 11.5-11.8 ms
(fastest of 300 steps, four runs) with the defaults and 9.1-9.3 ms with the settings
below.

:func:`retain_freed_memory` sets them with ``mallopt`` (glibc on Linux only; a
no-op elsewhere): arrays below ``mmap_mib`` come from the heap, up to ``trim_mib`` of
free heap stays mapped, and the heap grows ``top_pad_mib`` at a time. The cost is
resident memory: a process keeps its peak. ``import mpifc`` calls it; set
``MPIFC_RETAIN_FREED_MEMORY=0`` to keep the C library's defaults, and a
``MALLOC_*_`` variable already in the environment (glibc's own tunables) wins over
the setting it names.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

_applied: dict[str, int] | None = None


def retain_freed_memory(trim_mib: int = 256, top_pad_mib: int = 64, mmap_mib: int = 32) -> dict:
    """Apply the settings once; returns what was set ({} when nothing was)."""
    global _applied
    if _applied is not None:
        return dict(_applied)
    _applied = {}
    if os.environ.get("MPIFC_RETAIN_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):       # not glibc (no mallopt symbol)
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for env, param, mib in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, mmap_mib),
                            ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, trim_mib),
                            ("MALLOC_TOP_PAD_", _M_TOP_PAD, top_pad_mib)):
        if env in os.environ:
            continue
        if mallopt(param, int(mib) << 20) == 1:
            _applied[env.strip("_").lower()] = int(mib) << 20
    return dict(_applied)
