#!/bin/bash
# PBS Pro / OpenPBS: 2 chunks (nodes) x 2 MPI ranks, 4 threads per rank.
# $PBS_NODEFILE lists one host line per MPI rank (mpiprocs), which is a valid MPICH
# hostfile (a host listed twice gets two slots) and Open MPI hostfile.
#PBS -N mpifc-digits-cnn
#PBS -l select=2:ncpus=8:mpiprocs=2:ompthreads=4
#PBS -l walltime=00:15:00
#PBS -j oe
set -euo pipefail

cd "${PBS_O_WORKDIR:-.}"
# PBS sets OMP_NUM_THREADS from ompthreads; default to 1 if it did not.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export OPENBLAS_NUM_THREADS="$OMP_NUM_THREADS" MKL_NUM_THREADS="$OMP_NUM_THREADS"

VENV="${MPIFC_VENV:-$PWD/.venv}"
if [ -f "$VENV/bin/activate" ]; then . "$VENV/bin/activate"; fi

NRANKS="$(wc -l < "$PBS_NODEFILE")"
TP="${MPIFC_TP:-2}"
mpifc data prepare digits
mpiexec -f "$PBS_NODEFILE" -n "$NRANKS" -genv OMP_NUM_THREADS "$OMP_NUM_THREADS" \
  mpifc train digits-cnn --set parallel.tp="$TP" --set train.out="runs/digits-cnn-${PBS_JOBID:-local}"
