"""Layout planner: which dp x tp layouts of P ranks fit in memory, fastest first.

The planner knows nothing about layers: it takes a cost function
``cost(dp, tp) -> (step_seconds, memory_bytes_per_rank)`` (normally
:func:`workload_cost`, which builds the workload for a layout and simulates it) and
evaluates it on every factorisation P = dp * tp. A cost function raises
:class:`LayoutInfeasible` for a layout it cannot shard (e.g. tp does not divide the
features); that layout is reported as rejected, with the reason.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

from mpifc.sim.cluster import Cluster
from mpifc.sim.engine import StepReport, Workload, simulate


class LayoutInfeasible(ValueError):
    """The workload cannot be laid out as dp x tp (the message says why)."""


@dataclass
class LayoutResult:
    dp: int
    tp: int
    step_s: float
    memory_bytes_per_rank: float
    fits: bool                      # memory within the cap (and feasible)
    reason: str = ""                # why it does not fit, if it does not
    report: StepReport | None = None


def factorisations(P: int) -> list[tuple[int, int]]:
    """All (dp, tp) with dp * tp == P, tp ascending. O(sqrt P)."""
    if P < 1:
        raise ValueError(f"rank count must be >= 1, got {P}")
    small = [d for d in range(1, math.isqrt(P) + 1) if P % d == 0]
    tps = sorted(set(small + [P // d for d in small]))
    return [(P // t, t) for t in tps]


def plan(P: int, cost: Callable[[int, int], tuple[float, float]],
         memory_cap: float | None = None, *, include_rejected: bool = False,
         ) -> list[LayoutResult]:
    """Evaluate every dp x tp layout of P ranks, drop those over ``memory_cap`` bytes
    per rank (None: no cap), and sort by step time (ties: smaller tp first, since it
    needs fewer tensor-parallel collectives per layer for the same time).

    With ``include_rejected`` the rejected layouts follow the fitting ones, marked
    ``fits=False`` with their reason.
    """
    ok, rejected = [], []
    for dp, tp in factorisations(P):
        try:
            out = cost(dp, tp)
        except LayoutInfeasible as e:
            rejected.append(LayoutResult(dp, tp, math.inf, math.nan, False, str(e)))
            continue
        report = out if isinstance(out, StepReport) else None
        step, mem = ((report.step_s, report.memory_bytes_per_rank) if report else out)
        if memory_cap is not None and mem > memory_cap:
            rejected.append(LayoutResult(dp, tp, step, mem, False,
                                         f"needs {mem:.4g} B per rank > cap {memory_cap:.4g} B",
                                         report))
        else:
            ok.append(LayoutResult(dp, tp, step, mem, True, "", report))
    ok.sort(key=lambda r: (r.step_s, r.tp))
    return ok + (rejected if include_rejected else [])


def brute_force_best(P: int, cost: Callable[[int, int], tuple[float, float]],
                     memory_cap: float | None = None) -> tuple[int, int] | None:
    """Reference for tests: try every (dp, tp) in [1, P]^2, keep dp * tp == P that fit,
    return the fastest (ties: smaller tp). None if nothing fits."""
    best = None
    for dp, tp in itertools.product(range(1, P + 1), repeat=2):
        if dp * tp != P:
            continue
        try:
            step, mem = cost(dp, tp)
        except LayoutInfeasible:
            continue
        if memory_cap is not None and mem > memory_cap:
            continue
        if best is None or (step, tp) < (best[0], best[2]):
            best = (step, dp, tp)
    return None if best is None else (best[1], best[2])


def workload_cost(build: Callable[[int, int], Workload], cluster: Cluster, **simulate_kw
                  ) -> Callable[[int, int], StepReport]:
    """A planner cost function: build the workload for (dp, tp) and simulate it.

    ``build(dp, tp)`` raises LayoutInfeasible where the layout cannot shard the model.
    """
    def cost(dp: int, tp: int) -> StepReport:
        return simulate(build(dp, tp), cluster, dp, tp, **simulate_kw)
    return cost
