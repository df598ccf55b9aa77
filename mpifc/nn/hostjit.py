"""Compiled host kernels for the element-wise passes: Numba when it is installed.

NumPy makes one pass over memory per operation and runs it on one core; the
BatchNorm, ReLU and max-pool passes between the convolution GEMMs were about half
of the classifier's training step (bench/step_profile.py). With the ``fast`` extra
(``pip install "mpifc[fast]"``: Numba, wheels only, no compiler needed) those passes
run as the kernels of :mod:`mpifc.nn._numba_kernels`: one pass each, on the cores
the rank owns, without the GIL. Everything else, and every array on a GPU, keeps
the NumPy code in :mod:`mpifc.nn.functional`, which stays the reference: the tests
check each kernel against it.

``MPIFC_KERNELS`` chooses: ``auto`` (default: Numba when it imports, else NumPy),
``numba`` (an error when Numba is missing) or ``numpy`` (never compile). The first
use compiles the kernels (a few seconds) into Numba's cache beside the module, or
in the user's cache directory when the package is read-only; later processes load
them from there.

Threads follow :func:`mpifc.nn.blockpool.width`, the BLAS threads the rank was
given (one per rank when ranks share a node, every core when one rank owns them).
Numba runs them on OpenMP (GNU libgomp here), whose idle workers spin before they
sleep: the spinning worker took the second core from the next GEMM's OpenBLAS
worker, and the MLP step at 2 threads went from 13.9 to 22.7 ms (the classifier's
from 34 to 66 ms). Unless the user set either, ``OMP_WAIT_POLICY=PASSIVE`` and
``GOMP_SPINCOUNT=30000`` are exported before Numba loads its OpenMP runtime
(:func:`mpifc.threads.short_openmp_spin`): idle workers spin briefly, then sleep. Numba's
pool is also sized to the rank's threads when Numba is first imported here
(``NUMBA_NUM_THREADS``, unless set): with a pool of every core in each of 2 ranks on
2 cores, the torch DDP step beside them in bench/ddp_compare.py took 64 ms instead of
34 (MLP). A rank therefore cannot raise its kernel threads above the BLAS threads it
had when the first kernel ran.
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

from mpifc.nn import _choice, blockpool, hostblas
from mpifc.threads import short_openmp_spin

ENV = "MPIFC_KERNELS"
MODES = ("auto", "numba", "numpy")

_state = {"mode": None, "mod": None}
_local = threading.local()   # Numba's thread count is per calling thread


def mode(env=None) -> str:
    """The kernel choice from ``MPIFC_KERNELS`` (default ``auto``); ValueError when unknown."""
    return _choice.read(ENV, MODES, env)


def set_mode(m: str | None) -> None:
    """Choose the kernels for this process (``None``: read ``MPIFC_KERNELS`` again)."""
    _choice.check(m, MODES, "kernel")
    _state["mode"] = m


POOL_VAR = "NUMBA_NUM_THREADS"


def using(m: str):
    """``with using("numpy"):`` -- these kernels inside the block, the choice before it after."""
    return _choice.temporarily(_state, set_mode, m)


def _import_kernels():
    """Import the kernel module. Numba caches compiled kernels beside the package, else in
    the user's cache directory; when neither is writable (a read-only site install and no
    home), it refuses to compile a cached kernel at all: the kernels then go to a
    temporary directory, compiled again by every process, and a warning says how to
    keep them (``NUMBA_CACHE_DIR``)."""
    try:
        from mpifc.nn import _numba_kernels  # noqa: PLC0415 - only when wanted
        return _numba_kernels
    except RuntimeError as exc:
        if "cannot cache" not in str(exc):
            raise
    import atexit  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    import numba  # noqa: PLC0415

    numba.config.CACHE_DIR = tempfile.mkdtemp(prefix="mpifc-numba-")
    atexit.register(shutil.rmtree, numba.config.CACHE_DIR, ignore_errors=True)
    warnings.warn(f"mpifc: no writable cache for the compiled kernels (beside the package "
                  f"or in the home directory); compiling them into {numba.config.CACHE_DIR} "
                  f"for this process only. Set NUMBA_CACHE_DIR to a writable directory to "
                  f"keep them between runs.", RuntimeWarning, stacklevel=3)
    from mpifc.nn import _numba_kernels  # noqa: PLC0415
    return _numba_kernels


def _load_numbas_blas():
    """Load now the BLAS Numba binds when its first kernel loads (SciPy's OpenBLAS,
    through scipy.linalg.cython_blas), so that :func:`blockpool.joined` can limit it."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401, PLC0415
    except ImportError:
        pass


