"""BLAS-threads helper: cores owned by a rank, OMP_NUM_THREADS wins."""
import pytest

from mpifc import threads


def test_cores_split_between_ranks():
    assert threads.blas_threads(1, cores_on_node=2, env={}) == 2      # alone: every core
    assert threads.blas_threads(2, cores_on_node=2, env={}) == 1      # two ranks, two cores
    assert threads.blas_threads(4, cores_on_node=16, env={}) == 4
    assert threads.blas_threads(3, cores_on_node=8, env={}) == 2      # floor
    assert threads.blas_threads(8, cores_on_node=2, env={}) == 1      # oversubscribed: min 1


def test_user_omp_num_threads_wins():
    assert threads.blas_threads(2, cores_on_node=16, env={"OMP_NUM_THREADS": "3"}) == 3
    assert threads.blas_threads(1, cores_on_node=16, env={"OMP_NUM_THREADS": "5,2"}) == 5
    assert threads.blas_threads(1, cores_on_node=16, env={"OMP_NUM_THREADS": ""}) == 16
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
            threads.blas_threads(1, cores_on_node=4, env={"OMP_NUM_THREADS": bad})
    with pytest.raises(ValueError):
        threads.blas_threads(0, cores_on_node=4, env={})


def test_default_cores_and_launcher_env():
    assert threads.blas_threads(1, env={}) == threads.cores_available() >= 1
    assert threads.local_ranks_from_env({"MPI_LOCALNRANKS": "4"}) == 4
    assert threads.local_ranks_from_env({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2
    assert threads.local_ranks_from_env({}) is None


def test_apply_sets_blas_pool():
    from threadpoolctl import threadpool_limits

    before = threads.current_blas_threads()
    try:
        n = threads.apply_blas_threads(1, cores_on_node=1, env={})
        assert n == 1 and threads.current_blas_threads() == 1
    finally:
        threadpool_limits(limits=before)
