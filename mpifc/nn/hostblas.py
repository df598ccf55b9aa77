"""Host GEMMs through Intel oneMKL when the ``mkl`` extra is installed, else NumPy's BLAS.

Every layer's GEMM is a ``matmul`` on NumPy arrays, and NumPy's wheels bring
OpenBLAS. On the MLP's products in bench/ (one thread, float32, batch 256) OpenBLAS
ran at 135-154 GFLOP/s and oneMKL at 156-168 (bench/gemm_backends.py): the GEMMs are
most of a training step, so the step follows. ``pip install "mpifc[mkl]"`` installs
Intel's oneMKL runtime (wheels, no compiler); :func:`matmul` then calls its
``cblas_?gemm`` and ``cblas_?gemm_batch_strided`` through ctypes (which releases the
GIL, so the thread shares of :mod:`mpifc.nn.blockpool` still run side by side) on
float32/float64 host arrays whose strides a BLAS can take, from :data:`MKL_MIN_MACS`
multiply-adds per product (:data:`MKL_MIN_MACS_THREADED` when the GEMM has several
threads), and hands everything else -- CuPy arrays, other dtypes, odd strides,
smaller products -- to ``xp.matmul`` unchanged. Results agree with NumPy's to
rounding (a different summation order), not bitwise.

``MPIFC_BLAS`` chooses: ``auto`` (default: oneMKL when it loads, else NumPy),
``mkl`` (an error when it does not load) or ``numpy``.

Threads: oneMKL runs on GNU OpenMP (libgomp, the runtime the compiled kernels of
:mod:`mpifc.nn.hostjit` use; idle workers spin briefly, then sleep, as there) and
starts with the rank's threads (:func:`mpifc.nn.blockpool.rank_width`, also when its
first GEMM comes from inside a conv's one-thread share). It is one more BLAS for threadpoolctl, so ``threadpool_limits`` and
the blockpool's one-thread shares set both.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from mpifc.backend import get_array_module
from mpifc.nn import _choice, blockpool
from mpifc.threads import short_openmp_spin

ENV = "MPIFC_BLAS"
MODES = ("auto", "mkl", "numpy")

_state = {"mode": None, "lib": None, "failed": None}

# CBLAS constants
_ROW, _NT, _T = 101, 111, 112
# mkl_set_threading_layer values
_LAYER_INTEL, _LAYER_SEQUENTIAL, _LAYER_GNU = 0, 1, 3


def mode(env=None) -> str:
    """The GEMM choice from ``MPIFC_BLAS`` (default ``auto``); ValueError when unknown."""
    return _choice.read(ENV, MODES, env)


def set_mode(m: str | None) -> None:
    """Choose the GEMMs for this process (``None``: read ``MPIFC_BLAS`` again)."""
    _choice.check(m, MODES, "GEMM")
    _state["mode"] = m
    _state.pop("env", None)


def using(m: str):
    """``with using("numpy"):`` -- these GEMMs inside the block, the choice before it after."""
    return _choice.temporarily(_state, set_mode, m)


def _find_mkl_rt() -> str | None:
    """The path of libmkl_rt from the installed ``mkl`` distribution, or None."""
    from importlib import metadata  # noqa: PLC0415

    try:
        files = metadata.files("mkl") or []
    except metadata.PackageNotFoundError:
        return None
    names = sorted((f for f in files if f.name.startswith("libmkl_rt.so")), key=lambda f: len(f.name))
    for f in names:
        p = str(f.locate())
        if os.path.exists(p):
            return p
    return None


def _declare(lib):
    P, I = ctypes.c_void_p, ctypes.c_int
    for name, real in (("s", ctypes.c_float), ("d", ctypes.c_double)):
        f = getattr(lib, f"cblas_{name}gemm")
        f.argtypes = [I, I, I, I, I, I, real, P, I, P, I, real, P, I]
        f.restype = None
        f = getattr(lib, f"cblas_{name}gemm_batch_strided")
        f.argtypes = [I, I, I, I, I, I, real, P, I, I, P, I, I, real, P, I, I, I]
        f.restype = None
    lib.MKL_Set_Num_Threads.argtypes = [I]
    lib.MKL_Set_Threading_Layer.argtypes = [I]
    lib.MKL_Set_Threading_Layer.restype = I


def _threading_layer() -> int:
    """GNU OpenMP when libgomp loads (shared with Numba's kernels), else Intel's."""
    if os.environ.get("MKL_THREADING_LAYER"):
        return -1                              # the user's choice stands
    try:
        ctypes.CDLL("libgomp.so.1")
        return _LAYER_GNU
    except OSError:
        os.environ.setdefault("KMP_BLOCKTIME", "0")   # Intel OpenMP: sleep when idle
        return _LAYER_INTEL


_lock = threading.Lock()       # the first GEMM may come from two thread shares at once


def _load(m):
    if _state["lib"] is None and _state["failed"] is None:
        with _lock:
            if _state["lib"] is None and _state["failed"] is None:
                _open(m)
    if _state["lib"] is None and m == "mkl":
        raise RuntimeError(_state["failed"])
    return _state["lib"]


def _open(m):
    why = None
    path = _find_mkl_rt()
    if path is None:
        why = 'oneMKL is not installed; install it with: pip install "mpifc[mkl]"'
    else:
        try:
            width = max(1, blockpool.rank_width())   # the rank's threads, before oneMKL joins
            short_openmp_spin()           # before oneMKL loads OpenMP
            lib = ctypes.CDLL(path)
            _declare(lib)
            layer = _threading_layer()
            if layer >= 0:
                lib.MKL_Set_Threading_Layer(layer)
            lib.MKL_Set_Num_Threads(width)
            blockpool.joined(width)                   # threadpoolctl now sees oneMKL too
            _state["lib"] = lib
        except (OSError, AttributeError) as exc:
            why = f"oneMKL at {path} did not load ({exc})"
    if why is not None:
        _state["failed"] = f"{ENV}=mkl, but {why}"


def lib():
    """The oneMKL library when host GEMMs use it now, else None."""
    m = _state["mode"]
    if m is None:                       # MPIFC_BLAS, read once (set_mode(None) reads it again)
        m = _state.get("env") or _state.setdefault("env", mode())
    if m == "numpy":
        return None
    return _load(m)


def active() -> str:
    """``"mkl"`` or ``"numpy"``: what host GEMMs use now."""
    return "mkl" if lib() is not None else "numpy"


# --------------------------------------------------------------------------- #
# operand checks: a BLAS takes a matrix whose rows or columns are contiguous
# --------------------------------------------------------------------------- #
def _layout(a, itemsize):
    """(transpose flag, leading dimension) of a 2-D view for a row-major BLAS, or None."""
    r, c = a.shape
    s0, s1 = a.strides
    if (s1 == itemsize or c == 1) and s0 % itemsize == 0 and s0 // itemsize >= max(c, 1):
        return _NT, max(s0 // itemsize, c, 1)
    if (s0 == itemsize or r == 1) and s1 % itemsize == 0 and s1 // itemsize >= max(r, 1):
        return _T, max(s1 // itemsize, r, 1)
    return None


def _eligible(a, b) -> bool:
    return (type(a) is np.ndarray and type(b) is np.ndarray and a.dtype == b.dtype
            and a.dtype in (np.float32, np.float64) and a.ndim >= 2 and b.ndim >= 2)


def _gemm(lib, a, b, out, beta=0.0):
    """out (M, N) = a (M, K) @ b (K, N) + beta * out; False when a layout does not fit."""
    sz = a.itemsize
    la, lb, lo = _layout(a, sz), _layout(b, sz), _layout(out, sz)
    if la is None or lb is None or lo is None or lo[0] != _NT:
        return False
    M, K = a.shape
    N = b.shape[1]
    f = lib.cblas_sgemm if a.dtype == np.float32 else lib.cblas_dgemm
    f(_ROW, la[0], lb[0], M, N, K, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1],
      beta, out.ctypes.data, lo[1])
    return True


def _merge(shape, *strides):
    """Collapse batch dims that step evenly in every operand: (shape, strides...)."""
    dims = [[n] + [s[i] for s in strides] for i, n in enumerate(shape) if n != 1]
    merged = []
    for d in dims:
        if merged and all(p == q * d[0] for p, q in zip(merged[-1][1:], d[1:])):
            merged[-1] = [merged[-1][0] * d[0]] + d[1:]
        else:
            merged.append(d)
    return merged


def _batched(lib, a, b, out) -> bool:
    """out[i] = a[i] @ b[i] over the broadcast batch dims; False when it cannot be done."""
    batch = out.shape[:-2]
    a = np.broadcast_to(a, batch + a.shape[-2:])
    b = np.broadcast_to(b, batch + b.shape[-2:])
    sz = a.itemsize
    dims = _merge(batch, a.strides[:-2], b.strides[:-2], out.strides[:-2])
    if not dims:
        return _gemm(lib, a.reshape(a.shape[-2:]), b.reshape(b.shape[-2:]), out.reshape(out.shape[-2:]))
    if len(dims) > 1:                     # uneven batch (groups): one batched call per leading index
        lead = next(i for i, n in enumerate(batch) if n != 1)
        return all(_batched(lib, a[(slice(None),) * lead + (i,)], b[(slice(None),) * lead + (i,)],
                            out[(slice(None),) * lead + (i,)]) for i in range(batch[lead]))
    count, sa, sb, so = dims[0]
    a0, b0, o0 = (t[(0,) * len(batch)] for t in (a, b, out))
    la, lb, lo = _layout(a0, sz), _layout(b0, sz), _layout(o0, sz)
    if (la is None or lb is None or lo is None or lo[0] != _NT
            or any(s % sz or s < 0 for s in (sa, sb, so))):
        return False
    M, K = a0.shape
    N = b0.shape[1]
    f = lib.cblas_sgemm_batch_strided if a.dtype == np.float32 else lib.cblas_dgemm_batch_strided
    f(_ROW, la[0], lb[0], M, N, K, 1.0, a0.ctypes.data, la[1], sa // sz, b0.ctypes.data, lb[1],
      sb // sz, 0.0, o0.ctypes.data, lo[1], so // sz, count)
    return True


# oneMKL from this many multiply-adds per product (256 x 256 x 256). Below it OpenBLAS
# was as fast or faster here (the classifier's first conv, 0.9 M per image: forward
# 115 vs 103 GFLOP/s, dW 100 vs 63; bench/gemm_backends.py), or the gain did not
# show in the step (its second conv, 4.7 M per image: 1.09-1.14x on the products,
# the step at 1 and 2 threads within noise), and the simulator's rate curves,
# interpolated between calibration points, smear a change of library: with the
# threshold at 2 M the small digits models were predicted 4-7 % faster than they ran
MKL_MIN_MACS = 1 << 24
# ... and from this many when the rank's GEMMs have several threads (a rank owning
# several cores, outside the blockpool's one-thread shares): oneMKL's workers are the
# GNU OpenMP ones the compiled kernels use, awake between calls, where OpenBLAS wakes
# its own (the MLP's 1024->10 layer, the classifier's last ones). MLP, batch 256, 2
# threads, fresh processes here: step 11.12-11.56 -> 10.65-10.87 ms; classifier
# 25.3-26.2 -> 24.4-25.0. Below it NumPy's call costs less than the ctypes one
MKL_MIN_MACS_THREADED = 1 << 16


def _min_macs() -> int:
    return MKL_MIN_MACS_THREADED if blockpool.width() > 1 else MKL_MIN_MACS


def matmul(a, b, out=None, min_macs=None):
    """``xp.matmul(a, b, out=out)``: oneMKL for host float arrays when active and each
    product has at least ``min_macs`` multiply-adds (default: :data:`MKL_MIN_MACS` on one
    thread, :data:`MKL_MIN_MACS_THREADED` on several), else xp's.

    ``a : (..., M, K)``, ``b : (..., K, N)`` with NumPy's broadcasting of the batch
    dims; ``out``, when given, must have the result's shape and dtype.
    """
    if type(a) is np.ndarray and (a.ndim < 2 or b.ndim < 2
                                  or a.shape[-2] * a.shape[-1] * b.shape[-1]
                                  < (_min_macs() if min_macs is None else min_macs)):
        return np.matmul(a, b, out=out)         # small: straight to NumPy, no more checks
    L = lib() if _eligible(a, b) else None
    if L is None:
        return get_array_module(a).matmul(a, b, out=out)
    if (a.ndim > 2 and b.ndim == 2 and a.flags.c_contiguous        # (..., K) rows @ (K, N): one GEMM
            and (out is None or out.flags.c_contiguous)):
        rows = matmul(a.reshape(-1, a.shape[-1]), b, None if out is None else out.reshape(-1, b.shape[1]),
                      min_macs)
        return rows.reshape(a.shape[:-1] + (b.shape[1],)) if out is None else out
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    if a.shape[-1] != b.shape[-2]:
        return np.matmul(a, b, out=out)           # NumPy's error message
    res = np.empty(shape, dtype=a.dtype) if out is None else out
    if out is not None and (out.shape != shape or out.dtype != a.dtype):
        return np.matmul(a, b, out=out)
    if 0 in shape or a.shape[-1] == 0:
        res[...] = 0
        return res
    done = _gemm(L, a, b, res) if len(shape) == 2 else _batched(L, a, b, res)
    if not done:
        np.matmul(a, b, out=res)
    return res
