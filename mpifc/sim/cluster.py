"""Cluster description: links, compute rates, algorithm thresholds, measured tables.

A :class:`Cluster` is everything the simulator knows about a machine. It is read from
and written to TOML (see ``docs/simulator.md`` for the schema), built from a hostfile
plus a network preset (:func:`from_hostfile`), or measured by ``mpifc calibrate``.

Symbols used throughout ``mpifc.sim``: n bytes, p ranks in a group,
alpha(n) latency in s, beta(n) = 1 / bandwidth(n) in s/byte, gamma = 1 / reduction
rate in s/byte.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import numpy as np

from mpifc.errors import UserError

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 needs the tomli backport
    try:
        import tomli as _toml
    except ModuleNotFoundError:
        _toml = None


# --------------------------------------------------------------------------------------
# links
# --------------------------------------------------------------------------------------
@dataclass
class LinkModel:
    """Point-to-point cost of one message, piecewise by message size.

    ``points`` are breakpoints ``(bytes, latency_s, bandwidth_Bps)``, sorted by size.
    Between breakpoints latency and bandwidth are interpolated linearly in log(bytes);
    outside the range the nearest breakpoint holds. The time of one n-byte message is
    ``alpha(n) + n * beta(n)`` with ``alpha = latency`` and ``beta = 1 / bandwidth``.
    """

    points: list[tuple[float, float, float]]

    def __post_init__(self):
        if not self.points:
            raise ValueError("LinkModel needs at least one (bytes, latency_s, bandwidth_Bps) point")
        pts = sorted((float(b), float(l), float(bw)) for b, l, bw in self.points)
        for b, l, bw in pts:
            if b < 0 or l < 0 or not bw > 0:
                raise ValueError(f"bad link point ({b}, {l}, {bw}): need bytes >= 0, "
                                 "latency >= 0, bandwidth > 0")
        sizes = [b for b, _, _ in pts]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"duplicate message sizes in link points {sizes}")
        self.points = pts
        # log2(bytes + 1) keeps size 0 usable as a breakpoint
        self._x = np.log2(np.array(sizes) + 1.0)
        self._lat = np.array([l for _, l, _ in pts])
        self._bw = np.array([bw for _, _, bw in pts])

    @classmethod
    def constant(cls, latency_s: float, bandwidth_Bps: float) -> "LinkModel":
        """A link with one alpha and one beta for every message size."""
        return cls([(0, latency_s, bandwidth_Bps)])

    def alpha(self, n: float) -> float:
        """Latency in seconds of an n-byte message."""
        if len(self.points) == 1:
            return float(self._lat[0])
        return float(np.interp(math.log2(max(n, 0.0) + 1.0), self._x, self._lat))

    def beta(self, n: float) -> float:
        """Seconds per byte of an n-byte message (1 / bandwidth)."""
        if len(self.points) == 1:
            return 1.0 / float(self._bw[0])
        return 1.0 / float(np.interp(math.log2(max(n, 0.0) + 1.0), self._x, self._bw))

    def time(self, n: float) -> float:
        """alpha(n) + n * beta(n): one n-byte message, sender to receiver."""
        return self.alpha(n) + n * self.beta(n)

    @classmethod
    def from_pingpong(cls, sizes, seconds) -> "LinkModel":
        """Breakpoints that reproduce measured one-way times t(n).

        alpha is the fastest time measured (the latency floor, normally that of the
        smallest message); at each size the effective bandwidth is
        ``n / (t(n) - alpha)``, so ``time(n) == t(n)`` at every measured size where
        t(n) > alpha. Where t(n) == alpha (tiny messages) the largest effective
        bandwidth measured is used, which adds n / bandwidth to the measured time:
        nanoseconds at those sizes.
        """
        sizes = [float(s) for s in sizes]
        seconds = [float(t) for t in seconds]
        if len(sizes) != len(seconds) or not sizes:
            raise ValueError("from_pingpong needs equal, non-empty lists of sizes and times")
        order = sorted(range(len(sizes)), key=sizes.__getitem__)
        sizes = [sizes[i] for i in order]
        seconds = [seconds[i] for i in order]
        alpha = min(seconds)
        bws = [n / (t - alpha) if t > alpha and n > 0 else None for n, t in zip(sizes, seconds)]
        known = [b for b in bws if b is not None]
        fallback = max(known) if known else 1e12
        return cls([(n, alpha, b if b is not None else fallback) for n, b in zip(sizes, bws)])


# --------------------------------------------------------------------------------------
# compute rates, thresholds, measured tables
# --------------------------------------------------------------------------------------
@dataclass
class ComputeRates:
    """Sustained compute rates of one rank.

    gemm_gflops / conv_gflops: GFLOP/s of matrix products and convolutions;
    elementwise_gbps: GB/s of memory-bound element-wise kernels (bytes read + written)
    on arrays far larger than the caches.
    gemm_curve / conv_curve (optional): measured ``(flops, gflops)`` points; where
    present the rate of a phase is interpolated in log(flops) (clamped at the ends),
    because small products run far below the large-matrix rate.
    elementwise_curve (optional): measured ``(bytes per call, GB/s)`` points of an
    element-wise kernel, net of the per-call cost: small arrays live in the caches and
    stream faster than ``elementwise_gbps``. Used for a phase that says how many calls
    it makes (its bytes / calls is the size of one call), interpolated in log(bytes).
    kernel_curve (optional): the same for the layers' own element-wise kernels, measured
    on the ReLU forward + backward pair (np.maximum, a comparison, a multiply by a bool
    mask) and priced with the workload's pass counts: these run at under half the rate
    of a plain add on cached arrays. Used for element-wise phases of the layers (forward,
    backward, loss); the streaming updates (zero_grad, optimizer, clipping: phases marked
    ``stream``) keep ``elementwise_curve``.
    gemm_aspect_curve (optional): measured ``(aspect, efficiency)`` points of thin
    products. The aspect of an (m x k) @ (k x n) product is its smallest dimension over
    the side of the cube of the same volume, min(m, k, n) / (m k n)^(1/3): 1 for a
    square, small for a batch of 8 rows through a 512-wide layer. The efficiency is the
    rate of such a product over ``gemm_curve``'s rate at the same FLOPs (BLAS tiles and
    packing are sized for wide operands): a gemm phase with an aspect runs at
    rate(flops) * efficiency(aspect), interpolated in log(aspect), 1 at aspect >= 1 and
    clamped below the smallest measured aspect.
    call_s: seconds of one NumPy / Python call beyond its bytes or FLOPs (argument
    parsing, dispatch, allocation): a phase of ``calls`` calls pays ``calls * call_s``.
    reduce_call_s (optional): seconds of one small reduction or indexing call (a max or
    argmax along an axis, a mean, nonzero, fancy indexing, np.full) on a few hundred
    elements, the calls a loss and its metrics make: two to four times ``call_s``
    here. A phase's ``reduce_calls`` pay it (``call_s`` where it is 0).
    masked_s (optional): seconds per element of a masked store whose mask follows the
    data (``np.putmask``, the max-pool argmax): the store is a branch per element, and
    a data-dependent mask mispredicts about half of them (5.4 ns per element here
    with fresh masks, 1.6-1.7 ns with a mask the branch predictor has learned).
    A phase's ``masked`` elements pay it.
    row_s: seconds per innermost row of a strided pass (NumPy's iterator restarts its
    inner loop on every row of a view whose rows are not contiguous with each other,
    e.g. a pooling window or an im2col offset with rows of a few elements).
    """

    gemm_gflops: float = 10.0
    conv_gflops: float = 5.0
    elementwise_gbps: float = 5.0
    gemm_curve: list[tuple[float, float]] = field(default_factory=list)
    conv_curve: list[tuple[float, float]] = field(default_factory=list)
    elementwise_curve: list[tuple[float, float]] = field(default_factory=list)
    kernel_curve: list[tuple[float, float]] = field(default_factory=list)
    gemm_aspect_curve: list[tuple[float, float]] = field(default_factory=list)
    call_s: float = 0.0
    row_s: float = 0.0
    reduce_call_s: float = 0.0
    masked_s: float = 0.0

    def __post_init__(self):
        for name in ("gemm_gflops", "conv_gflops", "elementwise_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"compute rate {name} must be > 0")
        for name in ("call_s", "row_s", "reduce_call_s", "masked_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"compute {name} must be >= 0")
            setattr(self, name, float(getattr(self, name)))
        for name in ("gemm_curve", "conv_curve", "elementwise_curve", "kernel_curve",
                     "gemm_aspect_curve"):
            pts = sorted((float(f), float(r)) for f, r in getattr(self, name))
            if any(f <= 0 or r <= 0 for f, r in pts):
                raise ValueError(f"{name}: sizes and rates must be > 0")
            setattr(self, name, pts)

    @staticmethod
    def _rate(curve, default, x):
        if not curve or x <= 0:
            return default
        xs = np.log([f for f, _ in curve])
        return float(np.interp(math.log(x), xs, [r for _, r in curve]))

    def elementwise_rate(self, bytes_per_call: float) -> float:
        """GB/s of an element-wise call moving ``bytes_per_call`` bytes (the curve, else
        the streaming rate)."""
        return self._rate(self.elementwise_curve, self.elementwise_gbps, bytes_per_call)

    def aspect_efficiency(self, aspect: float) -> float:
        """Share of ``gemm_curve``'s rate a product of this aspect reaches (1 without a
        measured curve, and for aspect >= 1)."""
        if not self.gemm_aspect_curve or aspect >= 1.0:
            return 1.0
        pts = self.gemm_aspect_curve + [(1.0, 1.0)]
        return self._rate(pts, 1.0, max(aspect, 1e-6))

    def seconds(self, op_kind: str, flops: float = 0.0, nbytes: float = 0.0,
                calls: float = 0.0, rows: float = 0.0, stream: bool = True,
                aspect: float = 1.0, reduce_calls: float = 0.0,
                masked: float = 0.0) -> float:
        """Time of one compute phase.

        gemm:         over + flops / (rate(flops) * efficiency(aspect))
        conv:         over + flops / rate(flops)
        elementwise:  over + rows * row_s + masked * masked_s
                      + bytes / rate(bytes / (calls + reduce_calls))
        over = calls * call_s + reduce_calls * reduce_call_s (call_s where that is 0);
        rate is ``kernel_curve`` for a layer kernel (``stream`` False) when the
        cluster has one, else ``elementwise_curve``. A phase without calls uses the
        streaming rate ``elementwise_gbps`` (the size of one call is unknown) and pays
        no per-call cost, as before these terms.
        """
        over = calls * self.call_s + reduce_calls * (self.reduce_call_s or self.call_s)
        calls = calls + reduce_calls
        if op_kind == "gemm":
            rate = self._rate(self.gemm_curve, self.gemm_gflops, flops)
            return over + flops / (rate * self.aspect_efficiency(aspect) * 1e9)
        if op_kind == "conv":
            return over + flops / (self._rate(self.conv_curve, self.conv_gflops, flops) * 1e9)
        if op_kind == "elementwise":
            if calls <= 0:
                rate = self.elementwise_gbps
            elif not stream and self.kernel_curve:
                rate = self._rate(self.kernel_curve, self.elementwise_gbps, nbytes / calls)
            else:
                rate = self.elementwise_rate(nbytes / calls)
            return over + rows * self.row_s + masked * self.masked_s + nbytes / (rate * 1e9)
        raise ValueError(f"unknown compute op_kind {op_kind!r}; expected gemm, conv or elementwise")


@dataclass
class Thresholds:
    """Collective algorithm switch points, in bytes (and ranks for bcast_min_procs).

    Each default mirrors the MPICH control variable named in the comment (values as
    documented in MPICH's generated ``mpich_cvars.c``, MPICH 3.x "default" selection,
    which MPICH 4 keeps as its fallback). ``algorithms`` forces an algorithm per op,
    e.g. ``{"allreduce": "ring"}``; ``hierarchical`` mirrors
    MPIR_CVAR_ENABLE_SMP_COLLECTIVES (node-aware collectives when ranks span nodes).
    """

    allreduce_short_msg_size: int = 2048       # MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE
    reduce_short_msg_size: int = 2048          # MPIR_CVAR_REDUCE_SHORT_MSG_SIZE
    bcast_short_msg_size: int = 12288          # MPIR_CVAR_BCAST_SHORT_MSG_SIZE
    bcast_long_msg_size: int = 524288          # MPIR_CVAR_BCAST_LONG_MSG_SIZE
    bcast_min_procs: int = 8                   # MPIR_CVAR_BCAST_MIN_PROCS
    allgather_short_msg_size: int = 81920      # MPIR_CVAR_ALLGATHER_SHORT_MSG_SIZE
    allgather_long_msg_size: int = 524288      # MPIR_CVAR_ALLGATHER_LONG_MSG_SIZE
    redscat_commutative_long_msg_size: int = 524288  # MPIR_CVAR_REDSCAT_COMMUTATIVE_LONG_MSG_SIZE
    alltoall_short_msg_size: int = 256         # MPIR_CVAR_ALLTOALL_SHORT_MSG_SIZE
    alltoall_medium_msg_size: int = 32768      # MPIR_CVAR_ALLTOALL_MEDIUM_MSG_SIZE
    alltoall_bruck_min_procs: int = 8          # the "comm_size >= 8" test in MPIR_Alltoall
    hierarchical: bool = True                  # MPIR_CVAR_ENABLE_SMP_COLLECTIVES
    algorithms: dict[str, str] = field(default_factory=dict)


@dataclass
class MeasuredTable:
    """Measured times of one collective at one group size: seconds(bytes).

    ``nodes`` is how many nodes the measured group spanned (1: all ranks on one node).
    Interpolation is linear in log(bytes)-log(seconds), only inside the measured range.
    """

    op: str
    group_size: int
    nodes: int
    bytes: list[float]
    seconds: list[float]

    def __post_init__(self):
        if len(self.bytes) != len(self.seconds) or len(self.bytes) < 1:
            raise ValueError(f"measured table {self.op}/p={self.group_size}: need equal, non-empty "
                             "bytes and seconds lists")
        order = np.argsort(self.bytes)
        b = np.asarray(self.bytes, dtype=float)[order]
        s = np.asarray(self.seconds, dtype=float)[order]
        if np.any(b <= 0) or np.any(s <= 0):
            raise ValueError(f"measured table {self.op}/p={self.group_size}: sizes and times "
                             "must be positive")
        self.bytes = b.tolist()
        self.seconds = s.tolist()
        self._lb = np.log(b)
        self._ls = np.log(s)

    def covers(self, nbytes: float) -> bool:
        return self.bytes[0] <= nbytes <= self.bytes[-1]

    def __call__(self, nbytes: float) -> float:
        """Interpolated time; raises outside the measured range (caller falls back)."""
        if not self.covers(nbytes):
            raise ValueError(f"{nbytes} B is outside the measured range "
                             f"[{self.bytes[0]}, {self.bytes[-1]}] of {self.op}/p={self.group_size}")
        return float(np.exp(np.interp(math.log(nbytes), self._lb, self._ls)))


# --------------------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """A machine: nodes x ranks_per_node ranks, two link models, rates, thresholds.

    Ranks are placed block-wise: world rank r lives on node ``r // ranks_per_node``.
    ``reduction_Bps`` is the rate of a local element-wise sum (bytes of one operand
    per second), so gamma = 1 / reduction_Bps. ``memory_per_rank_bytes`` (optional) is
    the default memory cap for the layout planner.

    ``overlap_efficiency`` (-1..1) is the share of a non-blocking collective's time that
    runs while the rank computes. 1: it is all hidden (a NIC or a progress engine moves
    the data; the default of hand-written clusters and presets). 0: the rank's own core
    does the work inside its MPI_Test / MPI_Wait calls, so posting early hides nothing
    (shared-memory MPI on busy cores). Below 0: posting, testing and waiting cost the
    rank more than the blocking call would (-0.5: half as much again), as ``mpifc
    calibrate`` measured on one node here with MPICH.
    """

    name: str
    nodes: int
    ranks_per_node: int
    intra: LinkModel
    inter: LinkModel
    reduction_Bps: float
    compute: ComputeRates = field(default_factory=ComputeRates)
    thresholds: Thresholds = field(default_factory=Thresholds)
    measured: list[MeasuredTable] = field(default_factory=list)
    memory_per_rank_bytes: float | None = None
    hosts: list[tuple[str, int]] = field(default_factory=list)
    source: str = ""
    notes: str = ""
    overlap_efficiency: float = 1.0

    def __post_init__(self):
        self.overlap_efficiency = float(self.overlap_efficiency)
        if not -1.0 <= self.overlap_efficiency <= 1.0:
            raise ValueError(f"cluster {self.name!r}: overlap_efficiency must be in [-1, 1] "
                             f"(got {self.overlap_efficiency})")
        if self.nodes < 1 or self.ranks_per_node < 1:
            raise ValueError(f"cluster {self.name!r}: nodes and ranks_per_node must be >= 1 "
                             f"(got {self.nodes}, {self.ranks_per_node})")
        if not self.reduction_Bps > 0:
            raise ValueError(f"cluster {self.name!r}: reduction_Bps must be > 0")

    @property
    def size(self) -> int:
        """Ranks the described machine holds (the simulator may extrapolate beyond)."""
        return self.nodes * self.ranks_per_node

    @property
    def gamma(self) -> float:
        """Seconds per byte of a local sum."""
        return 1.0 / self.reduction_Bps

    def lookup_measured(self, op: str, group_size: int, nodes: int) -> MeasuredTable | None:
        for t in self.measured:
            if t.op == op and t.group_size == group_size and t.nodes == nodes:
                return t
        return None

    # ---- TOML -----------------------------------------------------------------------
    def to_toml(self) -> str:
        """The cluster as TOML text; :func:`loads` reads it back unchanged."""
        out = [f"# mpifc cluster description ({self.source or 'hand written'})"]
        if self.notes:
            out += ["# " + line for line in self.notes.splitlines()]
        out += [f"name = {_tq(self.name)}", f"source = {_tq(self.source)}",
                f"notes = {_tq(self.notes)}",
                f"nodes = {self.nodes}", f"ranks_per_node = {self.ranks_per_node}",
                f"reduction_Bps = {_tf(self.reduction_Bps)}",
                f"overlap_efficiency = {_tf(self.overlap_efficiency)}"]
        if self.memory_per_rank_bytes is not None:
            out.append(f"memory_per_rank_bytes = {_tf(self.memory_per_rank_bytes)}")
        for key, link in (("intra", self.intra), ("inter", self.inter)):
            out += ["", f"[{key}]", "# (bytes, latency_s, bandwidth_Bps) breakpoints", "points = ["]
            out += [f"  [{_tf(b)}, {_tf(l)}, {_tf(bw)}]," for b, l, bw in link.points]
            out.append("]")
        out += ["", "[compute]"]
        for f in fields(ComputeRates):
            v = getattr(self.compute, f.name)
            if isinstance(v, list):
                if v:
                    out.append(f"{f.name} = [" + ", ".join(f"[{_tf(a)}, {_tf(b)}]" for a, b in v) + "]")
            else:
                out.append(f"{f.name} = {_tf(v)}")
        out += ["", "[thresholds]"]
        for f in fields(Thresholds):
            if f.name == "algorithms":
                continue
            v = getattr(self.thresholds, f.name)
            out.append(f"{f.name} = {'true' if v is True else 'false' if v is False else v}")
        if self.thresholds.algorithms:
            out += ["", "[thresholds.algorithms]"]
            out += [f"{k} = {_tq(v)}" for k, v in sorted(self.thresholds.algorithms.items())]
        for h, slots in self.hosts:
            out += ["", "[[hosts]]", f"name = {_tq(h)}", f"slots = {slots}"]
        for t in self.measured:
            out += ["", "[[measured]]", f"op = {_tq(t.op)}", f"group_size = {t.group_size}",
                    f"nodes = {t.nodes}",
                    "bytes = [" + ", ".join(_tf(b) for b in t.bytes) + "]",
                    "seconds = [" + ", ".join(_tf(s) for s in t.seconds) + "]"]
        return "\n".join(out) + "\n"

    def save(self, path) -> None:
        """Write the TOML file (via a temporary file, so a crash leaves no half file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_toml())
        tmp.replace(path)


