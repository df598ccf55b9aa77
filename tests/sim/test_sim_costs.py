"""Collective cost formulas against hand-computed values, selection, hierarchy, tables.

a = alpha, b = beta, g = gamma, n = bytes. Expected values are written out with the
numbers substituted (lg 8 = 3, p' = 4 for p = 6, ...), not computed by the code under test.
"""
import math

import pytest

from mpifc.sim import collectives as C
from mpifc.sim.cluster import Cluster, LinkModel, MeasuredTable, Thresholds

a, b, g, n = 2e-6, 1e-9, 3e-10, 48000.0
L = LinkModel.constant(a, 1 / b)


def close(x, y):
    assert x == pytest.approx(y, rel=1e-12)


def test_allreduce_formulas():
    close(C.allreduce_recursive_doubling(8, n, L, g), 3 * (a + n * b + n * g))
    # p = 6: p' = 4, lg p' = 2, plus the non-power-of-two fold
    close(C.allreduce_recursive_doubling(6, n, L, g),
          2 * (a + n * b + n * g) + (2 * a + 2 * n * b + n * g))
    close(C.allreduce_rabenseifner(8, n, L, g), 6 * a + 2 * 7 / 8 * n * b + 7 / 8 * n * g)
    close(C.allreduce_rabenseifner(6, n, L, g),
          4 * a + 2 * 3 / 4 * n * b + 3 / 4 * n * g + (2 * a + 2 * n * b + n * g))
    close(C.allreduce_ring(6, n, L, g), 10 * a + 2 * 5 / 6 * n * b + 5 / 6 * n * g)
    # concrete numbers once, computed by hand: p=2 ring = 2a + n b + n/2 g
    close(C.allreduce_ring(2, 48000, L, g), 4e-6 + 48e-6 + 7.2e-6)
    for f in (C.allreduce_recursive_doubling, C.allreduce_rabenseifner, C.allreduce_ring):
        assert f(1, n, L, g) == 0.0


def test_reduce_scatter_formulas():
    close(C.reduce_scatter_recursive_halving(8, n, L, g), 3 * a + 7 / 8 * n * (b + g))
    close(C.reduce_scatter_recursive_halving(6, n, L, g),
          2 * a + 3 / 4 * n * (b + g) + (a + n * b + n * g) + (a + n / 6 * b))
    close(C.reduce_scatter_pairwise(6, n, L, g), 5 * a + 5 / 6 * n * (b + g))


def test_allgather_formulas():
    close(C.allgather_recursive_doubling(8, n, L), 3 * a + 7 / 8 * n * b)
    # Bruck p = 6: steps send 1, 2, 2 blocks of n/6
    close(C.allgather_bruck(6, n, L), 3 * a + 5 / 6 * n * b)
    close(C.allgather_ring(6, n, L), 5 * a + 5 / 6 * n * b)


def test_bcast_scatter_gather_formulas():
    close(C.bcast_binomial(6, n, L), 3 * (a + n * b))
    close(C.bcast_scatter_doubling_allgather(8, n, L), 6 * a + 2 * 7 / 8 * n * b)
    close(C.bcast_scatter_ring_allgather(8, n, L), (3 + 7) * a + 2 * 7 / 8 * n * b)
    close(C.scatter_binomial(8, n, L), 3 * a + 7 / 8 * n * b)
    close(C.scatter_binomial(6, n, L), 3 * a + 7 / 8 * n * b)   # L = 3 halvings
    close(C.scatter_linear(6, n, L), 5 * a + 5 / 6 * n * b)


def test_reduce_alltoall_sendrecv_barrier_formulas():
    close(C.reduce_binomial(5, n, L, g), 3 * (a + n * b + n * g))
    close(C.reduce_rabenseifner(8, n, L, g), 6 * a + 2 * 7 / 8 * n * b + 7 / 8 * n * g)
    close(C.reduce_rabenseifner(5, n, L, g),
          4 * a + 2 * 3 / 4 * n * b + 3 / 4 * n * g + (a + n * b + n * g))
    close(C.alltoall_bruck(8, n, L), 3 * (a + n / 2 * b))
    close(C.alltoall_pairwise(8, n, L), 7 * a + 7 / 8 * n * b)
    close(C.sendrecv_direct(2, n, L), a + n * b)
    close(C.barrier_dissemination(5, 0, L), 3 * a)
    assert C.sendrecv_direct(1, n, L) == 0.0


