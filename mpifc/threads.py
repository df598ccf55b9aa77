"""How many BLAS threads a rank should use, and applying it at run time.

Rule: a rank uses the cores it owns, ``cores_on_node // ranks_on_node`` (at least
1), so ranks sharing a node never oversubscribe it: one rank alone gets every
core, two ranks on two cores get one each. A user's ``OMP_NUM_THREADS`` wins.

No MPI here: the caller passes ``ranks_on_node`` (the size of an MPI shared-memory
split of COMM_WORLD, or :func:`local_ranks_from_env`). The limit is applied with
threadpoolctl, which works after NumPy has loaded its BLAS.

Idle BLAS workers: after each call that used its threads, OpenBLAS keeps the
workers spinning for 2**28 cycles (about 0.1 s) in case another call follows. A
training step interleaves BLAS calls with NumPy passes that mpifc runs on its own
threads (:mod:`mpifc.nn.blockpool`), so the spinning worker took the second core
from them: the classifier step at 2 threads was no faster than at 1 (71.7 ms vs
76 ms, sum of per-layer minima in bench/step_profile.py, while the process burnt
2 cores), and 50.7 ms once the workers slept at once. :func:`quiet_idle_blas_workers`
(called by ``import mpifc``) sets ``OPENBLAS_THREAD_TIMEOUT`` for that; OpenBLAS reads
it when NumPy loads, so it only takes effect when mpifc is imported first (the
``mpifc`` command always is) or the variable is exported by the job script.
"""
from __future__ import annotations

import os

# launcher variables holding the number of ranks on this node
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE",   # Open MPI
                    "MPI_LOCALNRANKS",              # MPICH / Hydra
                    "MV2_COMM_WORLD_LOCAL_SIZE",    # MVAPICH2
                    "PMI_LOCAL_SIZE")


# OpenBLAS's spin before an idle worker sleeps: 2**N cycles, N in [4, 30], default 28
BLAS_SPIN_VAR = "OPENBLAS_THREAD_TIMEOUT"
BLAS_SPIN_SHORT = "4"


def quiet_idle_blas_workers(env=None, modules=None) -> str | None:
    """Make OpenBLAS's idle workers sleep at once instead of spinning ~0.1 s per call.

    Sets ``OPENBLAS_THREAD_TIMEOUT`` in ``env`` (default os.environ) unless the user
    set it or NumPy is already in ``modules`` (default sys.modules; OpenBLAS read
    the environment when it loaded, so a late setting would only mislead). Returns
    the value set, or None when nothing was set.
    """
    import sys  # noqa: PLC0415

    env = os.environ if env is None else env
    modules = sys.modules if modules is None else modules
    if BLAS_SPIN_VAR in env or "numpy" in modules:
        return None
    env[BLAS_SPIN_VAR] = BLAS_SPIN_SHORT
    return BLAS_SPIN_SHORT


# OpenMP's idle workers (GNU libgomp: Numba's kernels, oneMKL's GEMMs): spin this
# many rounds, then sleep. Sleeping at once (PASSIVE alone) woke the worker for
# every parallel region, tens of microseconds each here; spinning long (libgomp's
# default 300000) kept the second core from the next NumPy pass or GEMM. The MLP
# step at 2 threads, oneMKL GEMMs: 12.6-13.2 ms passive, 11.9-12.4 with 30000.
OMP_WAIT_VAR, OMP_WAIT = "OMP_WAIT_POLICY", "PASSIVE"
OMP_SPIN_VAR, OMP_SPIN = "GOMP_SPINCOUNT", "30000"


def short_openmp_spin(env=None) -> None:
    """Before an OpenMP runtime loads: idle workers spin briefly, then sleep
    (``OMP_WAIT_POLICY=PASSIVE``, ``GOMP_SPINCOUNT=30000``), unless the user set
    either variable."""
    env = os.environ if env is None else env
    if OMP_WAIT_VAR in env or OMP_SPIN_VAR in env:
        return
    env[OMP_WAIT_VAR], env[OMP_SPIN_VAR] = OMP_WAIT, OMP_SPIN


def cores_available() -> int:
    """Cores this process may run on (its affinity set, e.g. a cgroup or batch allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def omp_num_threads(env=None) -> int | None:
    """The user's OMP_NUM_THREADS as an int (first entry of a nested list), or None if unset."""
    env = os.environ if env is None else env
    raw = env.get("OMP_NUM_THREADS", "").strip()
    if not raw:
        return None
    first = raw.split(",")[0].strip()
    try:
        n = int(first)
    except ValueError:
        raise ValueError(f"OMP_NUM_THREADS={raw!r} is not a positive integer") from None
    if n < 1:
        raise ValueError(f"OMP_NUM_THREADS={raw!r} is not a positive integer")
    return n


def local_ranks_from_env(env=None) -> int | None:
    """Ranks on this node as announced by the launcher, or None if no known variable is set."""
    env = os.environ if env is None else env
    for var in _LOCAL_SIZE_VARS:
        v = env.get(var)
        if v and v.strip().isdigit() and int(v) > 0:
            return int(v)
    return None


def blas_threads(ranks_on_node: int, cores_on_node: int | None = None, env=None) -> int:
    """Threads for this rank: OMP_NUM_THREADS if set, else max(1, cores_on_node // ranks_on_node).

    Parameters
    ----------
    ranks_on_node : MPI ranks sharing this node (>= 1)
    cores_on_node : cores of the node available to the job; default :func:`cores_available`.
        If the launcher already binds each rank to its own cores, pass the cores of
        this rank and ranks_on_node=1.
    env : mapping to read OMP_NUM_THREADS from (default os.environ)
    """
    if int(ranks_on_node) < 1:
        raise ValueError(f"ranks_on_node must be >= 1, got {ranks_on_node}")
    user = omp_num_threads(env)
    if user is not None:
        return user
    cores = cores_available() if cores_on_node is None else int(cores_on_node)
    return max(1, cores // int(ranks_on_node))


def apply_blas_threads(ranks_on_node: int, cores_on_node: int | None = None, env=None) -> int:
    """Decide with :func:`blas_threads` and set the BLAS/OpenMP pools of this process; return n."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 - only when applying

    n = blas_threads(ranks_on_node, cores_on_node, env)
    threadpool_limits(limits=n)
    return n


def current_blas_threads() -> int:
    """Threads the loaded BLAS libraries use now (the maximum over them; 1 if none)."""
    from threadpoolctl import threadpool_info  # noqa: PLC0415

    nums = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(nums) if nums else 1
