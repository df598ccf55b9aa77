"""Device buffers in collectives: the "staged" path (pinned host buffers, reused) and the
"device" path (CUDA-aware MPI), with the CuPy test double (tests/fakecupy.py).

Each collective on device buffers gives the host result on both paths; the staged
path makes exactly the copies of the design in mpifc/comm/staging.py (one
device-to-host copy per buffer MPI reads, one host-to-device copy per buffer MPI
writes), allocates its pinned buffers once, and its trace events say which path
they took.
"""
import numpy as np
import pytest

import fakecupy as cp
from mpifc import backend
from mpifc.comm import Communicator, balanced_counts, trace
from mpifc.comm import staging

pytestmark = pytest.mark.mpi(min_size=1)


def _calls(c, x):
    """(name, inputs(xp) -> args, call(*args) -> result, (d2h, h2d) copies by the design)."""
    P, r = c.size, c.rank
    counts = balanced_counts(P + 3, P)[0]              # uneven rows: the v-variants
    me, root = counts[r], P - 1
    f32 = np.float32

    def mine(*arrays):
        return lambda xp: tuple(None if a is None else xp.asarray(a) for a in arrays)

    rs = np.arange(P * 3 * 2, dtype=f32).reshape(P * 3, 2) + r
    sc = np.arange(sum(counts) * 2, dtype=f32).reshape(-1, 2)
    return [
        ("allreduce", mine(x), lambda a: c.allreduce(a), (1, 1)),
        ("allreduce mean in place", mine(x), lambda a: c.allreduce(a, op="mean", out=a), (1, 1)),
        ("iallreduce", mine(x), lambda a: c.iallreduce(a).wait(), (1, 1)),
        ("allgather", mine(x), lambda a: c.allgather(a), (1, 1)),
        ("allgatherv", mine(np.full((me, 2), r, f32)), lambda a: c.allgather(a, counts=counts),
         (1, 1)),
        ("reduce_scatter", mine(rs), lambda a: c.reduce_scatter(a), (1, 1)),
        ("bcast", mine(x), lambda a: c.bcast(a, root=root), (1, 0) if r == root else (0, 1)),
        ("reduce", mine(x), lambda a: c.reduce(a, root=root), (1, 1) if r == root else (1, 0)),
        ("gather", mine(x), lambda a: c.gather(a, root=root), (1, 1) if r == root else (1, 0)),
        ("scatterv", mine(sc if r == root else None, np.zeros((me, 2), f32)),
         lambda s, out: c.scatter(s, out, counts=counts, root=root),
         (1, 1) if r == root else (0, 1)),
        ("alltoall", mine(np.arange(P * 2, dtype=f32) + 10 * r), lambda a: c.alltoall(a), (1, 1)),
        ("sendrecv ring", mine(x, np.zeros_like(x)),
         lambda a, out: c.sendrecv(a, (r + 1) % P, out, (r - 1) % P), (1, 1)),
    ]


def _host(v):
    return None if v is None else backend.to_host(v)


@pytest.mark.parametrize("aware", [False, True], ids=["staged", "device"])
def test_device_collectives_equal_host_and_copy_as_designed(comm, dev, aware):
    c = Communicator(comm.mpi, "dev", cuda_aware=aware)
    x = (np.arange(8, dtype=np.float32).reshape(4, 2) + comm.rank).copy()
    for name, inputs, call, (d2h, h2d) in _calls(c, x):
        want = _host(call(*inputs(np)))
        args = inputs(cp)
        trace.reset()
        cp.reset_counts()
        got = call(*args)
        copies = (cp.counts["d2h"], cp.counts["h2d"])
        assert (want is None) == (got is None), name
        if want is not None:
            assert type(got) is cp.ndarray, name
            np.testing.assert_allclose(got.get(), want, err_msg=name)
        assert copies == ((0, 0) if aware else (d2h, h2d)), f"{name}: {copies}"
        assert cp.counts["scalar"] == 0, name
        ev = [e for e in trace.events() if e["comm"] == "dev"]
        assert len(ev) == 1 and ev[0]["path"] == ("device" if aware else "staged"), name
        assert ev[0]["copy_s"] >= 0 and (aware or sum(copies) == 0 or ev[0]["copy_s"] > 0)
        if aware:
            assert ev[0]["copy_s"] == 0


def test_staging_buffers_are_reused_across_calls(comm, dev):
    """Steady state: the same calls again allocate no pinned buffer (a step repeats)."""
    c = Communicator(comm.mpi, "dev", cuda_aware=False)
    grads = [cp.zeros(n, np.float32) + 1 for n in (1000, 10, 1000)]   # two of one size

    def step():
        reqs = [c.iallreduce(g, out=g) for g in grads]    # in flight at once: distinct buffers
        for q in reqs:
            q.wait()
        c.allgather(grads[1])

    step()
    first = c.staging.allocations
    assert first == 4                     # three buckets in flight + the allgather's result
    cp.reset_counts()
    for _ in range(3):
        step()
    assert c.staging.allocations == first and cp.counts["pinned_allocs"] == 0
    assert cp.counts["d2h"] == 3 * 4 and cp.counts["h2d"] == 3 * 4
    np.testing.assert_allclose(grads[0].get(), comm.size ** 4)


def test_host_buffers_take_the_host_path(comm, dev):
    c = Communicator(comm.mpi, "dev", cuda_aware=False)
    trace.reset()
    c.allreduce(np.ones(3))
    c.allgather(np.ones(2), counts=[2] * comm.size)
    assert all("path" not in e for e in trace.events())
    assert cp.counts["d2h"] == cp.counts["h2d"] == 0 and c.staging.allocations == 0


def test_cuda_aware_detection(monkeypatch):
    for v, want in (("1", True), ("0", False)):
        monkeypatch.setenv("MPIFC_CUDA_AWARE", v)
        assert staging.cuda_aware(refresh=True) == (want, f"MPIFC_CUDA_AWARE={v}")
    monkeypatch.delenv("MPIFC_CUDA_AWARE")
    aware, how = staging.cuda_aware(refresh=True)         # this MPI's own answer, if any
    assert isinstance(aware, bool) and how
    monkeypatch.setattr(staging, "_library_query", lambda: (None, ""))
    monkeypatch.setenv("MPICH_GPU_SUPPORT_ENABLED", "1")
    assert staging.cuda_aware(refresh=True) == (True, "MPICH_GPU_SUPPORT_ENABLED=1")
    monkeypatch.delenv("MPICH_GPU_SUPPORT_ENABLED")
    monkeypatch.delenv("MV2_USE_CUDA", raising=False)
    assert staging.cuda_aware(refresh=True)[0] is False
    monkeypatch.undo()
    staging.cuda_aware(refresh=True)
