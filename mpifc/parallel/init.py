"""Identical initialisation of sharded parameters: root builds, scatter(v) shards.

Contract row: *init of a sharded weight — root builds the full tensor from the
seed (the serial layer's initialiser, :mod:`mpifc.nn.init`), scatter(v) shards.*
Only the group's root draws from the generator, exactly the draws the serial twin
makes, so a sharded model built from the same seed starts as its serial twin.
"""
from __future__ import annotations

import numpy as np

from mpifc.comm import balanced_counts
from mpifc.nn._common import place
from mpifc.nn.module import Parameter, Sharding


def shard_counts(n: int, group) -> tuple[int, ...]:
    """Balanced shard lengths of ``n`` over ``group`` (larger shards first)."""
    return balanced_counts(int(n), group.size)[0]


def input_split(name: str, n: int, group, counts=None, what: str = "in_features"):
    """(counts, local length, offset) of a layer whose input axis of length ``n`` is split
    over ``group``: ``counts`` as given (validated: one entry >= 0 per rank, summing to n)
    or balanced."""
    counts = shard_counts(n, group) if counts is None else tuple(int(c) for c in counts)
    if len(counts) != group.size or sum(counts) != n or min(counts) < 0:
        raise ValueError(f"{name}: in_counts {counts} must have {group.size} entries >= 0 "
                         f"summing to {what}={n}")
    return counts, counts[group.rank], sum(counts[: group.rank])


def replicated_bias(n: int, xp, dtype):
    """A zero bias replicated over the group (the serial bias starts at zeros: no message)."""
    return Parameter(place(np.zeros(n), xp, dtype), "bias")


def scatter_shard(group, build_full, global_shape, axis, counts, dtype, xp, root=0):
    """Build the full tensor on ``root`` with ``build_full()`` and scatter(v) it along ``axis``.

    Parameters
    ----------
    group : Communicator over which the tensor is split
    build_full : callable() -> host array of ``global_shape`` (called on root only)
    axis : axis of the global tensor that is split; ``counts`` its length per rank

    Returns
    -------
    array : this rank's shard on backend ``xp``, C-contiguous
    """
    global_shape = tuple(int(s) for s in global_shape)
    # MPI splits axis 0: move the split axis to the front, scatter rows, move it back
    local_t = (int(counts[group.rank]),) + tuple(s for i, s in enumerate(global_shape) if i != axis)
    recv = np.empty(local_t, dtype=dtype)
    send = None
    if group.rank == root:
        full = np.asarray(build_full(), dtype=dtype)
        if full.shape != global_shape:
            raise ValueError(f"initialiser built {full.shape}, expected {global_shape}")
        send = np.ascontiguousarray(np.moveaxis(full, axis, 0))
    group.scatter(send, recv, counts=list(counts), root=root)
    return place(np.moveaxis(recv, 0, axis), xp, dtype)


def sharded_parameter(group, name, build_full, global_shape, axis, counts, dtype, xp):
    """A Parameter holding this rank's shard, with :class:`Sharding` filled in."""
    data = scatter_shard(group, build_full, global_shape, axis, counts, dtype, xp)
    sh = Sharding(axis=axis, group=group.name, counts=tuple(int(c) for c in counts),
                  index=group.rank, global_shape=tuple(global_shape))
    return Parameter(data, name, sharding=sh)


def local_slice(n: int, group) -> slice:
    """This rank's block of ``n`` items under :func:`shard_counts`."""
    counts, displs = balanced_counts(int(n), group.size)
    r = group.rank
    return slice(displs[r], displs[r] + counts[r])