def median_of(clusters) -> Cluster:
    """One cluster from several calibrations of the same machine: the median of every
    measured figure (link latencies and bandwidths, the reduction rate, each point of
    the compute curves, the per-call and per-row costs, each measured collective time,
    the overlap efficiency).

    Repeated calibrations spread over time give a figure that one burst of load from
    elsewhere (a busy neighbour on a shared or virtual machine) cannot move. They must
    measure the same things (same mode and sizes); names, hosts, thresholds and notes
    come from the first. For an odd count the median of a rate is the rate of the
    median time, so it does not matter which of the two is kept.
    """
    return _combine(clusters, "median_of", _median, _median)


def fastest_of(clusters) -> Cluster:
    """One cluster from several calibrations of the same machine: the fastest value of
    every measured figure (the least latency, time and per-call cost, the most bandwidth
    and rate), and the median overlap efficiency (a share, not a speed).

    For a machine whose speed comes and goes with other tenants' work (a virtual
    machine): the fastest round of each figure describes it without that load, the
    way timeit reports the best of its repeats. Same rules as :func:`median_of`."""
    return _combine(clusters, "fastest_of", min, max)


def _median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


def _combine(clusters, name, pick_time, pick_rate) -> Cluster:
    """Merge calibrations figure by figure: ``pick_time`` over times (latencies, per-call
    costs, collective times), ``pick_rate`` over rates (bandwidths, compute rates)."""
    cs = list(clusters)
    if not cs:
        raise ValueError(f"{name} needs at least one cluster")
    first = cs[0]

    def same(what, key):
        vals = [key(c) for c in cs]
        if any(v != vals[0] for v in vals[1:]):
            raise ValueError(f"{name}: the calibrations differ in {what} "
                             f"({vals[0]!r} vs {next(v for v in vals if v != vals[0])!r}); "
                             "only repeats of the same calibration can be merged")

    def t(xs):
        return float(pick_time([float(x) for x in xs]))

    def r(xs):
        return float(pick_rate([float(x) for x in xs]))

    same("layout", lambda c: (c.nodes, c.ranks_per_node))
    links = {}
    for key in ("intra", "inter"):
        same(f"{key} link sizes", lambda c: [b for b, _, _ in getattr(c, key).points])
        pts = [getattr(c, key).points for c in cs]
        links[key] = LinkModel([(b, t([p[i][1] for p in pts]), r([p[i][2] for p in pts]))
                                for i, (b, _, _) in enumerate(pts[0])])
    rates = {}
    for f in fields(ComputeRates):
        v = getattr(first.compute, f.name)
        pick = t if f.name.endswith("_s") else r            # call_s, row_s are times
        if isinstance(v, list):
            same(f"compute {f.name} sizes", lambda c: [x for x, _ in getattr(c.compute, f.name)])
            curves = [getattr(c.compute, f.name) for c in cs]
            rates[f.name] = [(x, pick([cv[i][1] for cv in curves])) for i, (x, _) in enumerate(v)]
        else:
            rates[f.name] = pick([getattr(c.compute, f.name) for c in cs])
    key_of = lambda c: (c.op, c.group_size, c.nodes, tuple(c.bytes))   # noqa: E731
    same("measured collective tables", lambda c: [key_of(m) for m in c.measured])
    measured = [MeasuredTable(m.op, m.group_size, m.nodes, m.bytes,
                              [t([c.measured[k].seconds[i] for c in cs])
                               for i in range(len(m.bytes))])
                for k, m in enumerate(first.measured)]
    return Cluster(name=first.name, nodes=first.nodes, ranks_per_node=first.ranks_per_node,
                   intra=links["intra"], inter=links["inter"],
                   reduction_Bps=r([c.reduction_Bps for c in cs]),
                   compute=ComputeRates(**rates), thresholds=first.thresholds,
                   measured=measured, memory_per_rank_bytes=first.memory_per_rank_bytes,
                   hosts=list(first.hosts), source=first.source, notes=first.notes,
                   overlap_efficiency=_median([c.overlap_efficiency for c in cs]))


