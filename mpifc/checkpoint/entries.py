"""The tensors of a checkpoint: parameters, buffers, optimizer state, and how each is split.

Every rank builds the same ordered list of :class:`Entry` from its model, optimizer
and grid (names, global shapes and groups agree across ranks; only the local
arrays differ). Save walks it to gather or write one tensor at a time; load walks
it to read each rank's slice of the NEW layout.

Sharded buffers: ``Module.buffers()`` gives (name, array) without sharding. A
module whose buffers are split across a group (BatchNorm on tensor-parallel
channels) declares them in an attribute ``buffer_shardings`` -- a dict from the
buffer's attribute name (as in ``_buffer_names``) to its :class:`Sharding`.
Undeclared buffers are treated as replicated, and save checks that they really
are identical across the tensor group.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from mpifc.backend import to_host
from mpifc.checkpoint.format import BUFFERS, OPTIMIZER, PARAMS
from mpifc.nn.module import Module, Sharding


@dataclass
class Entry:
    """One tensor of the checkpoint as this rank sees it.

    path          HDF5 dataset path, e.g. "/params/fc1.weight", "/optimizer/exp_avg/fc1.weight"
    kind          "params" | "buffers" | "optimizer"
    name          qualified parameter or buffer name
    local         this rank's array (shard or full copy); None for an optimizer slot
                  not created yet (SGD momentum before the first step)
    sharding      how the global tensor is split (None or axis None: replicated)
    group         the Communicator ``sharding.group`` names (None when replicated)
    global_shape  shape of the full logical tensor
    dtype         numpy dtype of the stored tensor
    slot          optimizer slot name ("" otherwise); opt_index its parameter's index
    """

    path: str
    kind: str
    name: str
    local: object
    sharding: Sharding | None
    group: object
    global_shape: tuple
    dtype: np.dtype
    slot: str = ""
    opt_index: int = -1

    @property
    def sharded(self) -> bool:
        return self.sharding is not None and self.sharding.axis is not None


def resolve_group(grid, name: str):
    """The Communicator of ``grid`` a Sharding's ``group`` name refers to."""
    groups = {"tp": grid.tp_comm, "dp": grid.dp_comm, "world": grid.world}
    if name not in groups:
        raise ValueError(f"sharding group {name!r} is not one of {sorted(groups)}")
    return groups[name]


def root_coordinates(grid, root: int = 0) -> tuple[int, int]:
    """(dp_rank, tp_rank) of world rank ``root`` (world rank = dp_rank * tp + tp_rank)."""
    return divmod(int(root), grid.tp)


def in_root_copy(e: Entry, grid, root: int = 0) -> bool:
    """Whether this rank holds a shard of the copy of sharded ``e`` that world rank
    ``root`` assembles (the replicas over the other group hold the same tensor)."""
    rdp, rtp = root_coordinates(grid, root)
    g = e.sharding.group
    if g == "tp":
        return grid.dp_rank == rdp
    if g == "dp":
        return grid.tp_rank == rtp
    return True   # "world"


def group_root(e: Entry, grid, root: int = 0) -> int:
    """The rank of world rank ``root`` inside ``e.group`` (for a rank of its copy)."""
    rdp, rtp = root_coordinates(grid, root)
    return {"tp": rtp, "dp": rdp, "world": int(root)}[e.sharding.group]


def gather_full(e: Entry, grid, root: int = 0):
    """Collective over ``e.group`` (ranks of the root's copy only): the full tensor of
    sharded ``e`` on world rank ``root``, None elsewhere.

    MPI gathers axis 0, so the split axis moves to the front (one contiguous copy),
    the v-gather concatenates the uneven blocks, and the axis moves back.
    """
    ax = e.sharding.axis
    t = np.ascontiguousarray(np.moveaxis(to_host(e.local), ax, 0))
    full_t = e.group.gather(t, counts=list(e.sharding.counts), root=group_root(e, grid, root))
    return None if full_t is None else np.moveaxis(full_t, 0, ax)


def _buffer_shardings(module: Module, prefix: str = "") -> dict[str, Sharding]:
    """{qualified buffer name: Sharding} for buffers declared in ``buffer_shardings``."""
    out = {}
    for attr, sh in (getattr(module, "buffer_shardings", None) or {}).items():
        if sh is not None:
            out[prefix + attr] = sh
    for cname, child in zip(module._names_of_children(), module._children):
        out.update(_buffer_shardings(child, prefix + cname + "."))
    return out


