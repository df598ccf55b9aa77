"""The dp x tp process grid and its sub-communicators.

World ranks are laid out tensor-parallel fastest::

    world rank = dp_rank * tp + tp_rank

so a tensor-parallel group is ``tp`` consecutive ranks (on one node when ranks are
placed by node, which keeps the chatty tensor-parallel traffic inside the node),
and a data-parallel group is every ``tp``-th rank.
"""
from __future__ import annotations

from mpifc.comm.communicator import Communicator
from mpifc.errors import UserError


class GridError(UserError, ValueError, all_ranks=True):
    """An impossible dp x tp layout (raised identically on every rank)."""


def factor_layout(size: int, dp: int | None = None, tp: int | None = None) -> tuple[int, int]:
    """Complete a (dp, tp) layout for ``size`` ranks; a missing factor is inferred.

    Both None means pure data parallel (dp = size, tp = 1).
    """
    if dp is None and tp is None:
        dp, tp = size, 1
    elif dp is None:
        if tp < 1 or size % tp:
            raise GridError(f"tp={tp} does not divide the {size} ranks of the job")
        dp = size // tp
    elif tp is None:
        if dp < 1 or size % dp:
            raise GridError(f"dp={dp} does not divide the {size} ranks of the job")
        tp = size // dp
    if dp < 1 or tp < 1:
        raise GridError(f"dp and tp must be >= 1 (got dp={dp}, tp={tp})")
    if dp * tp != size:
        raise GridError(f"layout dp={dp} x tp={tp} = {dp * tp} ranks, but the job has {size}; "
                        f"launch with mpiexec -n {dp * tp} or change the layout")
    return dp, tp


class Grid:
    """Factor ``comm`` into dp x tp and build the data and tensor groups.

    Attributes
    ----------
    dp, tp : int                   group sizes
    dp_rank, tp_rank : int         this rank's coordinates
    dp_comm : Communicator         ranks with the same tp_rank (gradient allreduce)
    tp_comm : Communicator         ranks with the same dp_rank (sharded layers)
    """

    def __init__(self, comm: Communicator, dp: int | None = None, tp: int | None = None):
        self.world = comm
        self.dp, self.tp = factor_layout(comm.size, dp, tp)
        self.dp_rank, self.tp_rank = divmod(comm.rank, self.tp)
        # Split is collective over the world: every rank makes both calls in this order.
        self.tp_comm = comm.split(self.dp_rank, key=self.tp_rank, name="tp")
        self.dp_comm = comm.split(self.tp_rank, key=self.dp_rank, name="dp")

    def __repr__(self):
        return (f"Grid(dp={self.dp}, tp={self.tp}, rank={self.world.rank}: "
                f"dp_rank={self.dp_rank}, tp_rank={self.tp_rank})")