def _tf(x: float) -> str:
    """A TOML number: integers stay integers, floats use repr (valid TOML, round-trips)."""
    if isinstance(x, bool):
        raise TypeError("bool is not a number here")
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"
    return repr(x)


def _tq(s: str) -> str:
    """A TOML basic string (JSON string escapes are a subset TOML accepts)."""
    return json.dumps(str(s), ensure_ascii=True)


_TOP_KEYS = {"name", "source", "notes", "nodes", "ranks_per_node", "reduction_Bps",
             "overlap_efficiency",
             "memory_per_rank_bytes", "intra", "inter", "compute", "thresholds", "hosts",
             "measured"}


class ClusterError(UserError, ValueError):
    """A cluster description (TOML file, preset or hostfile) that cannot be used; the
    message names the file and the key or line."""


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v, key: str, where: str) -> int:
    """A positive integer (a float that is a whole number is accepted)."""
    if not _is_num(v) or v != int(v) or int(v) < 1:
        raise ClusterError(f"{where}: {key} must be a positive integer, got {v!r}")
    return int(v)


def _rate(v, key: str, where: str, *, low: float = 0.0, strict: bool = True) -> float:
    if not _is_num(v) or (v <= low if strict else v < low):
        rel = ">" if strict else ">="
        raise ClusterError(f"{where}: {key} must be a finite number {rel} {low:g}, got {v!r}")
    return float(v)


