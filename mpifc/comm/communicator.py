"""Communicator: explicit, traced MPI collectives on NumPy/CuPy buffers.

Methods are named after MPI (``allreduce`` came from ``MPI_Allreduce``) and call
the uppercase, buffer-based mpi4py functions, so data moves without pickling.
Pickled-object variants carry an ``_obj`` suffix and are for small metadata only.

Conventions
-----------
* Arrays are split along axis 0; ``counts`` are rows per rank (``None``: equal rows
  everywhere, the plain MPI call; otherwise the v-variant). ``balanced_counts`` in
  ``mpifc.comm.counts`` decides uneven splits. An empty shard (0 rows) still joins.
* Each call records one trace event whose ``count``/``bytes`` are this rank's
  buffer argument: the input of a reducing or gathering op, the received block of
  scatter, the buffer of bcast, the sent block of sendrecv.
* CuPy arrays go to MPI directly when the library is CUDA-aware (path "device",
  after a stream synchronise), and are staged through pinned host buffers reused
  across calls otherwise (path "staged": one copy per buffer MPI reads, one per
  buffer it writes, at this boundary only); see :mod:`mpifc.comm.staging`. The trace
  event of a device-buffer call carries its ``path`` and ``copy_s``.
* Debug mode (``debug=True`` or ``MPIFC_DEBUG=1``) checks before every collective
  that all ranks issue the same call (op, dtype, root, and the element count that
  must match: the buffer of a reduction or bcast, the total gathered or scattered).
  A mismatch raises on every rank naming the call number, the op and the ranks;
  a rank that never arrives is reported after ``MPIFC_DEBUG_TIMEOUT`` s (60), and
  so is a collective that does not complete within that time once all ranks issued
  it (a watchdog thread per communicator names the ranks not inside it, and aborts).
"""
from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from mpifc import backend
from mpifc.comm.counts import displacements
from mpifc.comm.staging import StagingPool, cuda_aware as _cuda_aware
from mpifc.comm.trace import TRACER

_perf = time.perf_counter
_ndarray = np.ndarray
_IN_PLACE = MPI.IN_PLACE

_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD, "mean": MPI.SUM}
_HOT_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}   # no post-step
_OP_CODES = {name: i for i, name in enumerate(
    ["bcast", "reduce", "scatter", "gather", "allgather", "reduce_scatter", "allreduce",
     "iallreduce", "alltoall", "barrier", "split", "bcast_obj", "gather_obj", "allgather_obj",
     "allreduce_obj", "alltoallv"])}


class CollectiveMismatch(RuntimeError):
    """Ranks issued different collectives (raised on every rank in debug mode)."""


def _mpi_op(op: str):
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduction op {op!r}; expected one of {sorted(_OPS)}") from None


def _rowsize(x) -> int:
    n = 1
    for d in x.shape[1:]:
        n *= d
    return n


def _check_contiguous(x, what: str):
    if not x.flags.c_contiguous:
        raise ValueError(f"{what}: buffer must be C-contiguous (got strides {x.strides}); "
                         "use xp.ascontiguousarray")


class Request:
    """A pending non-blocking operation; ``wait()`` completes it and returns its result."""

    def __init__(self, comm, req, op, result, host_result, x, t0, finish=None):
        self._comm, self._req, self._op = comm, req, op
        self._result, self._host_result, self._x, self._t0 = result, host_result, x, t0
        self._finish = finish
        self._done = False
        self._dev = comm._take_call()      # device buffers: (path, copy_s, held buffers)

    def test(self) -> bool:
        """True when the operation has completed (does not record the event)."""
        return self._done or self._req.Test()

    def wait(self):
        if not self._done:
            self._req.Wait()
            c = self._comm
            if self._dev is not None:
                c._path, c._copy_s, c._held = self._dev
            if self._host_result is not None:       # GPU staging: copy the result back
                c._to_device(self._host_result, self._result)
            if self._finish is not None:
                self._finish(self._result)
            self._done = True
            c._record(self._op, self._x, self._t0)
        return self._result


