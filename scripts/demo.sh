#!/usr/bin/env bash
# A real job on the embedded defaults (the mpich wheel as MPI): train the digits-cnn
# preset (scikit-learn's bundled 8x8 digits) on 2 ranks, data parallel, one BLAS
# thread per rank. Extra arguments go to `mpifc train`, e.g. --set parallel.tp=2.
# Each demo starts its run over (--overwrite) unless you pass --resume or --overwrite.
MPIFC_NEED=run . "$(dirname "$0")/env.sh"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
fresh=(--overwrite)
for a in "$@"; do case "$a" in --resume|--resume=*|--overwrite) fresh=() ;; esac; done
exec timeout 900 mpiexec -n "${MPIFC_RANKS:-2}" mpifc train "${MPIFC_PRESET:-digits-cnn}" "${fresh[@]}" "$@"
