"""A small model whose parameters are sharded BY HAND (balanced counts), for checkpoint tests.

It does not need :mod:`mpifc.parallel`: each tensor is built full from a seed on
every rank and sliced with ``balanced_counts`` -- exactly the layout a sharded
layer produces -- so the checkpoint code is tested on its own. Dimensions are
chosen so tp = 3 and 4 give uneven shards, and ``head.weight`` (2 rows) gives an
EMPTY shard on ranks 2 and 3.
"""
import numpy as np

from mpifc.comm import balanced_counts
from mpifc.nn.module import Module, Parameter, Sharding
from mpifc.optim import Adam

# (child, param, global shape, split axis under tensor parallelism or None)
SPEC = [
    ("fc1", "weight", (7, 5), 0),        # column-parallel: rows split
    ("fc1", "bias", (7,), 0),
    ("conv", "weight", (5, 4, 3, 3), 1),  # input-channel parallel: axis 1
    ("fc2", "weight", (3, 7), 1),        # row-parallel: columns split
    ("fc2", "bias", (3,), None),         # replicated
    ("head", "weight", (2, 6), 0),       # fewer rows than ranks at tp = 3, 4
]
BUFFERS = [("bn", "running_mean", (7,), 0), ("bn", "num_batches_tracked", (1,), None)]


def full_tensors(seed: int, dtype=np.float32) -> dict:
    """{qualified name: full tensor} for params and buffers, from ``seed``."""
    rng = np.random.default_rng(seed)
    out = {}
    for child, name, shape, _ in SPEC + BUFFERS:
        if name == "num_batches_tracked":
            out[f"{child}.{name}"] = np.array([seed + 3], dtype=np.int64)
        else:
            out[f"{child}.{name}"] = rng.standard_normal(shape).astype(dtype)
    return out


def _shard(full, axis, group):
    """(local copy, Sharding) of ``full`` split along ``axis`` over ``group``; None group: whole."""
    if group is None or axis is None:
        return full.copy(), None
    counts, displs = balanced_counts(full.shape[axis], group.size)
    sh = Sharding(axis=axis, group=group.name, counts=counts, index=group.rank,
                  global_shape=tuple(full.shape))
    return np.ascontiguousarray(full[sh.local_slice()]), sh


class Holder(Module):
    """A child module owning some parameters and buffers."""

    def __init__(self):
        super().__init__()
        self.buffer_shardings = {}


class ToyModel(Module):
    """Parameters of SPEC, split over ``group`` (a tp Communicator) or whole (group None)."""

    def __init__(self, seed: int, group=None, dtype=np.float32):
        super().__init__()
        full = full_tensors(seed, dtype)
        kids = {}
        for child, name, _, axis in SPEC:
            kid = kids.get(child)
            if kid is None:
                kid = kids[child] = self.add_module(child, Holder())
            data, sh = _shard(full[f"{child}.{name}"], axis, group)
            p = Parameter(data, name, sharding=sh)
            setattr(kid, name, p)
            kid._params.append(p)
        bn = kids["bn"] = self.add_module("bn", Holder())
        for _, name, _, axis in BUFFERS:
            data, sh = _shard(full[f"bn.{name}"], axis, group)
            setattr(bn, name, data)
            bn._buffer_names.append(name)
            if sh is not None:
                bn.buffer_shardings[name] = sh


def grads_from(seed: int, model: ToyModel, group=None) -> None:
    """Set every gradient to the slice of a full gradient drawn from ``seed``."""
    full = full_tensors(seed + 1000)
    for (n, p), (child, name, _, axis) in zip(model.named_parameters(), SPEC):
        p.grad[...] = _shard(full[n], axis, group)[0]


def trained(seed: int, group=None, steps: int = 2):
    """A ToyModel and an Adam with state after ``steps`` updates (sharded == serial, bitwise)."""
    m = ToyModel(seed, group)
    opt = Adam(m.named_parameters(), lr=0.01, weight_decay=0.1)
    for s in range(steps):
        grads_from(seed + s, m, group)
        opt.step()
    return m, opt


def full_state(model: ToyModel, opt) -> dict:
    """{name: array} of an UNSHARDED model's params, buffers and optimizer slots."""
    out = {n: p.data.copy() for n, p in model.named_parameters()}
    out.update({n: np.array(a, copy=True) for n, a in model.buffers()})
    if opt is not None:
        names = [n for n, _ in model.named_parameters()]
        for slot in opt.slots:
            for n, buf in zip(names, opt.state[slot]):
                if buf is not None:
                    out[f"{slot}/{n}"] = buf.copy()
    return out


def local_state(model: ToyModel, opt) -> dict:
    """Same keys as :func:`full_state`, this rank's local arrays (shards)."""
    return full_state(model, opt)


def expected_local(reference: dict, model: ToyModel) -> dict:
    """The slices of the full ``reference`` state that ``model``'s layout puts on this rank."""
    shard_of = {n: p.sharding for n, p in model.named_parameters()}
    for child in model._children:
        for name, sh in getattr(child, "buffer_shardings", {}).items():
            shard_of[f"bn.{name}"] = sh
    out = {}
    for key, full in reference.items():
        n = key.split("/", 1)[-1]
        sh = shard_of.get(n)
        out[key] = full[sh.local_slice()] if sh is not None else full
    return out


def mismatches(got: dict, want: dict) -> list[str]:
    """Names whose arrays differ bit for bit (or in shape/dtype), plus missing keys."""
    bad = [k for k in want if k not in got]
    for k in want:
        if k in got:
            a, b = np.asarray(got[k]), np.asarray(want[k])
            if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
                bad.append(k)
    return bad