def _table(d: dict, key: str, where: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise ClusterError(f"{where}: {key} must be a table ([{key}]), got {v!r}")
    return v


def _list(v, key: str, where: str) -> list:
    if not isinstance(v, list):
        raise ClusterError(f"{where}: {key} must be a list, got {v!r}")
    return v


def _points(d: dict, link: str, where: str) -> "LinkModel":
    t = _table(d, link, where)
    if set(t) - {"points"}:
        raise ClusterError(f"{where}: unknown [{link}] keys {sorted(set(t) - {'points'})}")
    if "points" not in t:
        raise ClusterError(f"{where}: missing key '{link}.points' (a list of [bytes, "
                           "latency_s, bandwidth_Bps])")
    pts = []
    for i, p in enumerate(_list(t["points"], f"{link}.points", where)):
        if not isinstance(p, list) or len(p) != 3 or not all(_is_num(x) for x in p):
            raise ClusterError(f"{where}: {link}.points[{i}] must be [bytes, latency_s, "
                               f"bandwidth_Bps] (3 finite numbers), got {p!r}")
        pts.append(tuple(p))
    try:
        return LinkModel(pts)
    except ValueError as e:
        raise ClusterError(f"{where}: {link}.points: {e}") from None


def _compute(d: dict, where: str) -> "ComputeRates":
    comp = _table(d, "compute", where)
    known = {f.name for f in fields(ComputeRates)}
    bad = set(comp) - known
    if bad:
        raise ClusterError(f"{where}: unknown [compute] keys {sorted(bad)}")
    kw = {}
    for k, v in comp.items():
        if isinstance(v, list):
            for i, x in enumerate(v):
                if not isinstance(x, list) or len(x) != 2 or not all(_is_num(y) for y in x):
                    raise ClusterError(f"{where}: compute.{k}[{i}] must be [size, rate] (2 "
                                       f"finite numbers), got {x!r}")
            kw[k] = [tuple(x) for x in v]
        else:
            kw[k] = _rate(v, f"compute.{k}", where, strict=False)
    try:
        return ComputeRates(**kw)
    except ValueError as e:
        raise ClusterError(f"{where}: [compute]: {e}") from None


def _thresholds(d: dict, where: str) -> "Thresholds":
    thr = dict(_table(d, "thresholds", where))
    algos = thr.pop("algorithms", {})
    if not isinstance(algos, dict) or not all(isinstance(v, str) for v in algos.values()):
        raise ClusterError(f"{where}: thresholds.algorithms must be a table of op = "
                           f"\"algorithm\", got {algos!r}")
    defaults = {f.name: f.default for f in fields(Thresholds) if f.name != "algorithms"}
    bad = set(thr) - set(defaults)
    if bad:
        raise ClusterError(f"{where}: unknown [thresholds] keys {sorted(bad)}")
    for k, v in thr.items():
        if isinstance(defaults[k], bool):
            if not isinstance(v, bool):
                raise ClusterError(f"{where}: thresholds.{k} must be true or false, got {v!r}")
        elif not _is_num(v) or v != int(v) or v < 0:
            raise ClusterError(f"{where}: thresholds.{k} must be an integer >= 0, got {v!r}")
        else:
            thr[k] = int(v)
    return Thresholds(**thr, algorithms=dict(algos))


def _measured(d: dict, where: str) -> list:
    out = []
    for i, m in enumerate(_list(d.get("measured", []), "measured", where)):
        key = f"measured[{i}]"
        if not isinstance(m, dict):
            raise ClusterError(f"{where}: {key} must be a table ([[measured]]), got {m!r}")
        for k in ("op", "group_size", "bytes", "seconds"):
            if k not in m:
                raise ClusterError(f"{where}: missing key '{key}.{k}'")
        if not isinstance(m["op"], str):
            raise ClusterError(f"{where}: {key}.op must be a string, got {m['op']!r}")
        for k in ("bytes", "seconds"):
            if not all(_is_num(x) for x in _list(m[k], f"{key}.{k}", where)):
                raise ClusterError(f"{where}: {key}.{k} must hold finite numbers, got {m[k]!r}")
        try:
            out.append(MeasuredTable(op=m["op"], group_size=_count(m["group_size"],
                                                                   f"{key}.group_size", where),
                                     nodes=_count(m.get("nodes", 1), f"{key}.nodes", where),
                                     bytes=list(m["bytes"]), seconds=list(m["seconds"])))
        except ClusterError:
            raise
        except ValueError as e:
            raise ClusterError(f"{where}: {key}: {e}") from None
    return out


def _hosts(d: dict, where: str) -> list:
    out = []
    for i, h in enumerate(_list(d.get("hosts", []), "hosts", where)):
        if not isinstance(h, dict) or not isinstance(h.get("name"), str) or "slots" not in h:
            raise ClusterError(f"{where}: hosts[{i}] must be a table with name (a string) and "
                               f"slots, got {h!r}")
        out.append((h["name"], _count(h["slots"], f"hosts[{i}].slots", where)))
    return out


def loads(text: str, *, where: str = "<string>") -> Cluster:
    """Parse cluster TOML text, checking every key's type and range.

    Unknown keys are errors (they are usually typos). Raises :class:`ClusterError`
    naming ``where`` and the key for anything it cannot use."""
    if _toml is None:  # pragma: no cover
        raise RuntimeError("reading TOML needs Python >= 3.11 (tomllib) or the tomli package")
    try:
        d = _toml.loads(text)
    except _toml.TOMLDecodeError as e:
        raise ClusterError(f"{where}: not valid TOML: {e}") from None
    unknown = set(d) - _TOP_KEYS
    if unknown:
        raise ClusterError(f"{where}: unknown keys {sorted(unknown)}; expected some of "
                           f"{sorted(_TOP_KEYS)}")
    for k in ("nodes", "ranks_per_node", "reduction_Bps", "intra", "inter"):
        if k not in d:
            raise ClusterError(f"{where}: missing key {k!r}")
    for k in ("name", "source", "notes"):
        if k in d and not isinstance(d[k], str):
            raise ClusterError(f"{where}: {k} must be a string, got {d[k]!r}")
    mem = d.get("memory_per_rank_bytes")
    ov = d.get("overlap_efficiency", 1.0)
    if not _is_num(ov) or not -1.0 <= ov <= 1.0:
        raise ClusterError(f"{where}: overlap_efficiency must be a number in [-1, 1], got {ov!r}")
    try:
        return Cluster(
            name=d.get("name", Path(where).stem),
            nodes=_count(d["nodes"], "nodes", where),
            ranks_per_node=_count(d["ranks_per_node"], "ranks_per_node", where),
            intra=_points(d, "intra", where),
            inter=_points(d, "inter", where),
            reduction_Bps=_rate(d["reduction_Bps"], "reduction_Bps", where),
            compute=_compute(d, where),
            thresholds=_thresholds(d, where),
            measured=_measured(d, where),
            memory_per_rank_bytes=(None if mem is None
                                   else _rate(mem, "memory_per_rank_bytes", where)),
            hosts=_hosts(d, where),
            source=d.get("source", ""),
            notes=d.get("notes", ""),
            overlap_efficiency=float(ov),
        )
    except ClusterError:
        raise
    except (TypeError, ValueError) as e:
        raise ClusterError(f"{where}: {e}") from None


def _read_text(path: Path, what: str) -> str:
    """A text file's contents; ClusterError naming the file when it is missing, not
    readable or not text (a binary file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ClusterError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ClusterError(f"{what} {path}: cannot read it: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClusterError(f"{what} {path}: not a text file (byte {e.start} is not UTF-8)") from None
    if "\x00" in text:
        raise ClusterError(f"{what} {path}: not a text file (it holds NUL bytes)")
    return text


def load(path) -> Cluster:
    """Read a cluster TOML file (ClusterError naming the file and key on a bad one)."""
    path = Path(path)
    return loads(_read_text(path, "cluster file"), where=str(path))


# --------------------------------------------------------------------------------------
# presets and hostfiles
# --------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    """Names of the network presets shipped in mpifc/sim/presets/."""
    files = resources.files("mpifc.sim").joinpath("presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))


def preset(name: str) -> Cluster:
    """A shipped preset by name (textbook figures, not measurements: see each file)."""
    f = resources.files("mpifc.sim").joinpath("presets", f"{name}.toml")
    if not f.is_file():
        raise ClusterError(f"no network preset {name!r}; available: {', '.join(preset_names())}")
    return loads(f.read_text(), where=f"preset {name}")


_MPICH_LINE = re.compile(r"^(?P<host>[^\s:#]+)(?::(?P<n>[^\s#]*))?$")
_OMPI_SLOTS = re.compile(r"^(?:slots|max[-_]slots)=(?P<n>\S*)$")


def parse_hostfile(text: str, *, where: str = "<hostfile>") -> list[tuple[str, int]]:
    """Hosts and slot counts from an MPICH or Open MPI hostfile.

    MPICH (Hydra): ``host`` or ``host:n``. Open MPI: ``host``, ``host slots=n``,
    ``host slots=n max_slots=m`` (slots wins). ``#`` starts a comment; blank lines are
    skipped; a host listed twice adds up its slots. Raises ClusterError naming the line
    for anything else.
    """
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        toks = line.split()
        host, n = None, None
        if len(toks) == 1:
            m = _MPICH_LINE.match(toks[0])
            if m:
                host, n = m["host"], m["n"]
                if n is not None and n == "":
                    raise ClusterError(f"{where}:{lineno}: {raw.strip()!r}: empty count after ':'")
        else:
            if ":" not in toks[0]:
                host = toks[0]
                slots, max_slots = None, None
                for tok in toks[1:]:
                    m = _OMPI_SLOTS.match(tok)
                    if not m:
                        raise ClusterError(f"{where}:{lineno}: {raw.strip()!r}: expected 'slots=N' "
                                         f"after the host name, got {tok!r}")
                    if tok.startswith("slots"):
                        slots = m["n"]
                    else:
                        max_slots = m["n"]
                n = slots if slots is not None else max_slots
        if host is None:
            raise ClusterError(f"{where}:{lineno}: {raw.strip()!r} is neither 'host:n' (MPICH) "
                             "nor 'host slots=n' (Open MPI)")
        if n is None:
            count = 1
        else:
            if not re.fullmatch(r"[0-9]+", n) or int(n) < 1:
                raise ClusterError(f"{where}:{lineno}: {raw.strip()!r}: slot count {n!r} is not "
                                 "a positive integer")
            count = int(n)
        hosts[host] = hosts.get(host, 0) + count
    if not hosts:
        raise ClusterError(f"{where}: no hosts (only comments or blank lines)")
    return list(hosts.items())


def from_hostfile(path_or_text, network: str | Cluster, *, ranks_per_node: int | None = None,
                  name: str | None = None) -> Cluster:
    """A cluster: the hosts of a hostfile with the links and rates of a network preset.

    ``network`` is a preset name or a Cluster whose links, rates and thresholds are
    used. Nodes are the distinct hosts; ranks per node is the largest slot count
    (override with ``ranks_per_node``). The model places ranks block-wise on nodes;
    unequal slot counts are kept in ``hosts`` and noted.
    """
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        hosts, hname = parse_hostfile(path_or_text), "<hostfile>"
    else:
        p = Path(path_or_text)
        hosts, hname = parse_hostfile(_read_text(p, "hostfile"), where=str(p)), p.name
    base = preset(network) if isinstance(network, str) else network
    rpn = ranks_per_node or max(s for _, s in hosts)
    notes = base.notes
    if len({s for _, s in hosts}) > 1:
        notes += (f"\nhostfile slot counts differ ({', '.join(f'{h}:{s}' for h, s in hosts)}); "
                  f"modelled as {len(hosts)} nodes x {rpn} ranks")
    return Cluster(name=name or f"{hname}+{base.name}", nodes=len(hosts), ranks_per_node=rpn,
                   intra=base.intra, inter=base.inter, reduction_Bps=base.reduction_Bps,
                   compute=base.compute, thresholds=base.thresholds, measured=[],
                   memory_per_rank_bytes=base.memory_per_rank_bytes, hosts=hosts,
                   source=f"hostfile {hname} + network {base.name}", notes=notes.strip())