class Communicator:
    """Traced wrapper over an ``mpi4py.MPI.Comm``.

    Parameters
    ----------
    mpi_comm : mpi4py.MPI.Comm
    name : str
        Label used in traces ("world", "dp", "tp", ...).
    debug : bool, optional
        Check that all ranks issue the same collective sequence (slower: one small
        extra allgather per call). Defaults to ``MPIFC_DEBUG=1`` in the environment.
    cuda_aware : bool, optional
        Device buffers go to MPI as they are (True) or through pinned host staging
        buffers (False); default: :func:`mpifc.comm.staging.cuda_aware` decides.
    """

    def __init__(self, mpi_comm, name: str = "world", debug: bool | None = None, tracer=TRACER,
                 cuda_aware: bool | None = None):
        self.mpi = mpi_comm
        self.name = name
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.tracer = tracer
        self._ident = (name, self.size, self.rank)      # the trace's view of this communicator
        self.debug = (os.environ.get("MPIFC_DEBUG", "0") == "1") if debug is None else debug
        self._seq = 0
        self._dwatch = None          # debug mode: times each collective (comm/watchdog.py)
        # device buffers straight to MPI (True) or staged (False); None: detect (staging.py)
        self._cuda_aware = _cuda_aware()[0] if cuda_aware is None else bool(cuda_aware)
        self.staging = StagingPool()     # pinned host buffers for device data (staged path)
        self._path, self._copy_s, self._held = None, 0.0, []   # the device call in progress
        self._Allreduce, self._Allgather = mpi_comm.Allreduce, mpi_comm.Allgather

    @property
    def debug(self) -> bool:
        return self._debug

    @debug.setter
    def debug(self, on: bool) -> None:
        # The host fast paths of allreduce/allgather skip the call count and check;
        # debug mode sends every call down the general path.
        self._debug = bool(on)
        self._fast = not self._debug

    def __repr__(self):
        return f"Communicator(name={self.name!r}, rank={self.rank}, size={self.size})"

    # ------------------------------------------------------------------ internals
    def _record(self, op, x, t0, count=None, nbytes=None):
        if self._dwatch:
            self._dwatch.disarm()
        path = self._path
        if path is not None:              # a device-buffer call: release its staging buffers
            for b in self._held:
                self.staging.give(b)
            self._path, self._held = None, []
        tr = self.tracer
        if tr.enabled:
            if x is None:
                dt, cnt = "", 0 if count is None else count
            else:
                dt = x.dtype                      # a name only at export: .name is slow
                cnt = int(x.size) if count is None else count
            if path is None:
                tr.record(op, self._ident, dt, cnt, nbytes, t0, _perf())
            else:
                tr.record(op, self._ident, dt, cnt, nbytes, t0, _perf(),
                          device=(path, self._copy_s))

    # -- device buffers (see mpifc.comm.staging): "device" hands them to MPI, "staged"
    #    copies through pooled pinned host buffers; the call's state lives in
    #    _path / _copy_s / _held until _record (or a Request's wait) closes it
    def _device_call(self) -> None:
        if self._path is None:
            self._path = "device" if self._cuda_aware else "staged"
            self._copy_s, self._held = 0.0, []

    def _take_call(self):
        """Hand the device call in progress to a Request (completed at its wait)."""
        if self._path is None:
            return None
        got = (self._path, self._copy_s, self._held)
        self._path, self._held = None, []
        return got

    def _take(self, shape, dtype):
        buf = self.staging.take(shape, dtype)
        self._held.append(buf)
        return buf

    def _to_device(self, host, out) -> None:
        t = _perf()
        backend.copy_to_device(host, out)
        self._copy_s += _perf() - t

    def _host(self, x, copy: bool = True):
        """(buffer MPI may use, is_staged). Synchronises the stream for device arrays.

        Staged: a pinned host buffer holding a copy of ``x`` (``copy=False``: a
        receive buffer, nothing copied)."""
        if type(x) is np.ndarray:        # fast path: host data goes to MPI as it is
            return x, False
        if x is not None and backend.is_device_array(x):
            self._device_call()
            backend.synchronize(x)
            if not self._cuda_aware:
                buf = self._take(x.shape, x.dtype)
                if copy:
                    t = _perf()
                    backend.copy_to_host(x, buf)
                    self._copy_s += _perf() - t
                return buf, True
        return x, False

    def _empty_like_host(self, shape, x):
        """Receive buffer: a pinned host buffer when staging, else on x's device."""
        xp = backend.get_array_module(x)
        if xp is not np and not self._cuda_aware:
            self._device_call()
            return self._take(shape, x.dtype)
        return xp.empty(shape, dtype=x.dtype)

    def _finish_out(self, y_host, staged, like, out):
        """Copy a staged host result to the device (into ``out``, or a new array)."""
        if staged:
            if out is None:
                out = backend.get_array_module(like).empty(y_host.shape, dtype=y_host.dtype)
            self._to_device(y_host, out)
            return out
        return y_host

    def _check(self, op: str, dtype=None, root: int = -1, count: int = -1) -> None:
        """Count the call; in debug mode all ranks must be at the same call."""
        self._seq += 1
        if self.debug and self.size > 1:
            self._check_debug(op, dtype, root, count)

    def _check_debug(self, op, dtype, root, count) -> None:
        """Compare (call number, op, dtype, root, count) over all ranks; never hang silently."""
        dcode = -1 if dtype is None else np.dtype(dtype).num
        sig = np.array([self._seq, _OP_CODES.get(op, 99), dcode, root, count], dtype=np.int64)
        allsig = np.empty((self.size, sig.size), dtype=np.int64)
        req = self.mpi.Iallgather(sig, allsig)
        deadline = _perf() + float(os.environ.get("MPIFC_DEBUG_TIMEOUT", "60"))
        while not req.Test():
            if _perf() > deadline:
                raise CollectiveMismatch(
                    f"rank {self.rank} of {self.name!r}: collective #{self._seq} ({op}) did not "
                    f"complete within the debug timeout; some rank never issued it")
            time.sleep(1e-4)
        if (allsig == allsig[0]).all():
            watch = self._debug_watch()
            if watch:
                watch.arm(f"{op} (collective #{self._seq})")
            return
        names = {v: k for k, v in _OP_CODES.items()}
        bad = [r for r in range(self.size) if not (allsig[r] == allsig[0]).all()]
        desc = ", ".join(f"rank {r}: {names.get(int(allsig[r, 1]), '?')}"
                         f"(dtype#{allsig[r, 2]}, root={allsig[r, 3]}, count={allsig[r, 4]})"
                         for r in [0] + bad)
        raise CollectiveMismatch(
            f"collective mismatch on {self.name!r} at call #{int(allsig[:, 0].min())}: {desc}")

    def _debug_watch(self):
        """The watchdog timing this communicator's collectives (made when all ranks agree)."""
        if self._dwatch is None:
            from mpifc.comm.watchdog import Watchdog, threads_supported

            if not threads_supported():       # the signature check alone, then
                self._dwatch = False
            else:
                self._dwatch = Watchdog(float(os.environ.get("MPIFC_DEBUG_TIMEOUT", "60")),
                                        self.mpi, armed=False, name=self.name)
        return self._dwatch

    def _elem_counts(self, counts, rowsize):
        if len(counts) != self.size:
            raise ValueError(f"{self.name}: counts has {len(counts)} entries for {self.size} ranks")
        ec = [int(c) * rowsize for c in counts]
        return ec, list(displacements(ec))

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        self._check("barrier")
        t0 = _perf()
        self.mpi.Barrier()
        self._record("barrier", None, t0)

    def bcast(self, x, root: int = 0):
        """Broadcast ``x`` from ``root`` in place. Adjoint: ``reduce`` (sum) to root."""
        _check_contiguous(x, "bcast")
        self._check("bcast", x.dtype, root, x.size)
        t0 = _perf()
        buf, staged = self._host(x, copy=self.rank == root)
        self.mpi.Bcast(buf, root=root)
        if staged and self.rank != root:
            self._to_device(buf, x)
        self._record("bcast", x, t0)
        return x

    def reduce(self, x, op: str = "sum", root: int = 0):
        """Reduce ``x`` to ``root``; returns the result on root, None elsewhere.

        Adjoint of ``bcast`` (with op="sum")."""
        _check_contiguous(x, "reduce")
        self._check("reduce", x.dtype, root, x.size)
        t0 = _perf()
        buf, staged = self._host(x)
        y = self._empty_like_host(x.shape, x) if self.rank == root else None
        self.mpi.Reduce(buf, y, op=_mpi_op(op), root=root)
        if self.rank == root:
            if op == "mean":
                y /= self.size
            y = self._finish_out(y, staged, x, None)
        self._record("reduce", x, t0)
        return y

    def allreduce(self, x, op: str = "sum", out=None):
        """Element-wise reduction over all ranks; ``out=x`` reduces in place.

        op: "sum", "max", "min", "prod", or "mean" (sum then divide by size)."""
        if (type(x) is _ndarray and self._fast and op in _HOT_OPS
                and (type(out) is _ndarray or out is None)):
            # hot path (host buffers, no debug check): the steps below, inlined, so that a
            # traced call costs a few hundred nanoseconds more than the raw mpi4py call
            t0 = _perf()
            try:
                if out is x:
                    self._Allreduce(_IN_PLACE, x, _HOT_OPS[op])
                else:
                    if out is None:
                        out = np.empty_like(x)
                    self._Allreduce(x, out, _HOT_OPS[op])
            except BufferError:        # MPI itself refuses a non-contiguous buffer
                _check_contiguous(x, "allreduce")
                _check_contiguous(out, "allreduce")
                raise
            tr = self.tracer
            if tr.enabled:             # Tracer.record, inlined
                tr._events.append(("allreduce", self._ident, x.dtype, x.size, None,
                                   t0, _perf(), tr._phases[-1]))
            return out
        _check_contiguous(x, "allreduce")
        self._check("allreduce", x.dtype, -1, x.size)
        t0 = _perf()
        buf, staged = self._host(x)
        if staged:                  # reduce in place in the staging buffer
            y = buf
            self.mpi.Allreduce(MPI.IN_PLACE, y, op=_mpi_op(op))
        elif out is x:
            self.mpi.Allreduce(MPI.IN_PLACE, x, op=_mpi_op(op))
            y = x
        else:
            y = out if out is not None else backend.get_array_module(x).empty_like(x)
            self.mpi.Allreduce(x, y, op=_mpi_op(op))
        if op == "mean":
            y /= self.size
        y = self._finish_out(y, staged, x, out)
        self._record("allreduce", x, t0)
        return y

    def iallreduce(self, x, op: str = "sum", out=None) -> Request:
        """Non-blocking allreduce; ``req.wait()`` returns the result.

        The event is recorded at ``wait`` and spans post to completion."""
        _check_contiguous(x, "iallreduce")
        self._check("iallreduce", x.dtype, -1, x.size)
        t0 = _perf()
        buf, staged = self._host(x)
        mop = _mpi_op(op)
        finish = (lambda y: y.__itruediv__(self.size)) if op == "mean" else None
        if staged:                  # in place in the staging buffer; copied back at wait
            result = out if out is not None else backend.get_array_module(x).empty_like(x)
            req = self.mpi.Iallreduce(MPI.IN_PLACE, buf, op=mop)
            return Request(self, req, "iallreduce", result, buf, x, t0, finish)
        if out is x:
            req = self.mpi.Iallreduce(MPI.IN_PLACE, x, op=mop)
            result = x
        else:
            result = out if out is not None else backend.get_array_module(x).empty_like(x)
            req = self.mpi.Iallreduce(x, result, op=mop)
        return Request(self, req, "iallreduce", result, None, x, t0, finish)

    def allgather(self, x, counts=None, out=None):
        """Concatenate every rank's rows of ``x`` (axis 0) on all ranks.

        counts: rows per rank (uneven: Allgatherv); None means x.shape[0] everywhere.
        Adjoint: ``reduce_scatter`` with the same counts."""
        if (counts is None and type(x) is _ndarray and self._fast
                and (type(out) is _ndarray or out is None)):
            # hot path: host buffers, equal blocks, no debug check (steps of the general path)
            t0 = _perf()
            if out is None:
                out = np.empty((x.shape[0] * self.size,) + x.shape[1:], dtype=x.dtype)
            try:
                self._Allgather(x, out)
            except BufferError:        # MPI itself refuses a non-contiguous buffer
                _check_contiguous(x, "allgather")
                _check_contiguous(out, "allgather")
                raise
            tr = self.tracer
            if tr.enabled:             # Tracer.record, inlined
                tr._events.append(("allgather", self._ident, x.dtype, x.size, None,
                                   t0, _perf(), tr._phases[-1]))
            return out
        _check_contiguous(x, "allgather")
        # debug: every rank must receive the same number of elements (a row size or a
        # block that differs between ranks would scramble or truncate the result)
        self._check("allgather", x.dtype, -1,
                    x.size * self.size if counts is None else _rowsize(x) * int(sum(counts)))
        t0 = _perf()
        buf, staged = self._host(x)
        rs = _rowsize(x)
        if counts is None:
            shape = (x.shape[0] * self.size,) + x.shape[1:]
            y = self._empty_like_host(shape, x) if (staged or out is None) else out
            self.mpi.Allgather(buf, y)
        else:
            if int(counts[self.rank]) != x.shape[0]:
                raise ValueError(f"allgather on {self.name}: rank {self.rank} has {x.shape[0]} rows "
                                 f"but counts[{self.rank}] = {counts[self.rank]}")
            shape = (int(sum(counts)),) + x.shape[1:]
            y = self._empty_like_host(shape, x) if (staged or out is None) else out
            ec, ed = self._elem_counts(counts, rs)
            self.mpi.Allgatherv(buf, [y, ec, ed, from_numpy_dtype(x.dtype)])
        y = self._finish_out(y, staged, x, out)
        self._record("allgather", x, t0)
        return y

    def reduce_scatter(self, x, counts=None, op: str = "sum", out=None):
        """Reduce ``x`` (all rows) over ranks and keep this rank's block of rows.

        counts: rows per rank (uneven: Reduce_scatter); None means equal blocks.
        Adjoint of ``allgather`` (op="sum")."""
        _check_contiguous(x, "reduce_scatter")
        self._check("reduce_scatter", x.dtype, -1, x.size)
        t0 = _perf()
        buf, staged = self._host(x)
        rs = _rowsize(x)
        if counts is None:
            if x.shape[0] % self.size:
                raise ValueError(f"reduce_scatter on {self.name}: {x.shape[0]} rows do not split "
                                 f"evenly over {self.size} ranks; pass counts")
            shape = (x.shape[0] // self.size,) + x.shape[1:]
            y = self._empty_like_host(shape, x) if (staged or out is None) else out
            self.mpi.Reduce_scatter_block(buf, y, op=_mpi_op(op))
        else:
            if int(sum(counts)) != x.shape[0]:
                raise ValueError(f"reduce_scatter on {self.name}: counts sum to {sum(counts)} "
                                 f"but x has {x.shape[0]} rows")
            shape = (int(counts[self.rank]),) + x.shape[1:]
            y = self._empty_like_host(shape, x) if (staged or out is None) else out
            ec, _ = self._elem_counts(counts, rs)
            self.mpi.Reduce_scatter(buf, y, ec, op=_mpi_op(op))
        if op == "mean":
            y /= self.size
        y = self._finish_out(y, staged, x, out)
        self._record("reduce_scatter", x, t0)
        return y

    def scatter(self, sendbuf, recvbuf, counts=None, root: int = 0):
        """Send row blocks of ``sendbuf`` (significant on root only) into each rank's ``recvbuf``.

        counts: rows per rank (uneven: Scatterv); None means recvbuf.shape[0] everywhere.
        Adjoint: ``gather`` with the same counts."""
        _check_contiguous(recvbuf, "scatter")
        self._check("scatter", recvbuf.dtype, root,
                    recvbuf.size * self.size if counts is None
                    else _rowsize(recvbuf) * int(sum(counts)))
        t0 = _perf()
        rbuf, staged = self._host(recvbuf, copy=False)
        sbuf = None
        if self.rank == root:
            if sendbuf is None:
                raise ValueError(f"scatter on {self.name}: root {root} must pass sendbuf")
            _check_contiguous(sendbuf, "scatter")
            sbuf, _ = self._host(sendbuf)
        if counts is None:
            self.mpi.Scatter(sbuf, rbuf, root=root)
        else:
            if int(counts[self.rank]) != recvbuf.shape[0]:
                raise ValueError(f"scatter on {self.name}: rank {self.rank} recvbuf has "
                                 f"{recvbuf.shape[0]} rows but counts[{self.rank}] = {counts[self.rank]}")
            ec, ed = self._elem_counts(counts, _rowsize(recvbuf))
            if self.rank == root:
                if int(sum(counts)) != sendbuf.shape[0]:
                    raise ValueError(f"scatter on {self.name}: counts sum to {sum(counts)} but "
                                     f"sendbuf has {sendbuf.shape[0]} rows")
                sbuf = [sbuf, ec, ed, from_numpy_dtype(sendbuf.dtype)]
            self.mpi.Scatterv(sbuf, rbuf, root=root)
        if staged:
            self._to_device(rbuf, recvbuf)
        self._record("scatter", recvbuf, t0)
        return recvbuf

    def gather(self, x, counts=None, root: int = 0):
        """Concatenate every rank's rows on ``root`` (None elsewhere). Adjoint of ``scatter``."""
        _check_contiguous(x, "gather")
        self._check("gather", x.dtype, root,
                    x.size * self.size if counts is None else _rowsize(x) * int(sum(counts)))
        t0 = _perf()
        buf, staged = self._host(x)
        y = None
        if counts is None:
            if self.rank == root:
                y = self._empty_like_host((x.shape[0] * self.size,) + x.shape[1:], x)
            self.mpi.Gather(buf, y, root=root)
        else:
            if int(counts[self.rank]) != x.shape[0]:
                raise ValueError(f"gather on {self.name}: rank {self.rank} has {x.shape[0]} rows "
                                 f"but counts[{self.rank}] = {counts[self.rank]}")
            rbuf = None
            if self.rank == root:
                y = self._empty_like_host((int(sum(counts)),) + x.shape[1:], x)
                ec, ed = self._elem_counts(counts, _rowsize(x))
                rbuf = [y, ec, ed, from_numpy_dtype(x.dtype)]
            self.mpi.Gatherv(buf, rbuf, root=root)
        if y is not None:
            y = self._finish_out(y, staged, x, None)
        self._record("gather", x, t0)
        return y

    def alltoall(self, x, out=None):
        """Rank i's block j goes to rank j's block i (equal blocks along axis 0)."""
        _check_contiguous(x, "alltoall")
        if x.shape[0] % self.size:
            raise ValueError(f"alltoall on {self.name}: {x.shape[0]} rows do not split over {self.size} ranks")
        self._check("alltoall", x.dtype, -1, x.size)
        t0 = _perf()
        buf, staged = self._host(x)
        y = self._empty_like_host(x.shape, x) if (staged or out is None) else out
        self.mpi.Alltoall(buf, y)
        y = self._finish_out(y, staged, x, out)
        self._record("alltoall", x, t0)
        return y

    def alltoallv(self, x, sendcounts, recvcounts, out=None):
        """Rank i's j-th block of rows goes to rank j, which stacks what it gets in rank order.

        sendcounts[j]: rows of ``x`` (consecutive blocks, axis 0) this rank sends to rank j;
        recvcounts[j]: rows it receives from rank j (rank j's sendcounts[this rank]; an
        ``alltoall`` of the counts tells each rank). Blocks may be empty.
        Adjoint: ``alltoallv`` with the two count lists swapped (the exchange is a
        permutation of rows, so the adjoint is also its inverse)."""
        _check_contiguous(x, "alltoallv")
        if int(sum(sendcounts)) != x.shape[0]:
            raise ValueError(f"alltoallv on {self.name}: sendcounts sum to {int(sum(sendcounts))} "
                             f"but x has {x.shape[0]} rows")
        self._check("alltoallv", x.dtype)
        t0 = _perf()
        buf, staged = self._host(x)
        rs = _rowsize(x)
        sc, sd = self._elem_counts(sendcounts, rs)
        rc, rd = self._elem_counts(recvcounts, rs)
        shape = (int(sum(recvcounts)),) + x.shape[1:]
        y = self._empty_like_host(shape, x) if (staged or out is None) else out
        mt = from_numpy_dtype(x.dtype)
        self.mpi.Alltoallv([buf, sc, sd, mt], [y, rc, rd, mt])
        y = self._finish_out(y, staged, x, out)
        self._record("alltoallv", x, t0)
        return y

    # ------------------------------------------------------------------ point to point
    def sendrecv(self, sendbuf, dest, recvbuf, source, tag: int = 0):
        """Send to ``dest`` and receive from ``source`` at once (halo exchange).

        ``dest`` / ``source`` may be None (no neighbour: MPI.PROC_NULL); then the
        matching buffer may be None. Returns ``recvbuf``."""
        d = MPI.PROC_NULL if dest is None else dest
        s = MPI.PROC_NULL if source is None else source
        t0 = _perf()
        sbuf, _ = (self._host(sendbuf, copy=dest is not None) if sendbuf is not None
                   else (None, False))
        rbuf, staged = self._host(recvbuf, copy=False) if recvbuf is not None else (None, False)
        self.mpi.Sendrecv(sbuf, d, tag, rbuf, s, tag)
        if staged and source is not None:
            self._to_device(rbuf, recvbuf)
        ref = sendbuf if sendbuf is not None else recvbuf
        nb = 0 if (sendbuf is None or dest is None) else int(sendbuf.nbytes)
        cnt = 0 if (sendbuf is None or dest is None) else int(sendbuf.size)
        self._record("sendrecv", ref, t0, count=cnt, nbytes=nb)
        return recvbuf

    def isend(self, x, dest: int, tag: int = 0) -> Request:
        t0 = _perf()
        buf, _ = self._host(x)
        req = self.mpi.Isend(buf, dest, tag)
        r = Request(self, req, "isend", None, None, x, t0)
        r._keep = buf   # the staged host copy must live until completion
        return r

    def irecv(self, out, source: int, tag: int = 0) -> Request:
        t0 = _perf()
        buf, staged = self._host(out, copy=False)
        req = self.mpi.Irecv(buf, source, tag)
        return Request(self, req, "irecv", out, buf if staged else None, out, t0)

    # ------------------------------------------------------------------ objects (metadata)
    def bcast_obj(self, obj, root: int = 0):
        self._check("bcast_obj", None, root)
        t0 = _perf()
        r = self.mpi.bcast(obj, root=root)
        self._record("bcast_obj", None, t0)
        return r

    def gather_obj(self, obj, root: int = 0):
        self._check("gather_obj", None, root)
        t0 = _perf()
        r = self.mpi.gather(obj, root=root)
        self._record("gather_obj", None, t0)
        return r

    def allgather_obj(self, obj):
        self._check("allgather_obj")
        t0 = _perf()
        r = self.mpi.allgather(obj)
        self._record("allgather_obj", None, t0)
        return r

    def allreduce_obj(self, obj, op: str = "sum"):
        self._check("allreduce_obj")
        t0 = _perf()
        r = self.mpi.allreduce(obj, op=_mpi_op(op))
        if op == "mean":
            r = r / self.size
        self._record("allreduce_obj", None, t0)
        return r

    # ------------------------------------------------------------------ groups
    def split(self, color: int, key: int = 0, name: str = "") -> "Communicator":
        """Sub-communicator of the ranks with the same ``color``, ordered by ``key``."""
        self._check("split")
        sub = self.mpi.Split(color, key)
        if self._dwatch:
            self._dwatch.disarm()
        return Communicator(sub, name or f"{self.name}.{color}", debug=self.debug, tracer=self.tracer,
                            cuda_aware=self._cuda_aware)

    def split_shared(self, name: str = "node") -> "Communicator":
        """Sub-communicator of the ranks that share memory (one node)."""
        self._check("split")
        sub = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        if self._dwatch:
            self._dwatch.disarm()
        return Communicator(sub, name, debug=self.debug, tracer=self.tracer,
                            cuda_aware=self._cuda_aware)

    def abort(self, code: int = 1) -> None:
        self.mpi.Abort(code)


_WORLD: Communicator | None = None


def world(debug: bool | None = None) -> Communicator:
    """The Communicator over MPI.COMM_WORLD (a plain ``python`` run has size 1)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = Communicator(MPI.COMM_WORLD, "world", debug=debug)
    elif debug is not None:
        _WORLD.debug = debug
    return _WORLD


def processor_name() -> str:
    return MPI.Get_processor_name()


def library_version() -> str:
    return MPI.Get_library_version().strip().splitlines()[0]