def _entry(path, kind, name, local, sharding, grid, slot="", opt_index=-1, dtype=None):
    if sharding is not None and sharding.axis is not None:
        group = resolve_group(grid, sharding.group)
        gshape = tuple(int(s) for s in sharding.global_shape)
    else:
        group = None
        gshape = tuple(int(s) for s in local.shape)
    dt = np.dtype(dtype if dtype is not None else local.dtype)
    return Entry(path, kind, name, local, sharding, group, gshape, dt, slot, opt_index)


def collect(model: Module, optimizer, grid) -> list[Entry]:
    """The checkpoint's tensors in file order: params, buffers, then optimizer state.

    Raises ValueError for a name that cannot be an HDF5 path component, duplicate
    names, an unknown group, or an optimizer holding a parameter the model lacks.
    """
    named = model.named_parameters()
    names = [n for n, _ in named]
    for n in names:
        if not n or "/" in n:
            raise ValueError(f"parameter name {n!r} cannot be stored (empty or contains '/')")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate parameter names: {dup[:5]}")
    entries = [_entry(f"/{PARAMS}/{n}", PARAMS, n, p.data, p.sharding, grid) for n, p in named]

    bsh = _buffer_shardings(model)
    for n, arr in model.buffers():
        if not n or "/" in n:
            raise ValueError(f"buffer name {n!r} cannot be stored (empty or contains '/')")
        entries.append(_entry(f"/{BUFFERS}/{n}", BUFFERS, n, arr, bsh.get(n), grid))

    if optimizer is not None:
        by_id = {id(p): (n, p) for n, p in named}
        sd = optimizer.state_dict()
        for i, (oname, p) in enumerate(zip(optimizer.names, optimizer.params)):
            if id(p) not in by_id:
                raise ValueError(f"optimizer parameter {oname!r} (shape {tuple(p.shape)}) is not a "
                                 "parameter of the model being checkpointed")
            n = by_id[id(p)][0]
            for slot in optimizer.slots:
                arr = sd["slots"].get(f"{oname}/{slot}")
                e = _entry(f"/{OPTIMIZER}/{slot}/{n}", OPTIMIZER, n,
                           arr if arr is not None else p.data, p.sharding, grid, slot, i)
                if arr is None:
                    e.local = None   # slot not created yet: nothing stored, nothing loaded
                entries.append(e)
    return entries


def local_problems(entries: list[Entry]) -> list[str]:
    """Shard metadata that does not fit this rank's arrays (checked before any collective)."""
    bad = []
    for e in entries:
        if not e.sharded:
            continue
        sh, g = e.sharding, e.group
        if not 0 <= sh.axis < len(e.global_shape):
            bad.append(f"{e.path}: sharding axis {sh.axis} outside a {len(e.global_shape)}-d tensor")
            continue
        if len(sh.counts) != g.size or sh.index != g.rank:
            bad.append(f"{e.path}: sharding has {len(sh.counts)} counts / index {sh.index} but "
                       f"group {sh.group!r} has size {g.size}, this rank {g.rank}")
            continue
        if sum(sh.counts) != e.global_shape[sh.axis]:
            bad.append(f"{e.path}: counts {sh.counts} sum to {sum(sh.counts)}, global axis "
                       f"{sh.axis} is {e.global_shape[sh.axis]}")
            continue
        want = list(e.global_shape)
        want[sh.axis] = sh.counts[sh.index]
        if e.local is not None and tuple(e.local.shape) != tuple(want):
            bad.append(f"{e.path}: local shape {tuple(e.local.shape)} != {tuple(want)} expected "
                       f"from its sharding")
    return bad


def signature(entries: list[Entry]) -> str:
    """SHA-256 of the model's parameter and buffer names, global shapes and dtypes."""
    spec = [(e.path, list(e.global_shape), e.dtype.str) for e in entries if e.kind != OPTIMIZER]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def host_digest(arr) -> str:
    """SHA-256 of an array's bytes (to check that replicated copies agree)."""
    a = np.ascontiguousarray(to_host(arr))
    return hashlib.sha256(a.tobytes()).hexdigest()


def sharding_attrs(e: Entry) -> dict:
    """Dataset attributes recording how ``e`` was split when saved."""
    if e.sharded:
        return {"sharding_axis": int(e.sharding.axis), "sharding_group": e.sharding.group,
                "sharding_counts": np.asarray(e.sharding.counts, dtype=np.int64)}
    grp = e.sharding.group if e.sharding is not None else ""
    return {"sharding_axis": -1, "sharding_group": grp,
            "sharding_counts": np.zeros(0, dtype=np.int64)}
