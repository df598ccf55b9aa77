"""fakecupy: a CuPy stand-in for machines without a GPU (a test double; tests only).

Point mpifc at it with ``MPIFC_DEVICE_MODULE=/path/to/tests/fakecupy.py`` (or, in
process, ``mpifc.backend.set_device_module(fakecupy)``); ``mpifc.backend`` then uses
it wherever it would use cupy, so ``train.device = "cuda"`` runs the whole device path
on the CPU.

What it proves. Its arrays (:class:`ndarray`) wrap NumPy arrays and behave like
CuPy's where CuPy is strict, stricter where it is lenient:

* implicit conversion to NumPy raises, as CuPy's does: ``np.asarray(d)`` (``__array__``),
  a NumPy ufunc on a device array (``__array_ufunc__ = None``; CuPy runs its own
  ufunc there, the double is stricter), and mixing a host ``numpy.ndarray`` into
  device arithmetic or into any function other than ``asarray``/``array``; a NumPy
  function on device arrays runs on the device, as CuPy's ``__array_function__`` does;
* the explicit copies are counted in :data:`counts`: ``h2d`` (``asarray``/``array`` of
  host data, ``ndarray.set``, assigning host data into a slice), ``d2h`` (``asnumpy``,
  ``ndarray.get``, ``tolist``), ``scalar`` (``float``/``int``/``bool``/``item`` on a
  one-element array: a device-to-host read of one value, which CuPy allows), with
  their bytes; ``pinned_allocs`` counts ``cuda.alloc_pinned_memory`` calls and
  ``syncs`` the stream and event synchronisations;
* streams and events (``cuda.Stream``, ``cuda.Event``, ``with stream:``) do their work
  at once, in order, and log it in :data:`ops` (h2d copies with the stream they were
  issued on, event records and waits): tests read the order of operations there;
* ``cuda.runtime.getDeviceCount()`` is ``FAKECUPY_DEVICES`` (default 1), or the
  number of entries of ``CUDA_VISIBLE_DEVICES`` when that is set, as CUDA counts;
  ``cuda.Device(i).use()`` records :data:`current_device`.

Device memory is host memory here, so ``__dlpack__`` hands MPI the wrapped buffer:
the "CUDA-aware" path (device buffers straight to MPI) works with the double too.
"""
from __future__ import annotations

import os

import numpy as _np

counts = {"h2d": 0, "d2h": 0, "scalar": 0, "h2d_bytes": 0, "d2h_bytes": 0,
          "pinned_allocs": 0, "syncs": 0}
current_device = 0
# the order of stream operations: (op, stream name, detail) tuples -- "h2d" copies
# (with their bytes), "record" and "wait_event" of events, "sync"; tests add their own
# markers with mark(); cleared by reset_counts()
ops: list = []
_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
             "construct a NumPy array explicitly.")      # CuPy's own message


def reset_counts() -> None:
    for k in counts:
        counts[k] = 0
    ops.clear()


def mark(what, detail=None) -> None:
    """A test's marker in :data:`ops` (e.g. "backward end" of a step)."""
    ops.append((what, None, detail))


def snapshot() -> dict:
    return dict(counts)


def _count(kind: str, nbytes: int, stream=None) -> None:
    counts[kind] += 1
    if kind in ("h2d", "d2h"):
        counts[kind + "_bytes"] += int(nbytes)
    if kind == "h2d":
        ops.append(("h2d", (stream or _current_stream()).name, int(nbytes)))


# --------------------------------------------------------------------------- wrapping
def _unwrap(v, fn="function"):
    """Device arrays -> their NumPy array; a host ndarray is refused (CuPy: TypeError)."""
    t = type(v)
    if t is ndarray:
        return v._a
    if t is _np.ndarray:
        raise TypeError(f"fakecupy.{fn}: a host numpy.ndarray {v.shape} mixed into device "
                        "code (CuPy: 'Unsupported type numpy.ndarray'); copy it with xp.asarray")
    if t in (list, tuple):
        return t(_unwrap(e, fn) for e in v)
    if t is dict:
        return {k: _unwrap(e, fn) for k, e in v.items()}
    return v


def _wrap(r):
    t = type(r)
    if t is _np.ndarray:
        return ndarray(r)
    if isinstance(r, _np.generic):          # reductions give 0-d device arrays, as in CuPy
        return ndarray(_np.asarray(r))
    if t in (list, tuple):
        return t(_wrap(e) for e in r)
    return r


