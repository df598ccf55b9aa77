"""Residual block: ``y = body(x) + shortcut(x)`` (the shortcut is the identity when None).

    block = Residual(Sequential(conv, bn, relu, conv, bn),
                     shortcut=Sequential(conv1x1_stride2, bn))      # or None: identity
    y = block.forward(x)            # body(x) + shortcut(x)
    dx = block.backward(dy)         # body.backward(dy) + shortcut.backward(dy)  (or + dy)

Both branches see the same input and get the same output gradient; the input
gradient is the sum of the two. Children are named ``body`` and ``shortcut``, so a
parameter is ``<block>.body.<layer>.weight`` (nested, stable: checkpoint keys).

Backward runs the shortcut first, then the body: ``parameters()`` lists the body's
then the shortcut's, and DataParallel fills its buckets in reverse parameter order,
so the shortcut's gradients (bucket 0 side) are final first.

The branches may hold sharded layers (mpifc.parallel) whose output is whole again
at the end of the branch; the block adds the two whole outputs locally.

Describe hooks (``output_shape``, ``collectives``, ``flops``) walk both branches
with :mod:`mpifc.parallel.describe`, so the simulator's and the trace tests'
predictions cover the layers inside.
"""
from __future__ import annotations

from mpifc.nn.module import Module, ShapeError


class Residual(Module):
    """``y = body(x) + shortcut(x)``; ``shortcut=None`` is the identity.

    Parameters
    ----------
    body : Module (e.g. a Sequential of conv, batchnorm, relu, ...)
    shortcut : Module or None (e.g. a 1x1 strided conv + batchnorm when the body
        changes the shape); None adds ``x`` itself, so ``body`` must keep the shape.
    """

    def __init__(self, body: Module, shortcut: Module | None = None):
        self._ready = False
        super().__init__()
        if not isinstance(body, Module):
            raise TypeError(f"Residual body is a {type(body).__name__}, not a Module")
        if shortcut is not None and not isinstance(shortcut, Module):
            raise TypeError(f"Residual shortcut is a {type(shortcut).__name__}, not a Module")
        self.body, self.shortcut = body, shortcut
        self.add_module("body", body)
        if shortcut is not None:
            self.add_module("shortcut", shortcut)
        self._ready = True
        self.input_grad = True

    # input_grad False (the block is a model's first layer with parameters): the
    # branches skip their input gradients and backward returns None
    @property
    def input_grad(self) -> bool:
        return self.__dict__.get("_input_grad", True)

    @input_grad.setter
    def input_grad(self, flag) -> None:
        self.__dict__["_input_grad"] = bool(flag)
        if not self.__dict__.get("_ready"):
            return
        for branch in (self.body, self.shortcut):
            if branch is None:
                continue
            if hasattr(branch, "set_input_grad"):
                branch.set_input_grad(bool(flag))
            elif branch.parameters():
                branch.input_grad = bool(flag)

    def forward(self, x):
        y = self.body.forward(x)
        s = x if self.shortcut is None else self.shortcut.forward(x)
        if y.shape != s.shape:
            raise ShapeError(f"Residual: body output {tuple(y.shape)} != shortcut output "
                             f"{tuple(s.shape)} (input {tuple(x.shape)}); give a shortcut "
                             f"(projection) that maps the input to the body's output shape")
        return y + s

    def backward(self, dy):
        ds = None if self.shortcut is None else self.shortcut.backward(dy)
        db = self.body.backward(dy)
        if not self.input_grad:
            return None
        if self.shortcut is None:
            return db + dy if db is not None else dy
        if db is None:
            return ds
        if ds is None:
            return db
        return db + ds

    # --- description (mpifc.parallel.describe dispatches to these) ---
    def output_shape(self, input_shape) -> tuple:
        from mpifc.parallel import describe as D

        return tuple(D.output_shape(self.body, input_shape))

    def collectives(self, input_shape) -> list:
        from mpifc.parallel import describe as D

        out = D.collectives(self.body, input_shape)
        if self.shortcut is not None:
            out += D.collectives(self.shortcut, input_shape)
        return out

    def flops(self, input_shape) -> tuple[int, int]:
        """Both branches, plus one add per output element each way (forward y = a + b,
        backward dx = da + db)."""
        import math

        from mpifc.parallel import describe as D

        f, b = D.flops(self.body, input_shape)
        if self.shortcut is not None:
            sf, sb = D.flops(self.shortcut, input_shape)
            f, b = f + sf, b + sb
        n = int(math.prod(self.output_shape(input_shape)))
        return f + n, b + n

    def __repr__(self):
        def ind(m):
            return repr(m).replace("\n", "\n  ")
        sc = "identity" if self.shortcut is None else ind(self.shortcut)
        return f"Residual(\n  body: {ind(self.body)}\n  shortcut: {sc}\n)"