def test_piecewise_link_uses_each_step_size():
    # alpha/beta halfway between breakpoints at block size 31 B (log2(32) = 5 of 10)
    link = LinkModel([(0, 1e-6, 1e9), (1023, 3e-6, 3e9)])
    close(C.allreduce_ring(4, 124, link, g), 6 * (2e-6 + 31 / 2e9) + 3 * 31 * g)
    # recursive doubling sends the whole 1023 B vector each step: last breakpoint
    close(C.allreduce_recursive_doubling(4, 1023, link, g), 2 * (3e-6 + 1023 / 3e9 + 1023 * g))


@pytest.mark.parametrize("op, p, nbytes, algo", [
    ("allreduce", 8, 2048, "recursive_doubling"),        # <= ALLREDUCE_SHORT_MSG_SIZE
    ("allreduce", 8, 2052, "rabenseifner"),
    ("allreduce", 2048, 4096, "recursive_doubling"),     # 1024 floats < p' = 2048
    ("reduce", 8, 2048, "binomial"),
    ("reduce", 8, 2052, "rabenseifner"),
    ("bcast", 8, 12287, "binomial"),                     # < BCAST_SHORT_MSG_SIZE
    ("bcast", 8, 12288, "scatter_doubling_allgather"),
    ("bcast", 7, 100000, "binomial"),                    # < BCAST_MIN_PROCS
    ("bcast", 12, 100000, "scatter_ring_allgather"),     # not a power of two
    ("bcast", 8, 524288, "scatter_ring_allgather"),      # >= BCAST_LONG_MSG_SIZE
    ("allgather", 8, 524287, "recursive_doubling"),
    ("allgather", 8, 524288, "ring"),
    ("allgather", 6, 81919, "bruck"),
    ("allgather", 6, 81920, "ring"),
    ("allgatherv", 6, 1000, "bruck"),
    ("reduce_scatter", 8, 524287, "recursive_halving"),
    ("reduce_scatter", 8, 524288, "pairwise"),
    ("alltoall", 8, 8 * 256, "bruck"),
    ("alltoall", 8, 8 * 257, "scattered"),
    ("alltoall", 4, 4 * 256, "scattered"),               # Bruck only from 8 ranks
    ("alltoall", 8, 8 * 32769, "pairwise"),
    ("scatter", 8, 100, "binomial"),
    ("scatterv", 8, 100, "linear"),
    ("gatherv", 8, 100, "linear"),
    ("sendrecv", 2, 100, "direct"),
    ("barrier", 9, 0, "dissemination"),
])
def test_selection_at_thresholds(op, p, nbytes, algo):
    assert C.select_algorithm(op, p, nbytes) == algo


def test_selection_configurable_and_errors():
    thr = Thresholds(allreduce_short_msg_size=65536)
    assert C.select_algorithm("allreduce", 8, 65536, thr) == "recursive_doubling"
    assert C.select_algorithm("allreduce", 8, 65540, thr) == "rabenseifner"
    thr = Thresholds(algorithms={"allreduce": "ring"})
    assert C.select_algorithm("allreduce", 8, 8, thr) == "ring"
    with pytest.raises(ValueError, match="not one of"):
        C.select_algorithm("allreduce", 8, 8, Thresholds(algorithms={"allreduce": "bruck"}))
    with pytest.raises(ValueError, match="unknown collective"):
        C.select_algorithm("allscatter", 8, 8)


def _two_level(**kw):
    a1, b1, a2, b2 = 1e-6, 1e-10, 5e-6, 1e-9
    c = Cluster(name="t", nodes=2, ranks_per_node=4, intra=LinkModel.constant(a1, 1 / b1),
                inter=LinkModel.constant(a2, 1 / b2), reduction_Bps=1 / g, **kw)
    return c, (a1, b1, a2, b2)


