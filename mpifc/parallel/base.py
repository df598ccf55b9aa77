"""Shared pieces of the sharded layers: naming, phases, feature-axis collectives.

MPI collectives in :mod:`mpifc.comm` split axis 0. Sharded layers split another
axis: the feature axis (the LAST one) of a linear layer's (N, ..., F), the channel
axis 1 of a conv's (N, C, H, W). :func:`allgather_axis` moves that axis to the
front (one contiguous copy), gathers, and moves it back.
"""
from __future__ import annotations

import numpy as np

from mpifc.backend import get_array_module
from mpifc.comm import trace
from mpifc.nn.module import Module, ShapeError
from mpifc.parallel.describe import Collective


class ParallelModule(Module):
    """A layer that communicates. Subclasses set ``self.name`` (the phase prefix)
    and ``self.dtype``, and implement ``output_shape``, ``collectives``, ``flops``."""

    name = "layer"

    def phase(self, which: str):
        """``with self.phase("forward"):`` labels the layer's messages ``"<name>.forward"``."""
        return trace.phase(f"{self.name}.{which}")

    # --- input checks: local, before any message (see mpifc.nn.ShapeError) ---
    def _where(self) -> str:
        g = getattr(self, "group", None)
        at = "" if g is None else f" on rank {g.rank} of {g.name!r}"
        return f"{self.name} ({type(self).__name__}){at}"

    def _refuse(self, what: str, got, expected: str):
        raise ShapeError(f"{self._where()}: {what} has shape {tuple(got)}, expected {expected}")

    def _check_input(self, x, ok: bool, expected, dtype=True):
        """Raise ShapeError unless ``ok`` (the layer's own test of ``x.shape``) and, with
        ``dtype``, x has the layer's dtype (a rank with another dtype would send other bytes).
        ``expected``: a callable giving the expected shape's description, formatted only on
        failure (a check costs ~0.2 us per call, see bench/layers.py)."""
        if not ok:
            self._refuse("input", x.shape, expected())
        if dtype and x.dtype is not self.dtype and x.dtype != self.dtype:
            raise ShapeError(f"{self._where()}: input has dtype {x.dtype}, expected {self.dtype} "
                             f"(shape {tuple(x.shape)})")

    def _check_grad(self, dy, shape):
        """The output gradient must have the forward output's shape and dtype."""
        if shape is None:
            raise ShapeError(f"{self._where()}: backward without a forward")
        if dy.shape != shape:
            self._refuse("output gradient", dy.shape, f"{tuple(shape)} (the forward output)")
        if dy.dtype is not self.dtype and dy.dtype != self.dtype:
            raise ShapeError(f"{self._where()}: output gradient has dtype {dy.dtype}, expected "
                             f"{self.dtype}")

    def _c(self, which: str, op: str, group, count: int) -> Collective:
        """A predicted message of this layer in phase ``which`` on ``group`` (a Communicator)."""
        return Collective(f"{self.name}.{which}", op, group.name, int(count),
                          int(np.dtype(self.dtype).itemsize))


def allgather_axis(group, x, counts, axis):
    """Concatenate every rank's block of ``axis`` of ``x`` (uneven: ``counts``) on all ranks.

    x : (..., c_r, ...) -> (..., sum(counts), ...), ``c_r`` at ``axis`` (1 for channels,
    -1 for features). The trace records one allgather of ``x.size`` elements.
    Adjoint: take this rank's block of ``axis`` of a summed gradient (:func:`take_axis`).
    """
    xp = get_array_module(x)
    xt = xp.ascontiguousarray(xp.moveaxis(x, axis, 0))
    full = group.allgather(xt, counts=list(counts))
    return xp.ascontiguousarray(xp.moveaxis(full, 0, axis))


def take_axis(x, axis, start, stop):
    """A contiguous copy of ``x[..., start:stop, ...]`` along ``axis``."""
    xp = get_array_module(x)
    sl = [slice(None)] * x.ndim
    sl[axis] = slice(start, stop)
    return xp.ascontiguousarray(x[tuple(sl)])
