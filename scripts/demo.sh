#!/usr/bin/env bash
# A real job on the embedded defaults (the mpich wheel as MPI), 2 ranks.
. "$(dirname "$0")/env.sh"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
exec timeout 600 mpiexec -n "${MPIFC_RANKS:-2}" mpifc demo "$@"
