"""Step engine: group placement, the two-stream overlap schedule by hand, speed."""

import pytest

from mpifc.sim.cluster import Cluster, ComputeRates, LinkModel, preset
from mpifc.sim.engine import Phase, Workload, group_shape, simulate
from mpifc.sim.planner import factorisations
from sim_helpers import big_workload as _big_workload, count_calls


def _cluster(rpn=2):
    # 1 GFLOP/s, 1 GB/s links with no latency, free reductions: times are easy by hand
    return Cluster(name="hand", nodes=1, ranks_per_node=rpn,
                   intra=LinkModel.constant(0.0, 1e9), inter=LinkModel.constant(0.0, 1e9),
                   reduction_Bps=1e30,
                   compute=ComputeRates(gemm_gflops=1.0, conv_gflops=0.5, elementwise_gbps=1.0))


def _dp_workload():
    # dp = 2: Rabenseifner on 2 ranks sends n/2 each way twice = n beta = 1.5 s for 1.5 GB
    return Workload("hand", [
        Phase("compute", "fwd", flops=1e9),
        Phase("compute", "bwd.l2", flops=1e9, stage="backward"),
        Phase("comm", "allreduce.l2", op="allreduce", group="dp", bytes=1.5e9,
              overlappable=True, stage="backward"),
        Phase("compute", "bwd.l1", flops=1e9, stage="backward"),
        Phase("comm", "allreduce.l1", op="allreduce", group="dp", bytes=1.5e9,
              overlappable=True, stage="backward"),
        Phase("compute", "adam", op_kind="elementwise", bytes=1e9, stage="optimizer"),
    ], samples_per_step=64, memory_bytes_per_rank=123.0, dp=2, tp=1)


def test_overlap_schedule_by_hand():
    r = simulate(_dp_workload(), _cluster())
    # main: fwd 0-1, bwd.l2 1-2, bwd.l1 2-3; side: ar.l2 2-3.5, ar.l1 3.5-5;
    # adam waits for the side stream: 5-6
    assert r.step_s == pytest.approx(6.0)
    assert r.compute_s == pytest.approx(4.0)
    assert r.comm_by_op == {"allreduce": pytest.approx(3.0)}
    assert r.exposed_comm_s == pytest.approx(2.0)
    assert r.overlapped_comm_s == pytest.approx(1.0)
    assert r.samples_per_s == pytest.approx(64 / 6.0)
    assert r.memory_bytes_per_rank == 123.0
    assert [p.start for p in r.phases] == pytest.approx([0, 1, 2, 2, 3.5, 5])
    r = simulate(_dp_workload(), _cluster(), overlap=False)
    assert r.step_s == pytest.approx(7.0)
    assert (r.exposed_comm_s, r.overlapped_comm_s) == pytest.approx((3.0, 0.0))


def test_overlap_efficiency_pays_the_unhidden_share_on_the_main_stream():
    from dataclasses import replace
    # none hidden: every allreduce runs where it is posted, 1 + 1 + 1.5 + 1 + 1.5 + 1
    r = simulate(_dp_workload(), replace(_cluster(), overlap_efficiency=0.0))
    assert r.step_s == pytest.approx(7.0)
    assert r.comm_by_op == {"allreduce": pytest.approx(3.0)}
    assert r.exposed_comm_s == pytest.approx(3.0) and r.overlapped_comm_s == pytest.approx(0.0)
    # half hidden: main fwd 0-1, bwd.l2 1-2, ar.l2 unhidden 2-2.75 (side 2.75-3.5),
    # bwd.l1 2.75-3.75, ar.l1 unhidden 3.75-4.5 (side 4.5-5.25), adam waits: 5.25-6.25
    r = simulate(_dp_workload(), replace(_cluster(), overlap_efficiency=0.5))
    assert r.step_s == pytest.approx(6.25)
    assert r.comm_by_op == {"allreduce": pytest.approx(3.0)}
    assert r.overlapped_comm_s == pytest.approx(0.75)
    assert [p.label for p in r.phases if p.kind == "comm" and not p.overlapped] == [
        "allreduce.l2.unhidden", "allreduce.l1.unhidden"]
    # below zero: posting and waiting cost half as much again, 1 + 1 + 2.25 + 1 + 2.25 + 1
    r = simulate(_dp_workload(), replace(_cluster(), overlap_efficiency=-0.5))
    assert r.step_s == pytest.approx(8.5)
    assert r.exposed_comm_s == pytest.approx(4.5) and r.overlapped_comm_s == pytest.approx(0.0)


