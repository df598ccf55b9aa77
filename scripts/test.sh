#!/usr/bin/env bash
# The whole test suite: serial tests once, then the MPI tests at 1, 2, 3 and 4 ranks.
# Every run is under a timeout: a hang is a failure. An MPI run stops at its first failure
# (-x): the failing rank exits and mpi4py aborts the job, so no rank waits forever in a
# collective its peer will never call. Extra arguments go to pytest.
MPIFC_NEED=test . "$(dirname "$0")/env.sh"
# Ranks share the cores: one BLAS thread each.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
status=0
echo "== serial tests"
timeout 900 python -m pytest -q -p no:cacheprovider tests "$@" || status=$?
for n in ${MPIFC_TEST_RANKS:-1 2 3 4}; do
  echo "== MPI tests on $n rank(s)"
  timeout 900 mpiexec -n "$n" python -m mpi4py -m pytest --with-mpi --only-mpi -q -x -p no:cacheprovider \
    tests "$@" || { rc=$?; echo "MPI tests on $n rank(s) failed (exit $rc)"; status=1; }
done
exit $status
