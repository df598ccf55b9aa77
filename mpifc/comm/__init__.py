"""mpifc.comm: the only package that calls mpi4py.

    from mpifc.comm import world, balanced_counts, trace, Grid
    comm = world()
    with trace.phase("fc1.backward"):
        g = comm.allreduce(g, out=g)
"""
from mpifc.comm import trace
from mpifc.comm.abort import abort, exit_code, install_abort_handler, job_in_progress
from mpifc.comm.communicator import (CollectiveMismatch, Communicator, Request, library_version,
                                     processor_name, world)
from mpifc.comm.counts import balanced_counts, displacements
from mpifc.comm.grid import Grid, GridError, factor_layout

__all__ = ["trace", "world", "Communicator", "Request", "CollectiveMismatch", "balanced_counts",
           "displacements", "Grid", "GridError", "factor_layout", "install_abort_handler", "abort",
           "exit_code", "job_in_progress",
           "processor_name", "library_version"]