def _load(m):
    if _state["mod"] is None:
        short_openmp_spin()   # before Numba loads OpenMP
        width = max(1, blockpool.rank_width())
        if "numba" not in sys.modules:                  # read once, when Numba imports
            os.environ.setdefault(POOL_VAR, str(width))
        try:
            try:
                _numba_kernels = _import_kernels()
                _load_numbas_blas()
            finally:
                blockpool.joined(width)                 # ... and give it the rank's threads
        except ImportError as exc:
            if m == "numba":
                raise RuntimeError(f"{ENV}=numba, but Numba does not import ({exc}); "
                                   'install it with: pip install "mpifc[fast]"') from exc
            _state["mode"] = "numpy"      # auto: remember, do not retry every call
            return None
        _state["mod"] = _numba_kernels
    return _state["mod"]


def active() -> str:
    """``"numba"`` or ``"numpy"``: what host arrays use now."""
    return "numba" if kernels(np) is not None else "numpy"


# a parallel kernel wakes its sleeping workers (OMP_WAIT_POLICY=PASSIVE), tens of
# microseconds on this VM: a ReLU over 64 KiB took 3.4 us on 1 thread and 45 on 2,
# over 1 MiB 62 vs 100, over 1.5 MiB 140 vs 120, over 8 MiB 707 vs 391
PARALLEL_MIN_BYTES = 3 << 19
# ... unless oneMKL runs the GEMMs between the kernels (mpifc.nn.hostblas): its
# workers are the same GNU OpenMP threads, mostly still awake. MLP, batch 256, 2
# threads here: step 10.73-10.96 ms with 1.5 MiB, 10.40-10.62 with 64 KiB (with
# NumPy's BLAS 12.6-12.7 vs 13.3-13.6: there the workers sleep)
PARALLEL_MIN_BYTES_MKL = 1 << 16


def parallel_min_bytes() -> int:
    """Bytes of input from which a pass runs on the rank's threads, not one."""
    return PARALLEL_MIN_BYTES_MKL if hostblas.lib() is not None else PARALLEL_MIN_BYTES


def cached() -> bool:
    """True when Numba's cache already holds the kernels (so the first use loads rather
    than compiles them); True also when that cannot be told (Numba's cache layout is
    its own) or the kernels are not in use."""
    mod = _state["mod"] if kernels(np) is not None else None
    if mod is None:
        return True
    try:
        return all(os.path.exists(getattr(mod, name)._cache._cache_file._index_path)
                   for name in ("bn_sums", "relu_forward", "sgd_update"))
    except (AttributeError, TypeError):
        return True


def kernels(xp, nbytes=None):
    """The compiled kernel module for arrays of ``xp`` (its thread count set: the rank's
    threads, or 1 for a pass over fewer than :func:`parallel_min_bytes` of input
    ``nbytes``), or None: for arrays on a GPU, with ``MPIFC_KERNELS=numpy``, or when
    Numba is missing."""
    if xp is not np:
        return None
    m = _state["mode"] or mode()
    if m == "numpy":
        return None
    mod = _load(m)
    if mod is None:
        return None
    n = blockpool.width() if blockpool.ENABLED else 1
    if nbytes is not None and nbytes < parallel_min_bytes():
        n = 1
    if getattr(_local, "threads", None) != n:
        import numba  # noqa: PLC0415 - loaded by _load

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        _local.threads = n
    return mod


def contiguous(*arrays) -> bool:
    """All C-contiguous (the kernels index flat or (N, C, L) memory)."""
    return all(a.flags.c_contiguous for a in arrays)
