"""mpifc: an MPI message-passing trainer and simulator for sharded neural networks.

The Python API (imported on first use: it needs MPI, which ``mpifc data prepare`` does not)::

    mpifc.fit(model, "data.h5", optimizer=opt, loss=..., grid=grid, epochs=3)
    state = mpifc.gather_state(model)          # full tensors on rank 0
    mpifc.scatter_state(model, state)          # and back into the shards
"""
from mpifc.threads import quiet_idle_blas_workers as _quiet_idle_blas_workers

_quiet_idle_blas_workers()  # before NumPy loads OpenBLAS (see mpifc.threads)

from mpifc.hostmem import retain_freed_memory as _retain_freed_memory  # noqa: E402

__version__ = "0.1.0"

_retain_freed_memory()    # NumPy temporaries reuse freed memory (see mpifc.hostmem)

# name -> module: the Python API (mpifc.trainer, mpifc.state), loaded lazily
_API = {"fit": "mpifc.trainer", "Trainer": "mpifc.trainer", "Settings": "mpifc.trainer",
        "gather_state": "mpifc.state", "scatter_state": "mpifc.state"}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mpifc' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
