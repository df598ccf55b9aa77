"""Layout planner: enumeration, memory cap, ranking == brute force."""
import random

import pytest

from mpifc.sim.cluster import preset
from mpifc.sim.planner import (LayoutInfeasible, brute_force_best, factorisations, plan,
                               workload_cost)
from sim_helpers import big_workload as _big_workload


def test_factorisations():
    assert factorisations(1) == [(1, 1)]
    assert factorisations(12) == [(12, 1), (6, 2), (4, 3), (3, 4), (2, 6), (1, 12)]
    assert factorisations(7) == [(7, 1), (1, 7)]
    assert len(factorisations(16384)) == 15
    with pytest.raises(ValueError):
        factorisations(0)


@pytest.mark.parametrize("seed", range(40))
def test_plan_matches_brute_force_on_random_costs(seed):
    rng = random.Random(seed)
    P = rng.randint(1, 120)
    table = {(dp, tp): (rng.choice([rng.random(), 0.5]), rng.random() * 10)
             for dp, tp in factorisations(P)}
    infeasible = {k for k in table if rng.random() < 0.2}
    cap = rng.choice([None, 5.0, 1.0])

    def cost(dp, tp):
        if (dp, tp) in infeasible:
            raise LayoutInfeasible(f"tp={tp} does not divide the features")
        return table[(dp, tp)]

    ranked = plan(P, cost, cap)
    best = brute_force_best(P, cost, cap)
    if best is None:
        assert ranked == []
    else:
        assert (ranked[0].dp, ranked[0].tp) == best
    fitting = {k for k, (s, m) in table.items()
               if k not in infeasible and (cap is None or m <= cap)}
    assert {(r.dp, r.tp) for r in ranked} == fitting
    assert [r.step_s for r in ranked] == sorted(r.step_s for r in ranked)
    everything = plan(P, cost, cap, include_rejected=True)
    assert len(everything) == len(table)
    assert all(r.reason for r in everything if not r.fits)


def test_plan_with_simulated_workload_and_memory_cap():
    cluster = preset("ib-hdr100")
    cost = workload_cost(_big_workload, cluster)
    ranked = plan(64, cost, memory_cap=1.1e9, include_rejected=True)
    fits = [r for r in ranked if r.fits]
    assert {(r.dp, r.tp) for r in fits} == {(32, 2), (16, 4), (8, 8), (4, 16), (2, 32), (1, 64)}
    assert all(r.report is not None and r.report.step_s == r.step_s for r in fits)
    rejected = [r for r in ranked if not r.fits]
    assert [(r.dp, r.tp) for r in rejected] == [(64, 1)] and "cap" in rejected[0].reason
    best = brute_force_best(64, lambda dp, tp: (cost(dp, tp).step_s,
                                                cost(dp, tp).memory_bytes_per_rank), 1.1e9)
    assert (fits[0].dp, fits[0].tp) == best
