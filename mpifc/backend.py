"""Array backend: the only module in mpifc that imports cupy.

Math is written once against ``xp`` (NumPy or CuPy), picked from the data::

    xp = get_array_module(x)
    y = xp.maximum(x, 0)

A NumPy-only machine never imports cupy: the import is attempted lazily, the
first time a caller asks whether a GPU backend exists, and its failure is cached.

Tests only: ``MPIFC_DEVICE_MODULE`` (a module name or a ``.py`` path) names a
module used in place of cupy -- ``tests/fakecupy.py``, a CuPy test double whose
arrays refuse implicit conversion to NumPy and count host<->device copies -- so a
machine without a GPU runs the device path (``train.device = "cuda"``);
:func:`set_device_module` does the same in process.
"""
from __future__ import annotations

import os

import numpy as np

_cupy = None          # the cupy module once imported
_cupy_tried = False   # import attempted (success or not)


def _load_device_module(spec: str):
    """The module named by ``MPIFC_DEVICE_MODULE`` (tests: the CuPy double)."""
    import importlib
    import importlib.util
    import sys

    if spec.endswith(".py"):
        name = os.path.splitext(os.path.basename(spec))[0]
        if name in sys.modules:
            return sys.modules[name]
        loaded = importlib.util.spec_from_file_location(name, spec)
        mod = importlib.util.module_from_spec(loaded)
        sys.modules[name] = mod          # one copy: its copy counters are the process's
        loaded.loader.exec_module(mod)
        return mod
    return importlib.import_module(spec)


def _try_cupy():
    global _cupy, _cupy_tried
    if not _cupy_tried:
        _cupy_tried = True
        try:
            spec = os.environ.get("MPIFC_DEVICE_MODULE")
            if spec:
                cupy = _load_device_module(spec)
            else:
                import cupy  # noqa: PLC0415 - lazy on purpose
            cupy.cuda.runtime.getDeviceCount()
            _cupy = cupy
        except Exception:  # no cupy, no driver or no device: NumPy only
            _cupy = None
    return _cupy


def set_device_module(module):
    """Use ``module`` in place of cupy (tests: the double); returns the previous one.

    ``None`` goes back to "not tried yet" (the next use imports cupy or the module
    ``MPIFC_DEVICE_MODULE`` names)."""
    global _cupy, _cupy_tried
    old = _cupy if _cupy_tried else None
    _cupy, _cupy_tried = module, module is not None
    return old


def cupy_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    return _try_cupy() is not None


def cupy_importable() -> bool:
    """True when cupy (or the module ``MPIFC_DEVICE_MODULE`` names) can be imported,
    device or not; says "not installed" apart from "no GPU" in error messages."""
    import importlib.util

    return bool(os.environ.get("MPIFC_DEVICE_MODULE")) or importlib.util.find_spec("cupy") is not None


def is_device_array(x) -> bool:
    """True for a CuPy array (or the test double's). Never imports cupy for a NumPy array."""
    t = type(x)
    if t is np.ndarray:
        return False
    if t.__module__.startswith("cupy"):
        return True
    return _cupy is not None and t is getattr(_cupy, "ndarray", None)


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


# ---------------------------------------------------------------------- devices
def device_count() -> int:
    """CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applied); 0 without cupy."""
    cp = _try_cupy()
    if cp is None:
        return 0
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:      # driver present, no device
        return 0


def use_device(i: int) -> None:
    """Make device ``i`` (an index among the visible ones) current for this process."""
    _try_cupy().cuda.Device(int(i)).use()


def device_name(i: int) -> str:
    props = _try_cupy().cuda.runtime.getDeviceProperties(int(i))
    name = props.get("name", b"?")
    return name.decode() if isinstance(name, bytes) else str(name)


# ---------------------------------------------------------------------- explicit copies
def pinned_empty(nbytes: int):
    """A page-locked host buffer of ``nbytes`` (uint8) for staging device data.

    Pinned memory lets the DMA engine copy without a bounce buffer; it is costly to
    allocate, so callers keep and reuse these (mpifc.comm.staging)."""
    cp = _try_cupy()
    if cp is None:
        return np.empty(int(nbytes), dtype=np.uint8)
    mem = cp.cuda.alloc_pinned_memory(max(int(nbytes), 1))
    return np.frombuffer(mem, dtype=np.uint8, count=int(nbytes))


def copy_to_host(x, out: np.ndarray) -> np.ndarray:
    """Device array ``x`` -> the host array ``out`` (same shape and dtype): one copy."""
    return x.get(out=out)


def copy_to_device(host: np.ndarray, out) -> None:
    """Host array ``host`` -> the device array ``out`` (same shape and dtype): one copy."""
    out.set(host)


# ---------------------------------------------------------------------- streams (loader prefetch)
def new_stream():
    """A non-blocking CUDA stream (the loader's copy stream); None on the host."""
    cp = _cupy if _cupy_tried else None
    return None if cp is None else cp.cuda.Stream(non_blocking=True)


def on_stream(stream):
    """Context in which device work is issued on ``stream`` (a no-op for None)."""
    import contextlib

    return contextlib.nullcontext() if stream is None else stream


def record_event(stream=None):
    """An event marking the work issued so far on ``stream`` (default: the current one)."""
    cp = _try_cupy()
    ev = cp.cuda.Event(disable_timing=True)
    ev.record(stream if stream is not None else cp.cuda.get_current_stream())
    return ev


def wait_event(event, stream=None) -> None:
    """Make ``stream`` (default: the current one) wait for ``event`` on the device; the
    host does not wait."""
    cp = _try_cupy()
    (stream if stream is not None else cp.cuda.get_current_stream()).wait_event(event)


def copy_to_device_async(host: np.ndarray, out, stream) -> None:
    """Host array ``host`` (pinned, for a truly asynchronous copy) -> the device array
    ``out`` on ``stream``: returns at once; wait on an event recorded after it."""
    out.set(host, stream=stream)
