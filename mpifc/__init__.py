"""mpifc: an MPI message-passing trainer and simulator for sharded neural networks."""
from mpifc.hostmem import retain_freed_memory as _retain_freed_memory

__version__ = "0.1.0"

_retain_freed_memory()    # NumPy temporaries reuse freed memory (see mpifc.hostmem)
