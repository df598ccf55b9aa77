"""mpifc.sim: predict what a training step costs on a cluster, calibrated on this one.

cluster      Cluster / LinkModel / Thresholds / MeasuredTable, TOML, presets, hostfiles
collectives  closed-form alpha-beta-gamma costs, MPICH-style selection, hierarchy,
             measured tables preferred where they cover the point (CostModel)
engine       Phase / Workload -> StepReport (compute, per-collective, exposed comm)
planner      dp x tp layouts that fit a memory cap, ranked by step time
calibrate    measure this machine under mpiexec (imports mpifc.comm: import it explicitly)
"""
from mpifc.sim.cluster import (Cluster, ClusterError, ComputeRates, LinkModel, MeasuredTable,
                               Thresholds, from_hostfile, load, loads, parse_hostfile, preset,
                               preset_names)
from mpifc.sim.collectives import CostModel
from mpifc.sim.engine import Phase, StepReport, Workload, simulate
from mpifc.sim.planner import (LayoutInfeasible, LayoutResult, brute_force_best,
                               factorisations, plan, workload_cost)

__all__ = ["Cluster", "ClusterError", "ComputeRates", "LinkModel", "MeasuredTable", "Thresholds",
           "from_hostfile", "load", "loads", "parse_hostfile", "preset", "preset_names",
           "CostModel", "Phase", "StepReport", "Workload", "simulate",
           "LayoutInfeasible", "LayoutResult", "brute_force_best", "factorisations", "plan",
           "workload_cost"]
