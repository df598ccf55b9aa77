"""Every collective against a NumPy reference: even and uneven sizes, three dtypes.

Each rank builds the same global data from a seed, so the expected answer is
computed locally with NumPy and compared with what the communicator returns.
"""
import numpy as np
import pytest

from mpifc.comm import balanced_counts

DTYPES = [np.float32, np.float64, np.int64]
ROWS = [0, 1, 7, 12]          # 0 and 1 give empty shards at P > 1; 7 is uneven for P = 2, 3, 4


def rank_data(rank, rows, dtype, tail=(3,)):
    rng = np.random.default_rng(1000 + rank)
    return (rng.standard_normal((rows,) + tail) * 10).astype(dtype)


def global_data(n, dtype, tail=(3,), seed=7):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n,) + tail) * 10).astype(dtype)


def assert_close(a, b, dtype):
    if np.dtype(dtype).kind == "f":
        np.testing.assert_allclose(a, b, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-4)
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "max", "min", "mean"])
def test_allreduce(comm, dtype, op):
    xs = [rank_data(r, 5, dtype) for r in range(comm.size)]
    ref = {"sum": np.sum, "max": np.max, "min": np.min, "mean": np.mean}[op](np.stack(xs), axis=0)
    if op == "mean" and np.dtype(dtype).kind == "i":
        pytest.skip("mean of integers is not an integer")
    y = comm.allreduce(xs[comm.rank].copy(), op=op)
    assert_close(y, ref.astype(dtype) if op != "mean" else ref, dtype)
    x = xs[comm.rank].copy()
    comm.allreduce(x, op=op, out=x)          # in place
    assert_close(x, y, dtype)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_iallreduce(comm, dtype):
    xs = [rank_data(r, 4, dtype) for r in range(comm.size)]
    req = comm.iallreduce(xs[comm.rank])
    assert_close(req.wait(), np.sum(np.stack(xs), axis=0), dtype)
    x = xs[comm.rank].copy()
    assert_close(comm.iallreduce(x, out=x).wait(), np.sum(np.stack(xs), axis=0), dtype)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", ROWS)
def test_allgather_uneven(comm, dtype, n):
    counts, displs = balanced_counts(n, comm.size)
    full = global_data(n, dtype)
    mine = np.ascontiguousarray(full[displs[comm.rank]:displs[comm.rank] + counts[comm.rank]])
    assert_close(comm.allgather(mine, counts), full, dtype)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_allgather_even(comm, dtype):
    xs = [rank_data(r, 2, dtype) for r in range(comm.size)]
    assert_close(comm.allgather(xs[comm.rank]), np.concatenate(xs), dtype)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", ROWS)
def test_reduce_scatter_uneven(comm, dtype, n):
    counts, displs = balanced_counts(n, comm.size)
    xs = [rank_data(r, n, dtype) for r in range(comm.size)]
    total = np.sum(np.stack(xs), axis=0) if n else xs[0]
    y = comm.reduce_scatter(xs[comm.rank], counts)
    assert y.shape == (counts[comm.rank], 3)
    assert_close(y, total[displs[comm.rank]:displs[comm.rank] + counts[comm.rank]], dtype)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_scatter_even(comm, dtype):
    xs = [rank_data(r, 2 * comm.size, dtype) for r in range(comm.size)]
    total = np.sum(np.stack(xs), axis=0)
    assert_close(comm.reduce_scatter(xs[comm.rank]), total[2 * comm.rank:2 * comm.rank + 2], dtype)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("root", [0, -1])
def test_scatter_gather_uneven(comm, dtype, n, root):
    root = root % comm.size
    counts, displs = balanced_counts(n, comm.size)
    full = global_data(n, dtype)
    recv = np.empty((counts[comm.rank], 3), dtype=dtype)
    comm.scatter(full if comm.rank == root else None, recv, counts, root=root)
    assert_close(recv, full[displs[comm.rank]:displs[comm.rank] + counts[comm.rank]], dtype)
    back = comm.gather(recv, counts, root=root)
    if comm.rank == root:
        assert_close(back, full, dtype)
    else:
        assert back is None


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bcast_reduce(comm, dtype):
    full = global_data(6, dtype)
    x = full.copy() if comm.rank == 0 else np.zeros_like(full)
    comm.bcast(x, root=0)
    assert_close(x, full, dtype)
    xs = [rank_data(r, 6, dtype) for r in range(comm.size)]
    y = comm.reduce(xs[comm.rank], root=comm.size - 1)
    if comm.rank == comm.size - 1:
        assert_close(y, np.sum(np.stack(xs), axis=0), dtype)
    else:
        assert y is None


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
def test_alltoall(comm, dtype):
    P = comm.size
    xs = [rank_data(r, 2 * P, dtype) for r in range(P)]
    y = comm.alltoall(xs[comm.rank])
    ref = np.concatenate([xs[j][2 * comm.rank:2 * comm.rank + 2] for j in range(P)])
    assert_close(y, ref, dtype)