class _Func:
    """A NumPy callable (function or ufunc) taking and returning device arrays."""

    def __init__(self, f, name):
        self._f, self._name = f, name

    def __call__(self, *args, **kwargs):
        return _wrap(self._f(*_unwrap(args, self._name), **_unwrap(kwargs, self._name)))

    def __getattr__(self, attr):            # ufunc methods: add.at, maximum.reduce, ...
        sub = getattr(self._f, attr)
        return _Func(sub, f"{self._name}.{attr}") if callable(sub) else sub


def _operand(v):
    t = type(v)
    if t is ndarray:
        return v._a
    if t is _np.ndarray:
        raise TypeError(f"fakecupy: unsupported operand numpy.ndarray {v.shape} with a device "
                        "array (CuPy: 'Unsupported type'); copy it with xp.asarray")
    return v


def _binop(name):
    op = getattr(_np.ndarray, name)

    def f(self, other):
        r = op(self._a, _operand(other))
        return NotImplemented if r is NotImplemented else _wrap(r)
    f.__name__ = name
    return f


def _iop(name):
    op = getattr(_np.ndarray, name)

    def f(self, other):
        op(self._a, _operand(other))
        return self
    f.__name__ = name
    return f


_REFUSED = {"tobytes", "tofile", "dump", "dumps", "ctypes", "data"}
_ABSENT = {"__array_interface__", "__array_struct__", "__cuda_array_interface__"}


class ndarray:
    """A device array: a NumPy array behind a wall that only explicit copies cross."""

    __slots__ = ("_a",)
    __array_ufunc__ = None          # numpy ufuncs on a device array raise TypeError
    __hash__ = None

    def __init__(self, a):
        if type(a) is not _np.ndarray:
            raise TypeError("fakecupy.ndarray wraps a numpy.ndarray; use fakecupy.asarray")
        self._a = a

    # -- the wall
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def __array_function__(self, func, types, args, kwargs):
        # as CuPy: numpy.f(device array) runs cupy.f (device in, device out); a host
        # ndarray among the arguments is still refused (_unwrap)
        return _Func(func, func.__name__)(*args, **kwargs)

    def __getattr__(self, name):
        if name in _ABSENT:           # NumPy probes these first; then __array__ refuses
            raise AttributeError(name)
        if name in _REFUSED:
            raise TypeError(f"fakecupy.ndarray.{name}: host access to device memory; use .get()")
        a = object.__getattribute__(self, "_a")
        attr = getattr(a, name)
        return _Func(attr, f"ndarray.{name}") if callable(attr) else attr

    def __dlpack__(self, *args, **kwargs):          # MPI reads the (host) memory directly
        return self._a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()

    # -- explicit copies
    def get(self, stream=None, order="C", out=None, blocking=True):
        _count("d2h", self._a.nbytes)
        if out is not None:
            if type(out) is not _np.ndarray or out.shape != self.shape:
                raise ValueError("fakecupy.ndarray.get: out must be a numpy array of the same shape")
            _np.copyto(out, self._a)
            return out
        return self._a.copy()

    def set(self, arr, stream=None):
        if type(arr) is not _np.ndarray:
            raise TypeError("fakecupy.ndarray.set: expects a numpy.ndarray")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"fakecupy.ndarray.set: shape/dtype {arr.shape} {arr.dtype} "
                             f"differ from {self.shape} {self.dtype}")
        _count("h2d", arr.nbytes, stream)
        _np.copyto(self._a, arr)

    def tolist(self):
        _count("d2h", self._a.nbytes)
        return self._a.tolist()

    def _scalar(self):
        if self._a.size != 1:
            raise ValueError(f"fakecupy: only a one-element device array converts to a Python "
                             f"scalar (this one has shape {self.shape})")
        _count("scalar", self._a.itemsize)
        return self._a.reshape(()).item()

    def item(self):
        return self._scalar()

    def __float__(self):
        return float(self._scalar())

    def __int__(self):
        return int(self._scalar())

    def __index__(self):
        return int(self._scalar())

    def __bool__(self):
        return bool(self._scalar())

    def __complex__(self):
        return complex(self._scalar())

    def __format__(self, spec):
        return format(self._scalar(), spec) if self._a.size == 1 and spec else repr(self)

    def __repr__(self):             # not a copy to count: debugging output only
        return "fakecupy." + repr(self._a).replace("\n", "\n         ")

    # -- shape and indexing
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(r) for r in self._a)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "ndarray.__getitem__")])

    def __setitem__(self, key, value):
        if type(value) is _np.ndarray:      # host data into device memory: an h2d copy
            _count("h2d", value.nbytes)
        elif type(value) is ndarray:
            value = value._a
        self._a[_unwrap(key, "ndarray.__setitem__")] = value

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    def __neg__(self):
        return ndarray(-self._a)

    def __pos__(self):
        return ndarray(+self._a)

    def __abs__(self):
        return ndarray(abs(self._a))

    def __invert__(self):
        return ndarray(~self._a)