def test_cost_model_flat_single_node():
    c, (a1, b1, a2, b2) = _two_level()
    m = C.CostModel(c)
    # 4 ranks on one node, 1000 B: recursive doubling on the intra link
    close(m.time("allreduce", 1000, 4), 2 * (a1 + 1000 * b1 + 1000 * g))
    assert m.time("allreduce", 1000, 1) == 0.0


def test_cost_model_hierarchical_allreduce():
    c, (a1, b1, a2, b2) = _two_level()
    m = C.CostModel(c)
    x = 1000
    # 8 ranks, 4 per node on 2 nodes: reduce(4, intra, binomial) + allreduce(2, inter,
    # recursive doubling) + bcast(4, intra, binomial)
    expect = 2 * (a1 + x * b1 + x * g) + (a2 + x * b2 + x * g) + 2 * (a1 + x * b1)
    cost = m.cost("allreduce", x, 8)
    close(cost.seconds, expect)
    assert cost.algorithm == "hierarchical(binomial|recursive_doubling|binomial)"
    # two groups per node share the NIC: the inter-node beta doubles
    close(m.time("allreduce", x, 8, nic_share=2),
          expect - x * b2 + x * 2 * b2)
    # without hierarchy: flat recursive doubling over 8 ranks on the inter link
    c.thresholds.hierarchical = False
    close(m.time("allreduce", x, 8), 3 * (a2 + x * b2 + x * g))
    # one rank per node (q = 1) is flat even with hierarchy on
    c.thresholds.hierarchical = True
    close(m.time("allreduce", x, 2, local=1, nodes=2), a2 + x * b2 + x * g)


def test_cost_model_hierarchical_bcast_and_flat_allgather_across_nodes():
    c, (a1, b1, a2, b2) = _two_level()
    m = C.CostModel(c)
    close(m.time("bcast", 1000, 8), (a2 + 1000 * b2) + 2 * (a1 + 1000 * b1))
    # allgather has no node-aware variant: flat recursive doubling on the inter link,
    # every rank of the node sending (nic_share = 4)
    close(m.time("allgather", 8000, 8, nic_share=4), 3 * a2 + 7 / 8 * 8000 * 4 * b2)


def test_measured_tables_preferred_inside_range_only():
    c, (a1, b1, a2, b2) = _two_level(measured=[
        MeasuredTable("allreduce", 2, 1, [8, 1024, 65536], [1e-5, 2e-5, 1e-3]),
        MeasuredTable("reduce", 4, 1, [8, 4096], [7e-6, 9e-6])])
    m = C.CostModel(c)
    cost = m.cost("allreduce", 1024, 2)
    assert cost.source == "measured" and cost.seconds == pytest.approx(2e-5)
    close(m.time("allreduce", math.sqrt(8 * 1024), 2), math.sqrt(1e-5 * 2e-5))
    # beyond the measured sizes: closed form (Rabenseifner, p = 2: 2a + n b + n/2 g)
    x = 1e6
    close(m.time("allreduce", x, 2), 2 * a1 + x * b1 + x / 2 * g)
    # an unmeasured group size: closed form
    close(m.time("allreduce", 1024, 4), 2 * (a1 + 1024 * b1 + 1024 * g))
    # a measured intra-node phase (reduce, 4 ranks) inside a hierarchical allreduce:
    # log-log interpolation between (8 B, 7 us) and (4096 B, 9 us), then the closed forms
    x = 1000
    expect = math.exp(math.log(7e-6) + (math.log(x) - math.log(8))
                      / (math.log(4096) - math.log(8)) * (math.log(9e-6) - math.log(7e-6)))
    expect += (a2 + x * b2 + x * g) + 2 * (a1 + x * b1)
    cost = m.cost("allreduce", x, 8)
    close(cost.seconds, expect)
    assert cost.algorithm.startswith("hierarchical(measured|")


def test_cost_model_rejects_impossible_groups():
    c, _ = _two_level()
    m = C.CostModel(c)
    with pytest.raises(ValueError, match="cannot be"):
        m.time("allreduce", 8, 8, local=2, nodes=2)
    with pytest.raises(ValueError, match="unknown collective"):
        m.time("allscatter", 8, 8)