@pytest.mark.mpi(min_size=1)
def test_sendrecv_ring_and_chain(comm):
    P, r = comm.size, comm.rank
    mine = np.full(4, r, dtype=np.float64)
    got = np.empty(4)
    comm.sendrecv(mine, (r + 1) % P, got, (r - 1) % P)        # ring shift
    assert (got == (r - 1) % P).all()
    got = np.full(4, -1.0)                                    # open chain: ends have no peer
    comm.sendrecv(mine, r + 1 if r + 1 < P else None, got, r - 1 if r > 0 else None)
    assert (got == (r - 1 if r > 0 else -1)).all()


@pytest.mark.mpi(min_size=2)
def test_isend_irecv(comm):
    P, r = comm.size, comm.rank
    out = np.empty(3, dtype=np.int64)
    rq = comm.irecv(out, (r - 1) % P, tag=5)
    sq = comm.isend(np.arange(3, dtype=np.int64) + r, (r + 1) % P, tag=5)
    sq.wait()
    assert (rq.wait() == np.arange(3) + (r - 1) % P).all()


@pytest.mark.mpi(min_size=1)
def test_objects_and_split(comm):
    assert comm.allgather_obj(comm.rank) == list(range(comm.size))
    assert comm.bcast_obj({"a": comm.rank}, root=0) == {"a": 0}
    assert comm.allreduce_obj(1) == comm.size
    sub = comm.split(comm.rank % 2, key=comm.rank, name="parity")
    assert sub.size == len(range(comm.rank % 2, comm.size, 2))
    assert sub.allreduce(np.ones(1))[0] == sub.size
    node = comm.split_shared()
    assert 1 <= node.size <= comm.size


def test_balanced_counts():
    assert balanced_counts(10, 3) == ((4, 3, 3), (0, 4, 7))
    assert balanced_counts(2, 4) == ((1, 1, 0, 0), (0, 1, 2, 2))
    assert balanced_counts(0, 2) == ((0, 0), (0, 0))
    for n in range(0, 30):
        for p in range(1, 6):
            c, d = balanced_counts(n, p)
            assert sum(c) == n and max(c) - min(c) <= 1 and d[0] == 0
    with pytest.raises(ValueError):
        balanced_counts(3, 0)


@pytest.mark.mpi(min_size=2)
def test_bad_counts_are_clear_errors(comm):
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="counts"):
        comm.allgather(x, counts=(2,) * (comm.size + 1))
    with pytest.raises(ValueError, match="C-contiguous"):
        comm.allreduce(np.zeros((4, 4))[:, ::2])


def alltoallv_counts(P, seed=5):
    """S[i, j]: rows rank i sends to rank j; uneven, with zeros (an empty block joins too)."""
    S = np.random.default_rng(seed).integers(0, 4, size=(P, P))
    S[0, :] = 0 if P > 1 else S[0, :]          # rank 0 sends nothing to anyone
    return S


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES + [np.uint8])
def test_alltoallv(comm, dtype):
    P, r = comm.size, comm.rank
    S = alltoallv_counts(P)
    xs = [rank_data(i, int(S[i].sum()), dtype) for i in range(P)]
    y = comm.alltoallv(xs[r], S[r], S[:, r])
    # rank r receives block r of every rank's rows, in rank order
    blocks = []
    for i in range(P):
        start = int(S[i, :r].sum())
        blocks.append(xs[i][start:start + S[i, r]])
    assert_close(y, np.concatenate(blocks), dtype)
    assert y.shape == (int(S[:, r].sum()), 3)


@pytest.mark.mpi(min_size=1)
def test_alltoallv_checks_counts(comm):
    with pytest.raises(ValueError, match="sendcounts sum"):
        comm.alltoallv(np.zeros((3, 2)), [4] + [0] * (comm.size - 1), [0] * comm.size)
