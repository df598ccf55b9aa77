"""A sharded model's full tensors on one rank, and back: gather_state / scatter_state.

    state = mpifc.gather_state(model)        # {name: full array} on rank 0, None elsewhere
    mpifc.scatter_state(model, state)        # rank 0's full tensors into every rank's shards

The state holds every parameter and buffer (BatchNorm running statistics) under the
names and at the shapes of the serial model -- ``named_parameters()`` and
``buffers()`` names, the global shape of a sharded tensor -- so the state of a model
on any dp x tp layout equals the state of its serial twin, and a serial model's
state loads into any layout. It is exactly what a checkpoint stores: both walk the
same entry list (:func:`mpifc.checkpoint.entries.collect`) and gather with the same
:func:`~mpifc.checkpoint.entries.gather_full`.

Messages (collective over the model's grid; phases ``state.gather``, ``state.scatter``):

    gather   per sharded tensor, gather(v) over the group that splits it, among the
             ranks of the root's copy (its data-parallel replica); replicated tensors
             are the root's own copy: no message
    scatter  per sharded tensor, scatter(v) from the root over that group, then bcast
             of each shard over its replicas (the dp group); replicated tensors: bcast
             from the root over the world (the adjoint pairs of the gather)

The root holds one full tensor at a time while gathering, and the whole state when done.
"""
from __future__ import annotations

import numpy as np

from mpifc.backend import get_array_module, to_device, to_host
from mpifc.checkpoint.entries import (collect, gather_full, group_root, in_root_copy,
                                      local_problems, resolve_group, root_coordinates)
from mpifc.checkpoint.save import _agree
from mpifc.comm import trace
from mpifc.nn.module import ShapeError


def _shardings(model):
    """Every Sharding of the model's parameters and declared sharded buffers."""
    from mpifc.checkpoint.entries import _buffer_shardings

    out = [p.sharding for p in model.parameters() if p.sharding is not None]
    return out + list(_buffer_shardings(model).values())


def model_grid(model, comm=None):
    """The grid ``model`` was built on: ``model.grid`` when it has one, else the dp x tp
    grid of ``comm`` (default: the world) whose tp is the size of the tensor group its
    sharded tensors name (1 for a serial model). Collective (it splits ``comm``)."""
    from mpifc.comm import Grid, world

    grid = getattr(model, "grid", None)
    if grid is not None:
        return grid
    comm = comm or world()
    tps = {len(s.counts) for s in _shardings(model) if s.axis is not None and s.group == "tp"}
    if len(tps) > 1:
        raise ShapeError(f"the model's sharded tensors name tensor groups of sizes {sorted(tps)}; "
                         "pass grid=", all_ranks=True)
    return Grid(comm, tp=tps.pop() if tps else 1)


def _entries(model, grid, what: str):
    """The model's parameter and buffer entries, checked against the grid on every rank."""
    problems, entries = [], []
    try:
        entries = collect(model, None, grid)
        problems = local_problems(entries)
    except ValueError as exc:
        problems = [str(exc)]
    _agree(grid.world, problems, what, error=lambda m: ShapeError(m, all_ranks=True))
    return entries


def _replicas(e, grid, root: int):
    """(group, its rank of the root's copy) joining the ranks that hold the same shard of
    sharded ``e``; (None, None) when every rank holds its own ("world")."""
    rdp, rtp = root_coordinates(grid, root)
    g = e.sharding.group
    if g == "tp":
        return grid.dp_comm, rdp
    if g == "dp":
        return grid.tp_comm, rtp
    return None, None


def gather_state(model, root: int = 0, grid=None) -> dict | None:
    """Full tensors of ``model`` on world rank ``root``; collective over its grid.

    Parameters
    ----------
    model : Module (serial or sharded layers) built on ``grid``
    root : world rank that receives the state
    grid : the :class:`~mpifc.comm.Grid` of the model (default: :func:`model_grid`)

    Returns
    -------
    {name: numpy array} on ``root`` -- parameters (``named_parameters()`` names) then
    buffers (``buffers()`` names), each at its global (serial) shape, host copies --
    and None on the other ranks.
    """
    grid = grid or model_grid(model)
    entries = _entries(model, grid, "gather_state")
    mine = grid.world.rank == int(root)
    out = {} if mine else None
    with trace.phase("state.gather"):
        for e in entries:
            if e.sharded:
                if in_root_copy(e, grid, root):
                    full = gather_full(e, grid, root)
                    if mine:
                        out[e.name] = full
            elif mine:
                out[e.name] = np.array(to_host(e.local), copy=True)
    return out


def _check_state(state, entries) -> list[str]:
    """What does not fit: missing or unexpected names, wrong shapes (on the root)."""
    if not isinstance(state, dict):
        return [f"the state must be a dict of arrays on the root, got {type(state).__name__}"]
    want = {e.name: e.global_shape for e in entries}
    missing = [n for n in want if n not in state]
    unexpected = [n for n in state if n not in want]
    shapes = [f"{n} {tuple(np.shape(state[n]))} given vs {want[n]} in the model"
              for n in want if n in state and tuple(np.shape(state[n])) != tuple(want[n])]
    out = []
    if missing:
        out.append(f"missing: {', '.join(missing[:5])}")
    if unexpected:
        out.append(f"not in the model: {', '.join(unexpected[:5])}")
    if shapes:
        out.append(f"shape mismatch: {'; '.join(shapes[:3])}")
    return out


def scatter_state(model, state, root: int = 0, grid=None) -> None:
    """Load full tensors from world rank ``root`` into every rank's shards of ``model``.

    The reverse of :func:`gather_state`: ``state`` ({name: array}, the names and
    global shapes :func:`gather_state` gives; values are cast to the model's dtype) is
    read on ``root`` only (pass None elsewhere). Collective over the model's grid.
    The root checks the names and shapes first and every rank raises the same
    ShapeError when they do not fit the model; nothing is written then.
    """
    grid = grid or model_grid(model)
    comm = grid.world
    entries = _entries(model, grid, "scatter_state")
    mine = comm.rank == int(root)
    problems = _check_state(state, entries) if mine else None
    problems = comm.bcast_obj(problems, root=int(root))
    if problems:
        raise ShapeError("scatter_state: the state does not fit the model: "
                         + "; ".join(problems), all_ranks=True)
    from mpifc.parallel.init import scatter_shard

    with trace.phase("state.scatter"):
        for e in entries:
            full = np.asarray(state[e.name], dtype=e.dtype) if mine else None
            if e.sharded:
                ax, counts = e.sharding.axis, e.sharding.counts
                local = list(e.global_shape)
                local[ax] = counts[e.sharding.index]
                if in_root_copy(e, grid, root):   # scatter(v) over the splitting group
                    shard = scatter_shard(resolve_group(grid, e.sharding.group), lambda: full,
                                          e.global_shape, ax, counts, e.dtype, np,
                                          root=group_root(e, grid, root))
                else:
                    shard = np.empty(local, dtype=e.dtype)
                replicas, at = _replicas(e, grid, root)
                if replicas is not None and replicas.size > 1:   # the same shard to each replica
                    replicas.bcast(shard, root=at)
            else:
                shard = full if mine else np.empty(e.global_shape, dtype=e.dtype)
                shard = np.ascontiguousarray(shard)
                comm.bcast(shard, root=int(root))
            xp = get_array_module(e.local)
            e.local[...] = shard if xp is np else to_device(shard, xp)
