"""Collective cost models: closed-form alpha-beta-gamma costs, selection, hierarchy.

Symbols (also in docs/simulator.md):
    p      ranks in the group;  L = ceil(lg p);  p' = 2**floor(lg p);  r = p - p'
    n      message bytes (per op: see each function; "total" means the whole vector)
    alpha(m), beta(m)  latency (s) and inverse bandwidth (s/byte) of an m-byte message
    gamma  seconds per byte of a local reduction (1 / reduction rate)
A step that sends m bytes costs alpha(m) + m*beta(m). With a piecewise link, alpha and
beta are taken at the size of each step's message, so the sums below are evaluated
step by step (at most lg p terms); with a constant link they reduce to the closed
forms written in each docstring, which the tests check by hand.

Every function is ``f(p, n, link, gamma) -> seconds``; ``link`` has ``alpha(m)`` and
``beta(m)`` (a :class:`mpifc.sim.cluster.LinkModel`). Costs assume all p ranks enter
together; for p <= 1 every cost is 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from mpifc.sim.cluster import Cluster, LinkModel, Thresholds


def _lg(p: int) -> int:
    """ceil(log2 p)."""
    return (p - 1).bit_length()


def _pof2(p: int) -> int:
    """Largest power of two <= p."""
    return 1 << (p.bit_length() - 1)


def _step(link, m: float) -> float:
    return link.alpha(m) + m * link.beta(m)


def _halving_steps(link, n: float, steps: int, gamma: float = 0.0) -> float:
    """sum_{k=1..steps} alpha(n/2^k) + (n/2^k)(beta(n/2^k) + gamma)."""
    t, m = 0.0, n
    for _ in range(steps):
        m /= 2.0
        t += _step(link, m) + m * gamma
    return t


# ---------------------------------------------------------------------------- allreduce
def allreduce_recursive_doubling(p, n, link, gamma):
    """Recursive doubling; n = vector bytes on every rank.

    T = lg p' (alpha + n beta + n gamma) + [r > 0] (2 alpha + 2 n beta + n gamma)
    The bracket is MPICH's non-power-of-two fold: r ranks first hand their vector to a
    partner (one message + one reduction) and get the result back at the end.
    """
    if p <= 1:
        return 0.0
    p2 = _pof2(p)
    t = _lg(p2) * (_step(link, n) + n * gamma)
    if p > p2:
        t += 2 * _step(link, n) + n * gamma
    return t


def allreduce_rabenseifner(p, n, link, gamma):
    """Rabenseifner: reduce-scatter by recursive halving, then allgather by doubling.

    T = 2 lg p' alpha + 2 (p'-1)/p' n beta + (p'-1)/p' n gamma
        + [r > 0] (2 alpha + 2 n beta + n gamma)       (non-power-of-two fold)
    """
    if p <= 1:
        return 0.0
    p2 = _pof2(p)
    lg2 = _lg(p2)
    t = _halving_steps(link, n, lg2, gamma) + _halving_steps(link, n, lg2)
    if p > p2:
        t += 2 * _step(link, n) + n * gamma
    return t


def allreduce_ring(p, n, link, gamma):
    """Ring: reduce-scatter ring then allgather ring, blocks of n/p (any p).

    T = 2 (p-1) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma
    """
    if p <= 1:
        return 0.0
    m = n / p
    return 2 * (p - 1) * _step(link, m) + (p - 1) * m * gamma


# ----------------------------------------------------------------------- reduce_scatter
def reduce_scatter_recursive_halving(p, n, link, gamma):
    """Recursive halving; n = total input bytes per rank (each keeps n/p).

    T = lg p' alpha + (p'-1)/p' n (beta + gamma)
        + [r > 0] ((alpha + n beta + n gamma) + (alpha + n/p beta))
    (non-power-of-two: r ranks fold their input into a partner first and receive their
    n/p block back at the end.)
    """
    if p <= 1:
        return 0.0
    p2 = _pof2(p)
    t = _halving_steps(link, n, _lg(p2), gamma)
    if p > p2:
        t += _step(link, n) + n * gamma + _step(link, n / p)
    return t


def reduce_scatter_pairwise(p, n, link, gamma):
    """Pairwise exchange: p-1 steps, each sends one n/p block and reduces one.

    T = (p-1) alpha + (p-1)/p n (beta + gamma)
    """
    if p <= 1:
        return 0.0
    m = n / p
    return (p - 1) * (_step(link, m) + m * gamma)


# ---------------------------------------------------------------------------- allgather
def allgather_recursive_doubling(p, n, link, gamma=0.0):
    """Recursive doubling; n = total gathered bytes (each rank contributes n/p).

    T = lg p alpha + (p-1)/p n beta     (step k sends 2^k n/p bytes)
    For p not a power of two (MPICH only selects it for powers of two) the same sum is
    taken over L = ceil(lg p) steps with the last step trimmed to the missing blocks.
    """
    if p <= 1:
        return 0.0
    t, have = 0.0, 1
    while have < p:
        blocks = min(have, p - have)
        t += _step(link, blocks * n / p)
        have += blocks
    return t


def allgather_bruck(p, n, link, gamma=0.0):
    """Bruck (any p): L = ceil(lg p) steps, step k sends min(2^k, p-2^k) blocks of n/p.

    T = ceil(lg p) alpha + (p-1)/p n beta
    """
    # the block count per step is exactly that of the doubling sum above
    return allgather_recursive_doubling(p, n, link, gamma)


def allgather_ring(p, n, link, gamma=0.0):
    """Ring: p-1 steps of one n/p block.  T = (p-1) alpha + (p-1)/p n beta"""
    if p <= 1:
        return 0.0
    return (p - 1) * _step(link, n / p)


# -------------------------------------------------------------------------------- bcast
def bcast_binomial(p, n, link, gamma=0.0):
    """Binomial tree; n = message bytes.  T = ceil(lg p) (alpha + n beta)"""
    if p <= 1:
        return 0.0
    return _lg(p) * _step(link, n)


def scatter_binomial(p, n, link, gamma=0.0):
    """Binomial scatter; n = total bytes at the root (each rank gets n/p).

    T = L alpha + (1 - 2^-L) n beta  with L = ceil(lg p)   (= lg p alpha + (p-1)/p n beta
    for powers of two: step k forwards half of what the sender still holds)
    """
    if p <= 1:
        return 0.0
    return _halving_steps(link, n, _lg(p))


def scatter_linear(p, n, link, gamma=0.0):
    """Linear scatter(v)/gather(v) (MPICH's Scatterv/Gatherv): the root talks to each rank.

    T = (p-1) alpha + (p-1)/p n beta
    """
    if p <= 1:
        return 0.0
    return (p - 1) * _step(link, n / p)


def bcast_scatter_doubling_allgather(p, n, link, gamma=0.0):
    """Van de Geijn: binomial scatter, then recursive-doubling allgather.

    T = 2 lg p alpha + 2 (p-1)/p n beta
    """
    return scatter_binomial(p, n, link) + allgather_recursive_doubling(p, n, link)


def bcast_scatter_ring_allgather(p, n, link, gamma=0.0):
    """Binomial scatter, then ring allgather.

    T = (lg p + p - 1) alpha + 2 (p-1)/p n beta
    """
    return scatter_binomial(p, n, link) + allgather_ring(p, n, link)


# ------------------------------------------------------------------------------- reduce
def reduce_binomial(p, n, link, gamma):
    """Binomial tree; n = vector bytes.  T = ceil(lg p) (alpha + n beta + n gamma)"""
    if p <= 1:
        return 0.0
    return _lg(p) * (_step(link, n) + n * gamma)


def reduce_rabenseifner(p, n, link, gamma):
    """Reduce-scatter by recursive halving, then binomial gather to the root.

    T = 2 lg p' alpha + 2 (p'-1)/p' n beta + (p'-1)/p' n gamma
        + [r > 0] (alpha + n beta + n gamma)           (non-power-of-two fold)
    """
    if p <= 1:
        return 0.0
    p2 = _pof2(p)
    lg2 = _lg(p2)
    t = _halving_steps(link, n, lg2, gamma) + _halving_steps(link, n, lg2)
    if p > p2:
        t += _step(link, n) + n * gamma
    return t


# ----------------------------------------------------------------------------- alltoall
def alltoall_bruck(p, n, link, gamma=0.0):
    """Bruck; n = bytes each rank sends in all (n/p to each rank).

    T = ceil(lg p) (alpha + n/2 beta)     (each step moves about half the blocks)
    """
    if p <= 1:
        return 0.0
    return _lg(p) * _step(link, n / 2)


def alltoall_pairwise(p, n, link, gamma=0.0):
    """Pairwise exchange (and MPICH's 'scattered' isend/irecv, same alpha-beta cost).

    T = (p-1) alpha + (p-1)/p n beta
    """
    if p <= 1:
        return 0.0
    return (p - 1) * _step(link, n / p)


# ------------------------------------------------------------------- sendrecv, barrier
def sendrecv_direct(p, n, link, gamma=0.0):
    """One exchange with one neighbour (full duplex); n = bytes each way.

    T = alpha + n beta   (p only tells whether there is a peer: 0 for p <= 1)
    """
    if p <= 1:
        return 0.0
    return _step(link, n)


def barrier_dissemination(p, n, link, gamma=0.0):
    """Dissemination barrier: ceil(lg p) zero-byte rounds.  T = ceil(lg p) alpha(0)"""
    if p <= 1:
        return 0.0
    return _lg(p) * link.alpha(0)


ALGORITHMS = {
    "allreduce": {"recursive_doubling": allreduce_recursive_doubling,
                  "rabenseifner": allreduce_rabenseifner,
                  "ring": allreduce_ring},
    "reduce_scatter": {"recursive_halving": reduce_scatter_recursive_halving,
                       "pairwise": reduce_scatter_pairwise},
    "allgather": {"recursive_doubling": allgather_recursive_doubling,
                  "bruck": allgather_bruck,
                  "ring": allgather_ring},
    "bcast": {"binomial": bcast_binomial,
              "scatter_doubling_allgather": bcast_scatter_doubling_allgather,
              "scatter_ring_allgather": bcast_scatter_ring_allgather},
    "reduce": {"binomial": reduce_binomial,
               "rabenseifner": reduce_rabenseifner},
    "scatter": {"binomial": scatter_binomial, "linear": scatter_linear},
    "gather": {"binomial": scatter_binomial, "linear": scatter_linear},
    "alltoall": {"bruck": alltoall_bruck, "scattered": alltoall_pairwise,
                 "pairwise": alltoall_pairwise},
    "sendrecv": {"direct": sendrecv_direct},
    "barrier": {"dissemination": barrier_dissemination},
}

# v-variants share the selection and cost of their even counterpart, except that
# MPICH's Scatterv / Gatherv are linear. Balanced counts (differing by at most one
# row) change the even cost by at most one row per step, which the model ignores.
ALIASES = {"allgatherv": "allgather", "reduce_scatter_block": "reduce_scatter",
           "scatterv": "scatter", "gatherv": "gather", "halo": "sendrecv",
           "iallreduce": "allreduce", "alltoallv": "alltoall"}

# ops MPICH runs node-aware (MPIR_CVAR_ENABLE_SMP_{ALLREDUCE,BCAST,REDUCE,BARRIER})
HIERARCHICAL_OPS = ("allreduce", "bcast", "reduce", "barrier")

OPS = tuple(ALGORITHMS) + tuple(ALIASES)


def select_algorithm(op: str, p: int, n: float, thr: Thresholds | None = None,
                     itemsize: int = 4) -> str:
    """MPICH's default algorithm choice for op on p ranks and n bytes.

    ``thr.algorithms[op]`` forces a choice. The rules (MPICH 3.x ``MPIR_*_intra``):
      allreduce       n <= ALLREDUCE_SHORT_MSG_SIZE or n/itemsize < p'  -> recursive_doubling,
                      else rabenseifner
      reduce          n > REDUCE_SHORT_MSG_SIZE and n/itemsize >= p'    -> rabenseifner,
                      else binomial
      bcast           n < BCAST_SHORT_MSG_SIZE or p < BCAST_MIN_PROCS   -> binomial;
                      n < BCAST_LONG_MSG_SIZE and p a power of two     -> scatter_doubling_allgather;
                      else scatter_ring_allgather
      allgather(v)    n_total < ALLGATHER_LONG_MSG_SIZE and p a power of two -> recursive_doubling;
                      n_total < ALLGATHER_SHORT_MSG_SIZE                -> bruck; else ring
      reduce_scatter  n_total < REDSCAT_COMMUTATIVE_LONG_MSG_SIZE       -> recursive_halving,
                      else pairwise
      alltoall        block = n/p <= ALLTOALL_SHORT_MSG_SIZE and p >= 8 -> bruck;
                      block <= ALLTOALL_MEDIUM_MSG_SIZE                 -> scattered; else pairwise
      scatter, gather -> binomial; scatterv, gatherv -> linear
      sendrecv -> direct; barrier -> dissemination
    """
    thr = thr or Thresholds()
    base = ALIASES.get(op, op)
    if base not in ALGORITHMS:
        raise ValueError(f"unknown collective {op!r}; known: {', '.join(OPS)}")
    forced = thr.algorithms.get(op) or thr.algorithms.get(base)
    if forced:
        if forced not in ALGORITHMS[base]:
            raise ValueError(f"algorithm {forced!r} is not one of {base}'s: "
                             f"{', '.join(ALGORITHMS[base])}")
        return forced
    pof2 = p > 0 and (p & (p - 1)) == 0
    count = n / itemsize
    if base == "allreduce":
        if n <= thr.allreduce_short_msg_size or count < _pof2(max(p, 1)):
            return "recursive_doubling"
        return "rabenseifner"
    if base == "reduce":
        if n > thr.reduce_short_msg_size and count >= _pof2(max(p, 1)):
            return "rabenseifner"
        return "binomial"
    if base == "bcast":
        if n < thr.bcast_short_msg_size or p < thr.bcast_min_procs:
            return "binomial"
        if n < thr.bcast_long_msg_size and pof2:
            return "scatter_doubling_allgather"
        return "scatter_ring_allgather"
    if base == "allgather":
        if n < thr.allgather_long_msg_size and pof2:
            return "recursive_doubling"
        if n < thr.allgather_short_msg_size:
            return "bruck"
        return "ring"
    if base == "reduce_scatter":
        return "recursive_halving" if n < thr.redscat_commutative_long_msg_size else "pairwise"
    if base == "alltoall":
        block = n / max(p, 1)
        if block <= thr.alltoall_short_msg_size and p >= thr.alltoall_bruck_min_procs:
            return "bruck"
        return "scattered" if block <= thr.alltoall_medium_msg_size else "pairwise"
    if base in ("scatter", "gather"):
        return "linear" if op in ("scatterv", "gatherv") else "binomial"
    if base == "sendrecv":
        return "direct"
    return "dissemination"


class _SharedLink:
    """A link whose bandwidth is split among ``share`` concurrent flows (one NIC)."""

    def __init__(self, link, share: float):
        self.link, self.share = link, share

    def alpha(self, m):
        return self.link.alpha(m)

    def beta(self, m):
        return self.link.beta(m) * self.share


@dataclass
class Cost:
    """One collective's predicted time and how it was obtained."""

    seconds: float
    algorithm: str   # e.g. "ring", "hierarchical(binomial|rabenseifner|binomial)", "measured"
    source: str      # "closed-form", "measured", "hierarchical"


class CostModel:
    """Time of a collective on a :class:`Cluster`, measured tables first.

    ``time(op, n, p, local=q, nodes=m, nic_share=s)``: p ranks, q of them per node on
    m nodes (default: all on one node when p <= ranks_per_node, else block placement).
    ``nic_share`` is how many ranks of a node send off-node at the same time in this
    phase (they split the node's inter-node bandwidth); the engine computes it from
    the layout.

    p = 1: nothing moves; the measured 1-rank table (the call's own cost, which
    ``mpifc calibrate`` measures for allreduce) when the cluster has one, else 0.

    Order of preference:
      1. a measured table for (op, p, m) that covers n      -> interpolated (log-log)
      2. m > 1, q > 1, op in HIERARCHICAL_OPS, hierarchy on -> intra-node phase, leaders'
         inter-node phase, intra-node phase; each phase again tries 1. then 3.
      3. the closed form of the selected algorithm, on the intra link (m == 1) or the
         inter link with bandwidth / nic_share (m > 1).
    """

    def __init__(self, cluster: Cluster, itemsize: int = 4):
        self.cluster = cluster
        self.itemsize = itemsize
        # (op, p, nodes) -> table; built once (the cluster's list is not re-read)
        self._tables = {}
        for t in cluster.measured:
            self._tables.setdefault((t.op, t.group_size, t.nodes), t)

    def time(self, op: str, nbytes: float, p: int, *, local: int | None = None,
             nodes: int | None = None, nic_share: float = 1.0) -> float:
        return self.cost(op, nbytes, p, local=local, nodes=nodes, nic_share=nic_share).seconds

    def cost(self, op: str, nbytes: float, p: int, *, local: int | None = None,
             nodes: int | None = None, nic_share: float = 1.0) -> Cost:
        p = int(p)
        if p <= 1 or op == "self":
            # a group of one moves nothing; a calibrated cluster knows the call's own cost
            one = self._measured(op, ALIASES.get(op, op), nbytes, 1, 1) if p == 1 else None
            return Cost(one, "measured", "measured") if one else Cost(0.0, "none", "closed-form")
        if nbytes < 0:
            raise ValueError(f"{op}: negative message size {nbytes}")
        rpn = self.cluster.ranks_per_node
        q = int(local) if local is not None else min(p, rpn)
        m = int(nodes) if nodes is not None else -(-p // q)
        if q < 1 or m < 1 or q * m < p:
            raise ValueError(f"{op}: group of {p} ranks cannot be {q} per node on {m} nodes")
        base = ALIASES.get(op, op)
        if base not in ALGORITHMS:
            raise ValueError(f"unknown collective {op!r}; known: {', '.join(OPS)}")

        measured = self._measured(op, base, nbytes, p, m)
        if measured is not None:
            return Cost(measured, "measured", "measured")
        thr = self.cluster.thresholds
        if m > 1 and q > 1 and thr.hierarchical and base in HIERARCHICAL_OPS:
            return self._hierarchical(base, nbytes, q, m, nic_share)
        link = self.cluster.intra if m == 1 else _SharedLink(self.cluster.inter, max(nic_share, 1.0))
        algo = select_algorithm(op, p, nbytes, thr, self.itemsize)
        return Cost(ALGORITHMS[base][algo](p, nbytes, link, self.cluster.gamma), algo, "closed-form")

    def _measured(self, op, base, nbytes, p, m):
        for name in (op, base):
            t = self._tables.get((name, p, m))
            if t is not None and t.covers(nbytes):
                return t(nbytes)
        return None

    def _flat(self, op, nbytes, p, nodes, link) -> tuple[float, str]:
        """One phase of a hierarchical collective: measured if possible, else closed form."""
        if p <= 1:
            return 0.0, "none"
        t = self._measured(op, op, nbytes, p, nodes)
        if t is not None:
            return t, "measured"
        algo = select_algorithm(op, p, nbytes, self.cluster.thresholds, self.itemsize)
        return ALGORITHMS[op][algo](p, nbytes, link, self.cluster.gamma), algo

    def _hierarchical(self, base, n, q, m, nic_share) -> Cost:
        """Node-aware collective (MPICH SMP collectives), q ranks per node, m nodes.

        allreduce = reduce(q, intra) + allreduce(m, inter) + bcast(q, intra)
        bcast     = bcast(m, inter) + bcast(q, intra)
        reduce    = reduce(q, intra) + reduce(m, inter)
        barrier   = barrier(q, intra) + barrier(m, inter) + bcast of 0 bytes (q, intra)
        The inter-node phase runs among one leader per node; ``nic_share`` of them per
        node (one per concurrent group) split the node's bandwidth.
        """
        intra = self.cluster.intra
        inter = _SharedLink(self.cluster.inter, max(nic_share, 1.0))
        if base == "allreduce":
            parts = [("reduce", n, q, 1, intra), ("allreduce", n, m, m, inter),
                     ("bcast", n, q, 1, intra)]
        elif base == "bcast":
            parts = [("bcast", n, m, m, inter), ("bcast", n, q, 1, intra)]
        elif base == "reduce":
            parts = [("reduce", n, q, 1, intra), ("reduce", n, m, m, inter)]
        else:
            parts = [("barrier", 0, q, 1, intra), ("barrier", 0, m, m, inter),
                     ("bcast", 0, q, 1, intra)]
        total, names = 0.0, []
        for op, nb, pp, nn, link in parts:
            t, algo = self._flat(op, nb, pp, nn, link)
            total += t
            names.append(algo)
        return Cost(total, f"hierarchical({'|'.join(names)})", "hierarchical")


__all__ = ["ALGORITHMS", "ALIASES", "HIERARCHICAL_OPS", "OPS", "Cost", "CostModel",
           "select_algorithm"] + [f.__name__ for d in ALGORITHMS.values() for f in d.values()]