def test_compute_kinds_and_repeat():
    w = Workload("k", [Phase("compute", "conv", op_kind="conv", flops=1e9, repeat=3),
                       Phase("compute", "relu", op_kind="elementwise", bytes=5e8),
                       Phase("comm", "tp", op="sendrecv", group="tp", bytes=2e8)],
                 samples_per_step=1, memory_bytes_per_rank=0, dp=1, tp=2)
    r = simulate(w, _cluster())
    assert r.compute_by_kind == pytest.approx({"gemm": 0, "conv": 6.0, "elementwise": 0.5})
    assert r.comm_by_op == pytest.approx({"sendrecv": 0.2})
    assert r.step_s == pytest.approx(6.7)


def test_group_shapes():
    # dp = 4, tp = 2, 4 ranks per node: tp pairs inside a node; dp groups {0,2,4,6}
    # have 2 members on each of 2 nodes
    s = group_shape("tp", 4, 2, 4)
    assert (s.size, s.local, s.nodes, s.node_ranks, s.consecutive) == (2, 2, 1, 4, True)
    s = group_shape("dp", 4, 2, 4)
    assert (s.size, s.local, s.nodes, s.consecutive) == (4, 2, 2, False)
    s = group_shape("world", 4, 2, 4)
    assert (s.size, s.local, s.nodes) == (8, 4, 2)
    # tp = 3 on 4-rank nodes: group {3,4,5} straddles nodes 0 and 1
    s = group_shape("tp", 2, 3, 4)
    assert (s.size, s.local, s.nodes) == (3, 3, 2)
    # tp = 8 fills nodes of 4: dp groups have one member per node
    s = group_shape("dp", 4, 8, 4)
    assert (s.size, s.local, s.nodes) == (4, 1, 4)
    assert s.nic_share("allreduce", True) == 4.0       # every rank of a node sends
    s = group_shape("dp", 4, 2, 4)
    assert s.nic_share("allreduce", True) == 2.0       # one leader per group and node
    assert s.nic_share("allgather", True) == 4.0       # flat
    assert group_shape("tp", 1, 8, 4).nic_share("sendrecv", True) == 1.0
    assert group_shape("self", 4, 2, 4).size == 1


def test_validation_errors():
    with pytest.raises(ValueError, match="unknown collective"):
        Phase("comm", "x", op="allscatter")
    with pytest.raises(ValueError, match="group"):
        Phase("comm", "x", op="allreduce", group="pp")
    with pytest.raises(ValueError, match="only communication"):
        Phase("compute", "x", overlappable=True)
    with pytest.raises(ValueError, match="built for"):
        simulate(_dp_workload(), _cluster(), dp=1, tp=2)


def test_16384_ranks_cost_log_p_work():
    """The engine's work grows with log P (the collectives' step counts), not with P:
    8M ranks take less than twice the work of 16384. Counted in function calls, which
    a loaded machine cannot change; the wall time is a bench line (bench/sim_speed.py:
    one layout < 1 s, all 15 layouts of 16384 ranks < 3 s)."""
    cluster = preset("ib-ndr400")
    w = _big_workload(2048, 8)
    r = simulate(w, cluster)
    assert r.ranks == 16384 and r.beyond_cluster and r.step_s > r.compute_s > 0
    assert r.exposed_comm_s + r.overlapped_comm_s == pytest.approx(r.comm_s)
    small, big = _big_workload(2, 8), _big_workload(2 ** 20, 8)
    simulate(small, cluster), simulate(big, cluster)       # warm any caches first
    n16, n16k, n8m = (count_calls(lambda: simulate(x, cluster)) for x in (small, w, big))
    print(f"function calls: 16 ranks {n16}, 16384 ranks {n16k}, 8M ranks {n8m}")
    assert n8m < 2 * n16k and n16k < 8 * n16
    for dp, tp in factorisations(16384):                    # every layout simulates
        assert simulate(_big_workload(dp, tp), cluster).ranks == 16384
