"""mpifc: an MPI message-passing trainer and simulator for sharded neural networks."""
__version__ = "0.1.0"
