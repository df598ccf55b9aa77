"""mpifc calibrate in quick mode: one rank (plain pytest) and 2+ ranks (mpiexec).

    timeout 120 mpiexec -n 2 python -m mpi4py -m pytest --with-mpi tests/sim
"""
import numpy as np
import pytest

from mpifc.comm import world
from mpifc.sim.calibrate import calibrate, lower_envelope
from mpifc.sim.cluster import load
from mpifc.sim.collectives import CostModel
from mpifc.sim.workload import gemm_aspect


def test_lower_envelope():
    assert lower_envelope([3.0, 1.0, 2.0, 5.0, 4.0]) == [1.0, 1.0, 2.0, 4.0, 4.0]
    assert lower_envelope([]) == []


def _shared_tmp(comm, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("calib") / "cluster.toml") if comm.rank == 0 else None
    return comm.bcast_obj(path)


def _check_common(c, comm):
    assert c.compute.gemm_gflops > 0 and c.compute.conv_gflops > 0
    assert c.compute.elementwise_gbps > 0 and c.reduction_Bps > 0
    assert c.compute.gemm_curve and c.compute.conv_curve
    # the per-call cost of a trivial NumPy call (positive; under 0.1 s however loaded the
    # machine: a sanity range, how it compares with a real step is bench/sim_accuracy.py),
    # the strided-row cost, and the element-wise rate over array sizes (its largest size is
    # the streaming rate)
    assert 0 < c.compute.call_s < 0.1 and c.compute.row_s >= 0
    assert len(c.compute.elementwise_curve) >= 4
    assert c.compute.elementwise_curve[-1][1] == c.compute.elementwise_gbps
    assert len(c.compute.kernel_curve) == len(c.compute.elementwise_curve)  # the ReLU pair
    # thin products: one point per thin dimension of quick mode (4, 16, 64 of 256)
    assert [a for a, _ in c.compute.gemm_aspect_curve] == pytest.approx(
        [gemm_aspect(d, 256, 256) for d in (4, 16, 64)])
    assert all(0 < e <= 1 for _, e in c.compute.gemm_aspect_curve)
    assert "calibration took" in c.notes
    # every rank got the same description
    assert all(t == c.to_toml() for t in comm.allgather_obj(c.to_toml()))


@pytest.mark.skipif(world().size != 1, reason="single-rank calibration (plain pytest run)")
def test_calibrate_single_rank(tmp_path):
    c = calibrate(tmp_path / "one.toml", quick=True, rounds=2)
    _check_common(c, world())
    assert "the fastest of 2 rounds" in c.notes
    assert c.overlap_efficiency == 1.0 and "overlap efficiency not measured" in c.notes
    assert (c.nodes, c.ranks_per_node) == (1, 1)
    # the one table: an allreduce on a 1-rank communicator, the call's own cost, which
    # the cost model charges a group of one (the trainer's finiteness check at 1 rank)
    [t] = c.measured
    assert (t.op, t.group_size, t.nodes) == ("allreduce", 1, 1) and min(t.seconds) > 0
    assert CostModel(c).time("allreduce", 8, 1) == pytest.approx(t(8))
    assert CostModel(c).time("allgather", 8, 1) == 0.0          # not measured: free
    assert "no link measured" in c.notes
    assert load(tmp_path / "one.toml") == c


@pytest.mark.mpi(min_size=2)
def test_calibrate_quick_multi_rank(tmp_path_factory):
    comm = world()
    path = _shared_tmp(comm, tmp_path_factory)
    c = calibrate(path, quick=True)
    _check_common(c, comm)
    assert -1.0 <= c.overlap_efficiency <= 1.0 and "overlap efficiency" in c.notes
    P = comm.size
    assert sum(s for _, s in c.hosts) == P and c.nodes == len(c.hosts)
    # one table per measured op and group size 2..P, times positive and non-decreasing
    keys = {(t.op, t.group_size) for t in c.measured}
    for g in range(2, P + 1):
        for op in ("allreduce", "allgather", "reduce_scatter", "bcast"):
            assert (op, g) in keys
    assert ("allreduce", 1) in keys              # the call's own cost on a group of one
    for t in c.measured:
        assert all(s > 0 for s in t.seconds)
        assert list(np.diff(t.seconds) >= 0).count(False) == 0
        assert t.bytes[0] >= 4 and t.bytes[-1] <= 262144
    # the link gives an 8-byte message a positive time, under a second however loaded
    assert 0 < c.intra.time(8) < 1.0
    # the cost model answers measured points with the measurement
    m = CostModel(c)
    t = c.lookup_measured("allreduce", 2, c.measured[0].nodes)
    assert m.time("allreduce", t.bytes[1], 2, local=2 if c.ranks_per_node >= 2 else 1,
                  nodes=t.nodes) == pytest.approx(t.seconds[1])
    if comm.rank == 0:
        assert load(path) == c


def test_overlap_efficiency_is_explained():
    """`mpifc calibrate` says what its overlap figure means, a negative one included."""
    from mpifc.sim.calibrate import overlap_meaning

    assert overlap_meaning(1.0) == "a non-blocking allreduce hides wholly behind compute"
    assert overlap_meaning(0.42).startswith("42% of a non-blocking allreduce hides")
    assert overlap_meaning(0.0).startswith("nothing hides")
    neg = overlap_meaning(-1.0)
    assert "takes longer than a blocking one here (by 100% of its time" in neg
    assert "-1 is the floor" in neg
    assert "models the gradient overlap as a loss" in neg
    assert "floor" not in overlap_meaning(-0.3) and "by 30% of its time" in overlap_meaning(-0.3)
