"""Optimizer base: a fixed list of parameters and per-parameter state slots.

Optimizers update ``Parameter.data`` in place from ``Parameter.grad`` and work on
whatever each rank holds (a replicated tensor or a local shard): the update rules
are elementwise, so sharded == serial without communication. The math uses the
backend of each parameter's data (NumPy or CuPy).
"""
from __future__ import annotations

import numpy as np

from mpifc.backend import get_array_module
from mpifc.nn import blockpool
from mpifc.nn.module import Parameter

# elements per chunk of an update on the host: the chunk of every array an update
# reads and writes, and its temporaries, stay in L2 between its passes (the MLP's SGD
# step: 1.14 ms at 16K elements, 0.99 at 64K, 1.33 at 256K, one thread, warm)
CHUNK_ELEMENTS = 1 << 16


def for_each_chunk(fn, *arrays) -> None:
    """``fn(*views)`` for each chunk of :func:`flat_chunks`; a rank owning several cores
    runs contiguous runs of chunks on blockpool's threads (the update rules are
    element-wise: the chunks are independent)."""
    chunks = flat_chunks(*arrays)
    if len(chunks) == 1:
        fn(*chunks[0])
        return
    item = CHUNK_ELEMENTS * arrays[0].dtype.itemsize

    def share(c0, c1):
        for c in range(c0, c1):
            fn(*chunks[c])
    blockpool.run(share, blockpool.shares(len(chunks), item, np, blockpool.PASS_MIN_SHARE_BYTES))


def flat_chunks(*arrays):
    """Lists of matching views, one list per chunk: the update rules are element-wise,
    so running them chunk by chunk (in cache) gives the same result as on whole
    arrays, with one trip to main memory per array instead of one per pass. One
    chunk (the arrays themselves) on a GPU or when an array is not contiguous."""
    first = arrays[0]
    if get_array_module(first) is not np or not all(a.flags.c_contiguous for a in arrays):
        return [list(arrays)]
    flat = [a.reshape(-1) for a in arrays]
    return [[f[i:i + CHUNK_ELEMENTS] for f in flat] for i in range(0, max(first.size, 1), CHUNK_ELEMENTS)]


class Optimizer:
    """Base class.

    Parameters
    ----------
    params : list of (name, Parameter) as from ``named_parameters()`` (names key the
        state in :meth:`state_dict`), or a list of Parameter (keyed "<index>:<name>")
    lr : learning rate (schedules change ``self.lr``)
    """

    slots: tuple[str, ...] = ()

    def __init__(self, params, lr):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if isinstance(params[0], tuple):
            self.names = [str(n) for n, _ in params]
            params = [p for _, p in params]
        else:
            self.names = None
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(f"expected Parameter, got {type(p).__name__}")
        if self.names is None:
            # bare Parameters ("weight", "bias", ...) are not unique: qualify by position
            self.names = [f"{i}:{p.name}" for i, p in enumerate(params)]
        if len(set(self.names)) != len(self.names):
            raise ValueError("parameter names given to the optimizer are not unique")
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.params: list[Parameter] = params
        self.lr = float(lr)
        self.base_lr = float(lr)
        self.step_count = 0
        # state[slot][i] is the array for parameter i (created lazily, like its grad)
        self.state: dict[str, list] = {s: [None] * len(params) for s in self.slots}

    def _slot(self, name, i):
        buf = self.state[name][i]
        if buf is None:
            p = self.params[i]
            buf = self.state[name][i] = get_array_module(p.data).zeros_like(p.data)
        return buf

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

    def step(self) -> None:
        self.step_count += 1
        for i, p in enumerate(self.params):
            self._update(i, p)

    def _update(self, i, p):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """{"lr", "step", "slots": {"<param name>/<slot>": array}} for checkpoints."""
        slots = {}
        for s in self.slots:
            for name, buf in zip(self.names, self.state[s]):
                if buf is not None:
                    slots[f"{name}/{s}"] = buf
        return {"lr": self.lr, "step": self.step_count, "slots": slots}

    def load_state_dict(self, sd: dict) -> None:
        self.lr = float(sd["lr"])
        self.step_count = int(sd["step"])
        for s in self.slots:
            for i, name in enumerate(self.names):
                key = f"{name}/{s}"
                if key in sd["slots"]:
                    buf = self._slot(s, i)
                    src = sd["slots"][key]
                    if tuple(src.shape) != tuple(buf.shape):
                        raise ValueError(f"optimizer state {key}: shape {src.shape} != {buf.shape}")
                    buf[...] = get_array_module(buf).asarray(src)
