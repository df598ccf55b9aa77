"""Parameters and the Module protocol shared by serial and sharded layers.

A layer is an object with ``forward(x) -> y`` and ``backward(dy) -> dx``; forward
keeps only what backward needs, backward accumulates into ``Parameter.grad`` with
``+=`` (so micro-batches accumulate until ``zero_grad``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mpifc.backend import get_array_module
from mpifc.errors import UserError


class ShapeError(UserError, ValueError):
    """An array given to a layer does not fit it (shape or dtype), found before any message.

    Sharded layers raise it naming the layer, the rank, the shape given and the shape
    expected, before they enter a collective: a wrong shape never reaches MPI, where
    it would truncate, scramble or wait. Ranks whose shapes differ from EACH OTHER
    (a batch of 4 on one rank, 5 on another) cannot be seen locally: under
    ``MPIFC_DEBUG=1`` the communicator compares every collective's element count
    across ranks and raises CollectiveMismatch on all of them; otherwise MPI fails
    the call ("message truncated") and the abort handler ends the job.
    """


@dataclass(frozen=True)
class Sharding:
    """How a parameter's global (logical) tensor is split across a process group.

    axis          axis of the global tensor that is split (None: replicated)
    group         name of the group it is split over: "tp" (tensor) usually
    counts        length of every shard along ``axis``, shard i on group rank i
    index         this rank's shard index (its rank in ``group``)
    global_shape  shape of the full logical tensor
    """

    axis: int | None
    group: str
    counts: tuple[int, ...]
    index: int
    global_shape: tuple[int, ...]

    @property
    def offset(self) -> int:
        return int(sum(self.counts[: self.index]))

    def local_slice(self) -> tuple[slice, ...]:
        """Index of this rank's shard inside the global tensor."""
        sl = [slice(None)] * len(self.global_shape)
        if self.axis is not None:
            sl[self.axis] = slice(self.offset, self.offset + self.counts[self.index])
        return tuple(sl)


@dataclass(eq=False)
class Parameter:
    """A trainable tensor: local data, its gradient, a name and its sharding.

    ``sharding`` is None for a replicated (unsharded) parameter; the parallel
    layers fill it in. ``data`` holds only this rank's shard.

    Row blocks: a layer that can compute its gradient a block of rows (axis 0) at a
    time does so through :meth:`accumulate_rows`, which follows ``grad_rows`` (row
    boundaries ``(0, r1, ..., rows)``; None: one block) and calls
    ``on_grad_rows(param, i)`` after block ``i`` is in ``grad``. DataParallel sets
    both, so the allreduce of a block's bucket starts while the layer computes the
    next block; without it a layer computes its gradient in one block, as before.

    ``grad_zero`` is True from :meth:`zero_grad` until the first gradient arrives:
    :meth:`accumulate_rows` then lets the layer write its blocks straight into
    ``grad`` (no temporary, no add pass). Layers add other gradients through
    :meth:`add_grad`, which clears it.

    :meth:`zero_grad` does not write zeros: it marks the gradient zero, and the
    zeros are written when ``grad`` is next read (or never, when the layer's first
    gradient overwrites every row, as :meth:`accumulate_rows` and :meth:`add_grad`
    do). Filling the MLP's 7.4 MB of gradients cost 0.6-0.7 ms of a 12.5 ms step at
    2 threads (the arrays cold in cache by then). Code holding the array itself, not
    reading ``grad`` (DataParallel's bucket buffers), calls :meth:`settle_grad` first.
    """

    data: object
    name: str = ""
    sharding: Sharding | None = None
    grad_rows: tuple | None = field(default=None, repr=False)
    on_grad_rows: object = field(default=None, repr=False)
    grad_zero: bool = field(default=False, repr=False)
    _grad: object = field(default=None, repr=False)
    _zero_pending: bool = field(default=False, repr=False)

    def __post_init__(self):
        if self._grad is None:
            xp = get_array_module(self.data)
            self._grad = xp.zeros_like(self.data)

    @property
    def grad(self):
        """The gradient array (zeros written here first when :meth:`zero_grad` deferred them)."""
        if self._zero_pending:
            self.settle_grad()
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad, self._zero_pending = value, False

    def settle_grad(self) -> None:
        """Write the zeros a :meth:`zero_grad` deferred, if it did."""
        if self._zero_pending:
            self._grad[...] = 0
            self._zero_pending = False

    @property
    def shape(self):
        return self.data.shape

    @property
    def size(self) -> int:
        return int(self.data.size)

    def zero_grad(self) -> None:
        self.grad_zero = self._zero_pending = True

    def add_grad(self, g) -> None:
        """``grad += g`` (a layer's gradient contribution; ``grad = g`` after :meth:`zero_grad`)."""
        if self._zero_pending:
            self._grad[...] = g
            self._zero_pending = False
        else:
            self._grad += g
        self.grad_zero = False

    def row_blocks(self) -> list[tuple[int, int]]:
        """The (r0, r1) row ranges of :meth:`accumulate_rows`, in order."""
        b = self.grad_rows or (0, self.shape[0] if self.data.ndim else 1)
        return list(zip(b[:-1], b[1:]))

    def accumulate_rows(self, block) -> None:
        """``grad[r0:r1] += block(r0, r1, None)`` for every row block, announcing each.

        ``block(r0, r1, out)`` computes the gradient rows r0..r1 of this step (the
        layer's math), into ``out`` when that is not None; after :meth:`zero_grad` the
        rows are written straight into ``grad`` that way. A 0-d parameter is one
        block (0, 1) taking the whole gradient.
        """
        fresh, self.grad_zero = self.grad_zero, False
        if fresh:
            self._zero_pending = False        # every row is written below
        g = self.grad if self.data.ndim else self.grad.reshape(1)
        for i, (r0, r1) in enumerate(self.row_blocks()):
            if fresh:
                block(r0, r1, g[r0:r1])
            else:
                g[r0:r1] += block(r0, r1, None)
            if self.on_grad_rows is not None:
                self.on_grad_rows(self, i)


