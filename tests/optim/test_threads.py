"""BLAS-threads helper: cores owned by a rank, OMP_NUM_THREADS wins."""
import json
import os
import subprocess
import sys

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


def test_quiet_idle_blas_workers_sets_only_before_numpy_and_never_over_the_user():
    env = {}
    assert threads.quiet_idle_blas_workers(env, modules={}) == threads.BLAS_SPIN_SHORT
    assert env == {threads.BLAS_SPIN_VAR: threads.BLAS_SPIN_SHORT}
    user = {threads.BLAS_SPIN_VAR: "28"}
    assert threads.quiet_idle_blas_workers(user, modules={}) is None and user[threads.BLAS_SPIN_VAR] == "28"
    late = {}
    assert threads.quiet_idle_blas_workers(late, modules={"numpy": object()}) is None and late == {}


def test_short_openmp_spin_never_over_the_user():
    env = {}
    threads.short_openmp_spin(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000"}
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        before = dict(user)
        threads.short_openmp_spin(user)
        assert user == before


# After a 2-thread GEMM, OpenBLAS's workers must be asleep (state S), not spinning
# (state R) on the core the next NumPy pass wants. No timing is asserted: the state
# of a worker blocked on its condition variable is S however loaded the machine is.
WORKERS_PROBE = """
import json, os, threading, time
import mpifc
import numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(limits=2)
a = np.ones((384, 384), np.float32)
for _ in range(5):
    a @ a
time.sleep(0.05)
me = threading.get_native_id()
states = {}
for tid in os.listdir("/proc/self/task"):
    if int(tid) != me:
        with open(f"/proc/self/task/{tid}/stat") as f:
            states[tid] = f.read().rsplit(")", 1)[1].split()[0]
print(json.dumps([os.environ.get("OPENBLAS_THREAD_TIMEOUT"), states]))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or threads.cores_available() < 2,
                    reason="needs Linux /proc and 2 cores (OpenBLAS starts no worker on 1)")
def test_blas_workers_sleep_after_a_threaded_call():
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", threads.BLAS_SPIN_VAR)}
    out = subprocess.run([sys.executable, "-c", WORKERS_PROBE], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    value, states = json.loads(out.stdout)
    assert value == threads.BLAS_SPIN_SHORT
    assert all(s == "S" for s in states.values()), states
