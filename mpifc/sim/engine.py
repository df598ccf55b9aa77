"""Step simulator: a Workload on a Cluster at a dp x tp layout -> a StepReport.

A :class:`Workload` is what one rank does in one training step, for one layout: an
ordered list of :class:`Phase` (compute or communication), the global batch, and the
memory a rank holds. The workload builder (from a training config, or a trace replay)
produces it; this module only times it. Closed forms and a few numpy operations over
the rank grid: no loop over ranks, so 16384 ranks cost the same as 4.

Placement: world rank = dp_rank * tp + tp_rank (docs/INTERFACES.md, mpifc.comm.grid),
ranks filled block-wise into nodes of ``cluster.ranks_per_node``. A "tp" group is tp
consecutive ranks, a "dp" group is dp ranks tp apart, "world" is all ranks, "self" is
one rank (no communication).

Schedule: two streams. Compute and blocking communication run in order on the main
stream. An ``overlappable`` communication phase (the data-parallel gradient allreduce
of a bucket) goes to a second stream: it starts when the main stream has reached it
and the previous overlappable phase has finished, so it hides behind the backward
compute that follows it, never more. Only the cluster's ``overlap_efficiency`` share
of it goes there: the rest is paid on the main stream where it is posted (a
shared-memory MPI without a progress engine does the copies and sums on the rank's
own core, inside MPI_Test / MPI_Wait; a negative share means those calls cost more
than the blocking collective). The first "optimizer" phase, and the end of the
step, wait for the second stream. Exposed communication = step time - compute time;
overlapped = total communication - exposed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from mpifc.sim.cluster import Cluster
from mpifc.sim.collectives import ALGORITHMS, ALIASES, HIERARCHICAL_OPS, CostModel

PHASE_KINDS = ("compute", "comm")
GROUPS = ("dp", "tp", "world", "self")
STAGES = ("forward", "backward", "optimizer", "other")
OP_KINDS = ("gemm", "conv", "elementwise")


@dataclass(frozen=True)
class Phase:
    """One step of one rank's training step.

    kind         "compute" or "comm"
    label        what it is, e.g. "fc2.backward.dW" or "fc2.backward.allreduce(dx)"
    op           comm: collective name (allreduce, allgather(v), reduce_scatter, bcast,
                 reduce, scatter(v), gather(v), alltoall, sendrecv, barrier)
    group        comm: "dp" | "tp" | "world" | "self"
    bytes        comm: the n of ``op`` (docs/simulator.md: vector bytes for allreduce,
                 bcast, reduce; total bytes for allgather, reduce_scatter, scatter,
                 gather, alltoall; bytes each way for sendrecv);
                 compute: bytes read + written (used by op_kind "elementwise")
    flops        compute: floating-point operations on this rank (gemm, conv)
    op_kind      compute: "gemm" | "conv" | "elementwise"
    overlappable comm: may run behind later compute (DP gradient buckets)
    stage        "forward" | "backward" | "optimizer" | "other"
    repeat       the phase happens this many times in a row (e.g. per micro-batch)
    calls        compute: NumPy / Python calls the phase makes (each costs the
                 cluster's ``call_s``; for element-wise work bytes / calls is the size
                 of one call, which picks the rate on ``elementwise_curve``)
    rows         compute: innermost rows of its strided passes (each costs ``row_s``)
    stream       compute: an in-place streaming update (zero_grad, optimizer, clipping),
                 priced on ``elementwise_curve``; False: a layer kernel, priced on the
                 cluster's ``kernel_curve`` where it has one
    aspect       compute, gemm: min(m, k, n) / (m k n)^(1/3) of its products (1: square;
                 see ComputeRates.gemm_aspect_curve)
    reduce_calls compute: small reduction / indexing calls (a loss and its metrics), each
                 at the cluster's ``reduce_call_s``
    masked       compute: elements of masked stores with a data-dependent mask (max-pool
                 forward), each at the cluster's ``masked_s``
    """

    kind: str
    label: str
    op: str = ""
    group: str = "world"
    bytes: float = 0.0
    flops: float = 0.0
    op_kind: str = "gemm"
    overlappable: bool = False
    stage: str = "forward"
    repeat: int = 1
    calls: float = 0.0
    rows: float = 0.0
    stream: bool = False
    aspect: float = 1.0
    reduce_calls: float = 0.0
    masked: float = 0.0

    def __post_init__(self):
        where = f"phase {self.label!r}"
        if self.kind not in PHASE_KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {PHASE_KINDS}")
        if self.stage not in STAGES:
            raise ValueError(f"{where}: stage {self.stage!r} is not one of {STAGES}")
        if min(self.bytes, self.flops, self.repeat, self.calls, self.rows, self.reduce_calls,
               self.masked) < 0:
            raise ValueError(f"{where}: bytes, flops, repeat, calls, reduce_calls, rows and "
                             "masked must be >= 0")
        if not 0 < self.aspect <= 1:
            raise ValueError(f"{where}: aspect must be in (0, 1], got {self.aspect}")
        if self.kind == "comm":
            base = ALIASES.get(self.op, self.op)
            if base not in ALGORITHMS:
                raise ValueError(f"{where}: unknown collective {self.op!r}")
            if self.group not in GROUPS:
                raise ValueError(f"{where}: group {self.group!r} is not one of {GROUPS}")
        else:
            if self.op_kind not in OP_KINDS:
                raise ValueError(f"{where}: op_kind {self.op_kind!r} is not one of {OP_KINDS}")
            if self.overlappable:
                raise ValueError(f"{where}: only communication phases can be overlappable")


@dataclass
class Workload:
    """One rank's training step at one layout.

    phases                 in program order
    samples_per_step       global batch (samples consumed by all dp replicas per step)
    memory_bytes_per_rank  parameters + gradients + optimizer state + activations +
                           communication buffers held by one rank
    dp, tp                 the layout the phases were computed for
    """

    name: str
    phases: list[Phase]
    samples_per_step: int
    memory_bytes_per_rank: float
    dp: int
    tp: int

    def __post_init__(self):
        if self.dp < 1 or self.tp < 1:
            raise ValueError(f"workload {self.name!r}: dp and tp must be >= 1")
        if self.samples_per_step < 1:
            raise ValueError(f"workload {self.name!r}: samples_per_step must be >= 1")


@dataclass(frozen=True)
class GroupShape:
    """How one communicator of a layout lies on the nodes (worst group of its kind).

    size        ranks per group (p)
    local       most members of one group on one node (q)
    nodes       most nodes one group spans (m)
    node_ranks  ranks of the job on a full node
    consecutive members are consecutive world ranks (tp, world)
    """

    size: int
    local: int
    nodes: int
    node_ranks: int
    consecutive: bool

    def nic_share(self, op: str, hierarchical: bool) -> float:
        """Ranks of one node that send off-node at once in this phase.

        Node-aware collectives send from one leader per group and node: node_ranks/local.
        Flat collectives may send from every rank: node_ranks. A neighbour exchange in
        consecutive ranks crosses a node boundary from one rank per direction: 1.
        """
        if self.nodes <= 1:
            return 1.0
        base = ALIASES.get(op, op)
        if base == "sendrecv" and self.consecutive:
            return 1.0
        if hierarchical and base in HIERARCHICAL_OPS and self.local > 1:
            return self.node_ranks / self.local
        return float(self.node_ranks)


@lru_cache(maxsize=4096)
def group_shape(group: str, dp: int, tp: int, ranks_per_node: int) -> GroupShape:
    """Shape of the dp, tp, world or self groups of a dp x tp layout (see GroupShape)."""
    P = dp * tp
    node_ranks = min(P, ranks_per_node)
    if group == "self":
        return GroupShape(1, 1, 1, node_ranks, True)
    if group == "world":
        return GroupShape(P, node_ranks, -(-P // ranks_per_node), node_ranks, True)
    if group == "tp":
        size, consecutive = tp, True
        if ranks_per_node % tp == 0:      # groups tile nodes: never straddle
            return GroupShape(tp, tp, 1, node_ranks, True)
        if tp % ranks_per_node == 0:      # groups are whole nodes
            return GroupShape(tp, ranks_per_node, tp // ranks_per_node, node_ranks, True)
        members = np.arange(P).reshape(dp, tp)          # row = one tp group
    elif group == "dp":
        size, consecutive = dp, False
        members = np.arange(P).reshape(dp, tp).T        # row = one dp group
    else:
        raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")
    if size == 1:
        return GroupShape(1, 1, 1, node_ranks, consecutive)
    # general case, vectorised over all groups: (group, node) pairs and their counts
    node = members // ranks_per_node
    nnodes = -(-P // ranks_per_node)
    keys = np.arange(members.shape[0])[:, None] * nnodes + node
    uniq, counts = np.unique(keys, return_counts=True)
    local = int(counts.max())
    spans = int(np.bincount(uniq // nnodes).max())
    return GroupShape(size, local, spans, node_ranks, consecutive)


@dataclass
class PhaseTime:
    label: str
    kind: str
    op: str
    group: str
    seconds: float
    algorithm: str
    start: float
    overlapped: bool


@dataclass
class StepReport:
    """Predicted cost of one step at one layout (seconds unless named otherwise)."""

    workload: str
    cluster: str
    dp: int
    tp: int
    ranks: int
    nodes: int
    compute_s: float
    compute_by_kind: dict[str, float]
    comm_s: float
    comm_by_op: dict[str, float]
    exposed_comm_s: float
    overlapped_comm_s: float
    step_s: float
    samples_per_s: float
    memory_bytes_per_rank: float
    phases: list[PhaseTime] = field(default_factory=list)
    beyond_cluster: bool = False   # more ranks than the described machine holds


def simulate(workload: Workload, cluster: Cluster, dp: int | None = None,
             tp: int | None = None, *, overlap: bool = True,
             model: CostModel | None = None) -> StepReport:
    """Time one training step of ``workload`` on ``cluster`` at layout dp x tp.

    dp, tp default to the workload's own layout and must match it (the phases' bytes
    and FLOPs are per rank for that layout). ``overlap=False`` runs every
    communication on the main stream (no hiding behind compute).
    """
    dp = workload.dp if dp is None else dp
    tp = workload.tp if tp is None else tp
    if (dp, tp) != (workload.dp, workload.tp):
        raise ValueError(f"workload {workload.name!r} was built for dp={workload.dp} "
                         f"tp={workload.tp}, not dp={dp} tp={tp}")
    model = model or CostModel(cluster)
    rpn = cluster.ranks_per_node
    hier = cluster.thresholds.hierarchical
    P = dp * tp

    main = side = 0.0            # stream clocks
    waited_for_optimizer = False
    compute_by_kind = {k: 0.0 for k in OP_KINDS}
    comm_by_op: dict[str, float] = {}
    times: list[PhaseTime] = []
    for ph in workload.phases:
        if ph.repeat == 0:
            continue
        if ph.stage == "optimizer" and not waited_for_optimizer:
            main = max(main, side)
            waited_for_optimizer = True
        if ph.kind == "compute":
            d = cluster.compute.seconds(ph.op_kind, ph.flops, ph.bytes, ph.calls,
                                        ph.rows, ph.stream, ph.aspect,
                                        ph.reduce_calls, ph.masked) * ph.repeat
            compute_by_kind[ph.op_kind] += d
            times.append(PhaseTime(ph.label, "compute", ph.op_kind, "self", d, ph.op_kind,
                                   main, False))
            main += d
            continue
        shape = group_shape(ph.group, dp, tp, rpn)
        c = model.cost(ph.op, ph.bytes, shape.size, local=shape.local, nodes=shape.nodes,
                       nic_share=shape.nic_share(ph.op, hier))
        d = c.seconds * ph.repeat
        comm_by_op[ph.op] = comm_by_op.get(ph.op, 0.0) + d
        if ph.overlappable and overlap:
            # the share the machine cannot hide is paid on the main stream (the rank's
            # core does it inside its MPI calls); the rest runs beside the compute
            f = cluster.overlap_efficiency
            if f < 1.0:
                times.append(PhaseTime(ph.label + ".unhidden", "comm", ph.op, ph.group,
                                       (1.0 - f) * d, c.algorithm, main, False))
                main += (1.0 - f) * d
            if f > 0.0:
                start = max(main, side)
                side = start + f * d
                times.append(PhaseTime(ph.label, "comm", ph.op, ph.group, f * d, c.algorithm,
                                       start, True))
        else:
            times.append(PhaseTime(ph.label, "comm", ph.op, ph.group, d, c.algorithm, main, False))
            main += d
    step = max(main, side)
    compute = sum(compute_by_kind.values())
    comm = sum(comm_by_op.values())
    exposed = max(step - compute, 0.0)
    return StepReport(
        workload=workload.name, cluster=cluster.name, dp=dp, tp=tp, ranks=P,
        nodes=-(-P // rpn), compute_s=compute, compute_by_kind=compute_by_kind,
        comm_s=comm, comm_by_op=comm_by_op, exposed_comm_s=exposed,
        overlapped_comm_s=max(comm - exposed, 0.0), step_s=step,
        samples_per_s=workload.samples_per_step / step if step > 0 else float("inf"),
        memory_bytes_per_rank=workload.memory_bytes_per_rank, phases=times,
        beyond_cluster=P > cluster.size)