class Module:
    """Base class: forward/backward, parameters, train/eval mode.

    Subclasses implement ``forward`` and ``backward``; a module that owns
    parameters lists them in ``self._params`` (in a fixed order: optimizer state,
    checkpoints and gradient buckets rely on it); a container lists its children
    in ``self._children``.
    """

    training: bool = True

    #: False on a first layer whose input needs no gradient (data, token ids):
    #: its backward then skips the input-gradient GEMM and returns None.
    input_grad: bool = True

    def __init__(self):
        self._params: list[Parameter] = []
        self._children: list[Module] = []
        self._child_names: list[str] = []
        self._buffer_names: list[str] = []
        self.training = True
        self.input_grad = True

    def add_module(self, name: str, module: "Module") -> "Module":
        """Register a child under ``name`` (its parameters are named ``name.<param>``)."""
        if name in self._names_of_children():
            raise ValueError(f"duplicate child name {name!r}")
        self._children.append(module)
        self._child_names.append(str(name))
        return module

    def _names_of_children(self) -> list[str]:
        # children appended to _children directly are named by their index
        names = list(getattr(self, "_child_names", []))
        return names + [str(i) for i in range(len(names), len(self._children))]

    # --- math ---
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    # --- parameters ---
    def parameters(self) -> list[Parameter]:
        out = list(self._params)
        for c in self._children:
            out.extend(c.parameters())
        return out

    def named_parameters(self, prefix: str = "") -> list[tuple[str, Parameter]]:
        """(qualified name, Parameter) in ``parameters()`` order; children add ``"<child>."``.

        Names are stable and unique within a model (checkpoints key on them), e.g.
        ``"0.weight"``, ``"3.bias"`` inside a Sequential.
        """
        out = [(prefix + p.name, p) for p in self._params]
        for cname, c in zip(self._names_of_children(), self._children):
            out.extend(c.named_parameters(prefix + cname + "."))
        return out

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    # --- mode ---
    def train(self, mode: bool = True) -> "Module":
        self.training = mode
        for c in self._children:
            c.train(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # --- state that is not a parameter (e.g. BatchNorm running stats) ---
    def buffers(self, prefix: str = "") -> list[tuple[str, object]]:
        """(qualified name, array) of non-trainable state to checkpoint, in fixed order.

        A module lists its own buffer attribute names in ``self._buffer_names``;
        the arrays are updated in place, so a loader may write into them.
        """
        out = [(prefix + n, getattr(self, n)) for n in getattr(self, "_buffer_names", [])]
        for cname, c in zip(self._names_of_children(), self._children):
            out.extend(c.buffers(prefix + cname + "."))
        return out