for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
           "xor", "lshift", "rshift"):
    setattr(ndarray, f"__{_n}__", _binop(f"__{_n}__"))
    setattr(ndarray, f"__r{_n}__", _binop(f"__r{_n}__"))
    setattr(ndarray, f"__i{_n}__", _iop(f"__i{_n}__"))
for _n in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_n}__", _binop(f"__{_n}__"))


# --------------------------------------------------------------------------- the module API
def asarray(a, dtype=None, order=None):
    """Device array of ``a``; host data is copied to the device (counted)."""
    if type(a) is ndarray:
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    h = _np.array(a, dtype=dtype, order=order or "K", copy=True)
    _count("h2d", h.nbytes)
    return ndarray(h)


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if type(a) is ndarray:
        return ndarray(_np.array(a._a, dtype=dtype, copy=True, order=order, ndmin=ndmin))
    h = _np.array(a, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    _count("h2d", h.nbytes)
    return ndarray(h)


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if type(a) is ndarray:
        return a.get(out=out)
    return _np.asarray(a)


def get_array_module(*args):
    import sys

    return sys.modules[__name__] if any(type(a) is ndarray for a in args) else _np


def __getattr__(name):          # the rest of the xp API: NumPy's, on device arrays
    f = getattr(_np, name)
    if isinstance(f, type) or not callable(f):      # dtypes, constants
        return f
    return _Func(f, name)


class _Generator:
    def __init__(self, seed):
        self._g = _np.random.default_rng(seed)

    def __getattr__(self, name):
        return _Func(getattr(self._g, name), f"random.Generator.{name}")


class random:                   # noqa: N801 - a namespace, as cupy.random
    @staticmethod
    def default_rng(seed=None):
        return _Generator(seed)


# --------------------------------------------------------------------------- cuda
def _visible() -> int:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([v for v in vis.split(",") if v.strip() and v.strip() != "-1"])
    return int(os.environ.get("FAKECUPY_DEVICES", "1"))


class _Stream:
    """A stream: records its operations in :data:`ops`; ``with stream:`` makes it current."""

    _made = 0

    def __init__(self, null=False, non_blocking=False, ptds=False, name=None):
        if name is None:
            _Stream._made += 1
            name = f"stream{_Stream._made}"
        self.name = name
        self._prev = []

    def synchronize(self):
        counts["syncs"] += 1
        ops.append(("sync", self.name, None))

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def wait_event(self, event):
        ops.append(("wait_event", self.name, event.id))

    def __enter__(self):
        global _current
        self._prev.append(_current)
        _current = self
        return self

    def __exit__(self, *exc):
        global _current
        _current = self._prev.pop()
        return False


class _Event:
    _made = 0

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        _Event._made += 1
        self.id = _Event._made
        self.stream = None

    def record(self, stream=None):
        self.stream = (stream or _current_stream()).name
        ops.append(("record", self.stream, self.id))

    def synchronize(self):
        counts["syncs"] += 1
        ops.append(("sync", self.stream, self.id))

    @property
    def done(self):
        return True


_NULL = _Stream(name="null")
_current = _NULL


def _current_stream():
    return _current


class cuda:                     # noqa: N801 - a namespace, as cupy.cuda
    class runtime:              # noqa: N801
        @staticmethod
        def getDeviceCount():   # noqa: N802 - CUDA's name
            n = _visible()
            if n == 0:
                raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
            return n

        @staticmethod
        def getDeviceProperties(i):  # noqa: N802
            return {"name": b"fakecupy device", "totalGlobalMem": 0}

    class Device:
        def __init__(self, i=None):
            self.id = current_device if i is None else int(i)

        def use(self):
            global current_device
            if not 0 <= self.id < _visible():
                raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id} of {_visible()}")
            current_device = self.id

        def synchronize(self):
            counts["syncs"] += 1

        compute_capability = "00"

    Stream = _Stream
    Event = _Event

    @staticmethod
    def get_current_stream():
        return _current_stream()

    @staticmethod
    def alloc_pinned_memory(nbytes):
        counts["pinned_allocs"] += 1
        return bytearray(int(nbytes))
