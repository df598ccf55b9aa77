"""Adjoint identity <F x, y> = <x, F* y> for every communication op and its adjoint.

Inner products of distributed vectors are summed over the ranks that own them,
so both sides are global numbers every rank can compare.
"""
import numpy as np
import pytest

from mpifc.comm import balanced_counts
from mpifc.comm.halo import halo_add, halo_exchange


def dot(comm, a, b):
    """Global inner product of rank-distributed arrays."""
    local = np.array([float(np.vdot(a, b))]) if a is not None else np.zeros(1)
    return comm.allreduce(local)[0]


def check(lhs, rhs):
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs)), f"adjoint mismatch {lhs} vs {rhs}"


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("n", [1, 7, 12])
def test_scatter_gather_adjoint(comm, n):
    # F = scatter from root: full (root only) -> shards; F* = gather to root.
    counts, _ = balanced_counts(n, comm.size)
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((n, 2)) if comm.rank == 0 else None
    y = rng.standard_normal((counts[comm.rank], 2))
    fx = np.empty_like(y)
    comm.scatter(x, fx, counts)
    fty = comm.gather(y, counts)
    check(dot(comm, fx, y), dot(comm, x, fty) if comm.rank == 0 else dot(comm, None, None))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("n", [1, 7, 12])
def test_allgather_reduce_scatter_adjoint(comm, n):
    counts, _ = balanced_counts(n, comm.size)
    rng = np.random.default_rng(10 + comm.rank)
    x = rng.standard_normal((counts[comm.rank], 3))   # sharded
    y = rng.standard_normal((n, 3))                   # one full copy per rank
    check(dot(comm, comm.allgather(x, counts), y), dot(comm, x, comm.reduce_scatter(y, counts)))


@pytest.mark.mpi(min_size=1)
def test_bcast_reduce_adjoint(comm):
    rng = np.random.default_rng(20 + comm.rank)
    x = rng.standard_normal(5)                        # meaningful on root only
    y = rng.standard_normal(5)
    fx = x.copy()
    comm.bcast(fx, root=0)
    fty = comm.reduce(y, root=0)
    check(dot(comm, fx, y), dot(comm, x, fty) if comm.rank == 0 else dot(comm, None, None))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("lo,hi", [(1, 1), (2, 0), (0, 3), ("uneven", "uneven")])
@pytest.mark.parametrize("axis", [0, 2])
def test_halo_exchange_add_adjoint(comm, lo, hi, axis):
    P, r = comm.size, comm.rank
    if lo == "uneven":                      # per-rank halo sizes, as strided convs need
        lo, hi = [1 + (i % 2) for i in range(P)], [(i % 3) for i in range(P)]
    lo_r = lo if isinstance(lo, int) else lo[r]
    hi_r = hi if isinstance(hi, int) else hi[r]
    rng = np.random.default_rng(30 + r)
    shape = [2, 3, 4, 5]
    shape[axis] = 4
    x = rng.standard_normal(shape)
    fx = halo_exchange(comm, x, lo, hi, axis=axis)
    assert fx.shape[axis] == lo_r + 4 + hi_r
    y = rng.standard_normal(fx.shape)
    check(dot(comm, fx, y), dot(comm, x, halo_add(comm, y, lo, hi, axis=axis)))


@pytest.mark.mpi(min_size=2)
def test_halo_exchange_values(comm):
    # rank r owns rows [3r, 3r+3) of a global column 0..3P-1
    P, r = comm.size, comm.rank
    x = np.arange(3 * r, 3 * r + 3, dtype=np.float64)
    got = halo_exchange(comm, x, 2, 1)
    want = np.concatenate([np.arange(3 * r - 2, 3 * r) if r > 0 else np.zeros(2), x,
                           [3 * r + 3] if r + 1 < P else [0.0]])
    np.testing.assert_array_equal(got, want)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alltoallv_adjoint(comm, seed):
    # F = alltoallv with S[i, j] rows from i to j; F* = alltoallv with S transposed
    # (what rank r received from j goes back to j). F is a permutation, so F* F = I too.
    P, r = comm.size, comm.rank
    S = np.random.default_rng(seed).integers(0, 4, size=(P, P))
    rng = np.random.default_rng(40 + r)
    x = rng.standard_normal((int(S[r].sum()), 2))
    y = rng.standard_normal((int(S[:, r].sum()), 2))
    fx = comm.alltoallv(x, S[r], S[:, r])
    fty = comm.alltoallv(y, S[:, r], S[r])
    check(dot(comm, fx, y), dot(comm, x, fty))
    np.testing.assert_array_equal(comm.alltoallv(fx, S[:, r], S[r]), x)   # round trip
