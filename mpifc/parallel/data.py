"""Data parallelism: replicas on the ranks of a data group, gradients averaged by allreduce.

P ranks in the data group (``grid.dp_comm``), each holding a full replica of its
tensor-parallel shard of the model and its own rows of the global batch.

Contract row:

============== ======== ==========================================================
layer          forward  backward
============== ======== ==========================================================
data parallel  none     (bucketed, overlapped) allreduce of gradients over dp group
============== ======== ==========================================================

Plan (built once, in :class:`DataParallel`): the parameters, in reverse order (the
order backward produces their gradients), are laid out back to back in one flat
store per dtype and cut into buckets of ``bucket_mb`` (at most total / ``min_buckets``),
filled to the cap: a parameter that does not fit is cut at a row boundary (axis 0)
and spans several buckets. Each ``Parameter.grad`` is a view into the store and each
bucket's buffer a slice of it, so layers accumulate straight into the buffers and
the allreduce runs on them in place: no packing copies, no second copy of the
gradients. A parameter's row blocks (one per bucket it spans) become its
``grad_rows``: a layer that computes its gradient a row block at a time (Linear and
the parallel linears: ``dW[r0:r1] = dy[:, r0:r1].T @ x``) announces each block.

Step: backward walks ``model.layers`` in reverse; a bucket's ``iallreduce`` starts
(overlap) as soon as all its pieces are final: a row block announced by its layer,
or the end of the layer's backward for the rest. So a large first-layer weight,
whose gradient backward finishes last, no longer waits whole: its first buckets
travel while the layer computes its later rows. Buckets start in index order (the
buffer order). ``synchronize`` waits for every request. The mean comes from
scaling the incoming logits gradient by 1/P (backward is linear in it). MPICH
advances a non-blocking collective only inside MPI calls, so a small helper
thread calls ``MPI_Test`` on the pending requests while the main thread computes
(NumPy releases the GIL in its GEMMs). The blocking mode issues one allreduce per
bucket after backward, for comparison. Trace phases: ``dp.grad_bucket<i>``
(bucket 0 holds the LAST layer's parameters), ``dp.init`` for the start-up bcasts,
``clip.norm`` for gradient clipping.

A group of one rank sends nothing: no bcast, no allreduce (the gradients are
already the average over one replica).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np

from mpifc.backend import get_array_module
from mpifc.comm import trace
from mpifc.nn import fuse
from mpifc.nn.module import ShapeError
from mpifc.optim.clip import clip_grad_norm
from mpifc.parallel.describe import Collective

_perf = time.perf_counter

#: a model whose gradients fit in fewer buckets than this is still cut in this many
#: (see :class:`DataParallel`, ``min_buckets``) ...
MIN_BUCKETS = 8
#: ... but not into buckets smaller than this (MiB): each bucket costs an iallreduce,
#: MPI_Test calls and smaller dW row-block GEMMs. On the 2-core test machine eight
#: ~40 KiB buckets added ~0.4 ms to the 0.8 ms step of the digits MLP (336 KiB of
#: gradients), while one blocking allreduce of it costs ~0.1 ms.
MIN_BUCKET_MB = 1.0


def default_min_buckets(overlap: bool) -> int:
    """:data:`MIN_BUCKETS` when buckets are reduced during backward, else 1: without
    overlap every bucket waits for the end of backward anyway, and each extra bucket
    only adds a message and splits the weight-gradient GEMMs into row blocks (2 ranks
    x 1 core, MLP 784-1024-1024-10 at batch 256 per rank: 27.5 ms per step with the
    8 buckets, 26.7 ms with one)."""
    return MIN_BUCKETS if overlap else 1


def bucket_cap(bucket_mb: float, total_bytes: int, min_buckets: int = 1) -> int:
    """Bytes per bucket: ``bucket_mb`` MiB, lowered to ceil(total / ``min_buckets``) when
    that is smaller but never below :data:`MIN_BUCKET_MB` (nor above ``bucket_mb``).
    <= 0: every parameter in a bucket of its own."""
    cap = int(bucket_mb * 2**20)
    if cap > 0 and min_buckets > 1:
        split = -(-int(total_bytes) // int(min_buckets))
        cap = max(1, min(cap, max(split, int(MIN_BUCKET_MB * 2**20))))
    return cap


# --------------------------------------------------------------------------- #
# the bucket plan
# --------------------------------------------------------------------------- #
class Bucket:
    """One fusion buffer: ``pieces`` (reverse model order) laid out back to back in ``buffer``.

    index    bucket number (0 = filled first in backward = the last layers)
    pieces   (param, i, r0, r1): row block ``i`` (rows r0..r1 on axis 0) of a parameter's
             gradient; a parameter larger than the room left is cut at row boundaries
             and spans several consecutive buckets
    params   the Parameters with a piece here, in order
    buffer   1-D slice of the plan's flat gradient store (numel elements of ``dtype``);
             consecutive buckets of one dtype are adjacent slices of one store, so a
             parameter spanning buckets is still one contiguous view
    """

    def __init__(self, index, pieces, dtype):
        self.index = index
        self.pieces = list(pieces)
        self.params = list({id(p): p for p, *_ in self.pieces}.values())
        self.dtype = np.dtype(dtype)
        self.numel = sum(_row_numel(p) * (r1 - r0) for p, _, r0, r1 in self.pieces)
        self.buffer = None
        self.request = None
        self.pending = len(self.pieces)
        self.tested_done = False

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def phase(self) -> str:
        return f"dp.grad_bucket{self.index}"


def _rows(p) -> int:
    """Rows of a parameter on axis 0 (a 0-d parameter is one row)."""
    return int(p.shape[0]) if p.data.ndim else 1


def _row_numel(p) -> int:
    return p.size // _rows(p) if _rows(p) else 0


def plan_buckets(params, bucket_mb: float, xp=None, min_buckets: int = 1) -> list[Bucket]:
    """Cut ``params`` (already in reverse order) into buckets of at most ``bucket_mb`` MiB.

    Buckets fill up to the cap: a parameter that does not fit in the room left is
    cut at a row boundary (axis 0), its first rows closing the bucket and the rest
    going on into the next ones, so buckets hold the cap (rounded down to whole rows;
    a single row larger than the cap gets a bucket of its own). A dtype change closes
    a bucket. ``bucket_mb <= 0`` puts every parameter, whole, in a bucket of its own.
    ``min_buckets`` > 1 lowers the cap to ceil(total bytes / min_buckets), so that a
    model smaller than the cap is still cut in that many buckets, but not below
    :data:`MIN_BUCKET_MB` (:func:`bucket_cap`; see DataParallel).

    Then every ``p.grad`` becomes a view of the buckets' flat store (keeping its
    values) and ``p.grad_rows`` the row boundaries of its pieces (one piece per bucket
    it spans), the blocks in which a layer computes it (``Parameter.accumulate_rows``).
    """
    params = list(params)
    cap = bucket_cap(bucket_mb, sum(int(p.grad.nbytes) for p in params), min_buckets)
    groups, cur, cur_b = [], [], 0

    def close():
        nonlocal cur, cur_b
        if cur:
            groups.append(cur)
        cur, cur_b = [], 0

    for p in params:
        if cur and p.grad.dtype != cur[0][0].grad.dtype:
            close()
        R = _rows(p)
        row_b = _row_numel(p) * p.grad.dtype.itemsize
        if cap <= 0 or row_b == 0:                   # whole (own bucket, or empty)
            if cap <= 0:
                close()
            cur.append([p, 0, 0, R])
            if cap <= 0:
                close()
            continue
        r = 0
        while r < R:
            take = min(R - r, (cap - cur_b) // row_b)
            if take <= 0:
                if cur:
                    close()
                    continue
                take = 1                             # one row larger than the cap
            cur.append([p, 0, r, r + take])
            cur_b += take * row_b
            r += take
    close()
    # block index of every piece within its parameter, and the parameter's row boundaries
    bounds: dict[int, list] = {}
    for g in groups:
        for pc in g:
            b = bounds.setdefault(id(pc[0]), [pc[2]])
            pc[1] = len(b) - 1
            b.append(pc[3])
    buckets = [Bucket(i, [tuple(pc) for pc in g], g[0][0].grad.dtype) for i, g in enumerate(groups)]
    # one flat store per run of buckets of one dtype; grads are views into it
    i = 0
    while i < len(buckets):
        j = i
        while j + 1 < len(buckets) and buckets[j + 1].dtype == buckets[i].dtype:
            j += 1
        run = buckets[i: j + 1]
        bxp = xp if xp is not None else get_array_module(run[0].pieces[0][0].grad)
        store = bxp.zeros(sum(b.numel for b in run), dtype=run[0].dtype)
        off, start = 0, {}
        for b in run:
            b.buffer = store[off: off + b.numel]
            for p, k, r0, r1 in b.pieces:
                if k == 0:
                    start[id(p)] = off
                off += _row_numel(p) * (r1 - r0)
        for b in run:
            for p, k, *_ in b.pieces:
                if k == 0:
                    view = store[start[id(p)]: start[id(p)] + p.size].reshape(p.shape)
                    view[...] = p.grad
                    p.grad = view
                    p.grad_rows = tuple(bounds[id(p)])
        i = j + 1
    return buckets


def backward_layers(model) -> list:
    """The layers backward runs, in forward order: all of ``model.layers``, or, when
    the model's input needs no gradient (``model.input_grad`` False), those from the
    first layer that owns parameters on."""
    layers = list(model.layers)
    if getattr(model, "input_grad", True):
        return layers
    first = next((i for i, layer in enumerate(layers) if layer.parameters()), len(layers))
    return layers[first:]


def unique_parameters(model) -> list:
    """``model.parameters()`` without repeats (a shared parameter is reduced once)."""
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# --------------------------------------------------------------------------- #
# progress helper
# --------------------------------------------------------------------------- #
class _Progress:
    """Calls ``Request.test()`` on pending requests from a helper thread.

    MPICH advances a non-blocking collective only while some MPI call runs on the
    rank; without this, an iallreduce posted before a long GEMM would do most of
    its work in ``wait``. The thread lives while requests are pending, sleeps
    ``interval`` seconds between tests, and is joined before the main thread waits
    (so no request is ever tested and waited concurrently). Needs
    MPI_THREAD_MULTIPLE (mpi4py's default), since tensor-parallel layers call MPI
    from the main thread meanwhile.
    """

    def __init__(self, interval: float = 5e-4):
        self.interval = float(interval)
        self._lock = threading.Lock()
        self._pending: list = []
        self._thread = None
        self._stop = False

    def add(self, request) -> None:
        with self._lock:
            self._pending.append(request)
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="mpifc-dp-progress",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stop or not self._pending:
                    self._thread = None          # under the lock: add() starts a new one
                    return
                snapshot = list(self._pending)
            done = {id(r) for r in snapshot if r.test()}
            with self._lock:
                self._pending = [r for r in self._pending if id(r) not in done]
            time.sleep(self.interval)

    def stop(self) -> None:
        """Stop testing and join the thread; the caller then waits on the requests."""
        with self._lock:
            self._stop = True
            t = self._thread
        if t is not None:
            t.join()
        with self._lock:
            self._pending = []
            self._thread = None
            self._stop = False


# --------------------------------------------------------------------------- #
# DataParallel
# --------------------------------------------------------------------------- #
class DataParallel:
    """Average gradients over a data group, bucketed and overlapped with backward.

    Parameters
    ----------
    model : a Module with ``.layers`` (run in reverse in :meth:`backward`) and
        ``parameters()``; a model without ``.layers`` runs its own ``backward`` and
        then reduces every bucket (no overlap)
    group : Communicator of the data-parallel ranks (``grid.dp_comm``)
    bucket_mb : fusion buffer cap in MiB (2**20 bytes); default 25, as PyTorch DDP: large
        enough that per-message costs vanish against the bytes on a network
    min_buckets : cut the gradients in at least this many buckets (the cap becomes at
        most ceil(total bytes / min_buckets), but not below :data:`MIN_BUCKET_MB`:
        a model of a few hundred KiB stays one bucket); default :data:`MIN_BUCKETS` with
        ``overlap``, 1 without (:func:`default_min_buckets`). A model
        smaller than one ``bucket_mb`` would otherwise be one bucket that can start only
        when backward ends, hiding nothing; with k buckets the last (exposed) one is
        about 1/k of the bytes for k - 1 extra messages (PyTorch DDP addresses the same
        start-up gap with a small first bucket; here the gap is at the end, where the
        first layer's gradient is finished). 1: the plain cap
    overlap : True: iallreduce each bucket as soon as it is full, during backward;
        False: one blocking allreduce per bucket after backward
    progress : with ``overlap``, how the in-flight allreduces move forward (MPICH
        advances a non-blocking collective only inside MPI calls): "poll" (default)
        tests them from the main thread after each layer's backward and each
        weight-gradient row block; True / "thread" from a helper thread
        (:class:`_Progress`; on ranks that own one core each it competes with the
        GEMMs and the GIL, and halved the throughput of the small digits-cnn);
        False leaves them to the next MPI call
    progress_interval : seconds the helper sleeps between tests (5e-4: about 1% of a
        core while requests are pending, measured with bench-style GEMM loops)

    Usage per step::

        dp.zero_grad()
        dp.backward(loss.backward(scale))
        dp.synchronize()               # before clipping or the optimizer step

    Gradient accumulation: backward calls inside ``with dp.no_sync():`` send no
    gradient message; the next backward outside it reduces the accumulated sum.
    (A SyncBatchNorm in the model still allreduces its batch statistics over dp in
    every micro-batch: that is its forward/backward math, not gradient sync.)

    Attributes
    ----------
    buckets : list of :class:`Bucket`
    timings : seconds of the last synchronised step on this rank: ``post`` (starting
        iallreduces), ``wait`` (waiting for them in :meth:`synchronize`: the exposed
        communication), ``blocking`` (the blocking allreduces)
    """

    def __init__(self, model, group, bucket_mb=25.0, overlap=True, *, min_buckets=None,
                 progress="poll", progress_interval=5e-4):
        self.model, self.group = model, group
        self.bucket_mb, self.overlap = float(bucket_mb), bool(overlap)
        self.min_buckets = default_min_buckets(overlap) if min_buckets is None else int(min_buckets)
        self.params = unique_parameters(model)
        self.buckets = plan_buckets(list(reversed(self.params)), self.bucket_mb,
                                    min_buckets=self.min_buckets)
        # block i of parameter p lives in bucket _piece_bucket[id(p)][i]
        self._piece_bucket: dict[int, list] = {}
        for b in self.buckets:
            for p, i, _, _ in b.pieces:
                self._piece_bucket.setdefault(id(p), []).append(b)
        for p in self.params:
            p.on_grad_rows = self._rows_done
            if group.size == 1:      # nothing to start early: one GEMM, the serial result
                p.grad_rows = None
        self._armed = False          # launching during backward (synchronised overlap step)
        self._done: set = set()      # (id(p), block) announced in this backward
        self._sync = True
        self._launched: list[Bucket] = []
        if progress not in (True, False, "thread", "poll"):
            raise ValueError(f"DataParallel: progress must be 'poll', 'thread' or False, got {progress!r}")
        self._poll = progress == "poll" and overlap and group.size > 1
        self._progress = (_Progress(progress_interval)
                          if (progress in (True, "thread") and overlap and group.size > 1) else None)
        self.timings = {"post": 0.0, "wait": 0.0, "blocking": 0.0}
        self._check_replicas()
        self.broadcast_state()

    # --- start-up ---
    def _check_replicas(self) -> None:
        """Every rank must hold the same parameter and buffer shapes: the bcasts below and
        every gradient bucket's allreduce send them as they are (a replica built from
        another config would truncate or scramble them). One allgather_obj of the shapes,
        at construction only (phase "dp.init.check"); raises ShapeError on every rank."""
        if self.group.size == 1:
            return
        mine = ([(tuple(p.shape), str(p.data.dtype)) for p in self.params]
                + [(name, tuple(b.shape), str(b.dtype)) for name, b in self.model.buffers()])
        with trace.phase("dp.init.check"):
            every = self.group.allgather_obj(mine)
        bad = [r for r, sig in enumerate(every) if sig != every[0]]
        if bad:
            r0, rb = every[0], every[bad[0]]
            i = next((i for i, (u, v) in enumerate(zip(r0, rb)) if u != v), min(len(r0), len(rb)))
            def entry(sig):
                return "nothing" if i >= len(sig) else " ".join(str(v) for v in sig[i])
            raise ShapeError(f"DataParallel on {self.group.name!r}: the replicas differ at parameter/"
                             f"buffer #{i}: rank 0 has {entry(r0)}, rank {bad[0]} has {entry(rb)} "
                             f"({len(r0)} vs {len(rb)} in all; ranks {bad} differ from rank 0)")
    def broadcast_state(self, root: int = 0) -> None:
        """bcast every parameter and buffer (BatchNorm running stats) from the group root."""
        if self.group.size == 1:
            return
        with trace.phase("dp.init"):
            for p in self.params:
                self.group.bcast(p.data, root=root)
            for _, buf in self.model.buffers():
                self.group.bcast(buf, root=root)

    # --- gradient flow ---
    def zero_grad(self) -> None:
        # deferred (Parameter.zero_grad): the layers write their gradients in place, and
        # a bucket settles what is still pending before its allreduce reads the buffer
        for p in self.params:
            p.zero_grad()

    @contextmanager
    def no_sync(self):
        """Accumulate gradients over micro-batches without communicating."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def backward(self, dlogits) -> None:
        """Run the model's backward; start each bucket's allreduce once it is complete.

        ``dlogits`` is scaled by 1/P first: backward is linear in it, so every
        gradient comes out as (local gradient) / P and the allreduce's sum is the
        mean (one (N, Q) multiply instead of a pass over all gradients afterwards).
        Gradients accumulated under :meth:`no_sync` carry the same 1/P.
        """
        P = self.group.size
        if P > 1:
            dlogits = dlogits * (1.0 / P)
        if not self._sync or P == 1:
            self._run_backward(dlogits, None)
            return
        if self._launched:
            raise RuntimeError("DataParallel.backward: the previous step was not synchronized; "
                               "call synchronize() before the next synchronised backward")
        self.timings = {"post": 0.0, "wait": 0.0, "blocking": 0.0}
        for b in self.buckets:
            b.pending = len(b.pieces)
            b.tested_done = False
        self._done = set()
        self._armed = self.overlap and getattr(self.model, "layers", None) is not None
        try:
            self._run_backward(dlogits, self._layer_done if self._armed else None)
        finally:
            self._armed = False
        # buckets whose parameters no layer in the backward walk owns, or every bucket
        # in the blocking mode and for a model without layers
        for b in self.buckets:
            if b.request is None and b not in self._launched:
                self._reduce(b)

    def _run_backward(self, dy, on_layer) -> None:
        layers = getattr(self.model, "layers", None)
        if layers is None:
            self.model.backward(dy)
            return
        # BatchNorm + ReLU pairs the forward fused (mpifc.nn.fuse) go back as one pass too
        fuse.backward(backward_layers(self.model), dy, on_layer)

    def _rows_done(self, p, i) -> None:
        """Block ``i`` of ``p``'s gradient is final (``Parameter.on_grad_rows``): start its
        bucket if that was the bucket's last missing piece."""
        if not self._armed or (id(p), i) in self._done:
            return
        buckets = self._piece_bucket.get(id(p))
        if buckets is None:
            return
        self._done.add((id(p), i))
        b = buckets[i]
        b.pending -= 1
        if b.pending == 0:
            self._reduce(b)
        elif self._poll:
            self._test_pending()

    def _layer_done(self, layer) -> None:
        """``layer``'s gradients are final: its blocks not announced yet are done, in
        buffer order (parameters reversed, rows ascending), so buckets start in index order."""
        for p in reversed(layer.parameters()):
            for i in range(len(self._piece_bucket.get(id(p), ()))):
                self._rows_done(p, i)
        if self._poll:
            self._test_pending()

    def _test_pending(self) -> None:
        """progress="poll": one MPI_Test per in-flight bucket, from the main thread,
        between layers and weight-gradient row blocks (MPICH moves a non-blocking
        collective forward only inside MPI calls)."""
        for b in self._launched:
            if b.request is not None and not b.tested_done:
                b.tested_done = b.request.test()

    def _reduce(self, b: Bucket) -> None:
        self._launched.append(b)
        if b.numel == 0:           # every rank of the group has the same empty shard
            return
        for p, *_ in b.pieces:     # a parameter that got no gradient: its zeros, now
            p.settle_grad()
        t0 = _perf()
        with trace.phase(b.phase):
            if self.overlap:
                b.request = self.group.iallreduce(b.buffer, out=b.buffer)
                if self._progress is not None:
                    self._progress.add(b.request)
                self.timings["post"] += _perf() - t0
            else:
                self.group.allreduce(b.buffer, out=b.buffer)
                self.timings["blocking"] += _perf() - t0

    def synchronize(self) -> None:
        """Wait for every bucket's allreduce: then ``grad`` = mean over the group's ranks."""
        if self._progress is not None:
            self._progress.stop()
        t0 = _perf()
        for b in self._launched:
            if b.request is not None:
                with trace.phase(b.phase):    # the event is recorded at wait
                    b.request.wait()
                b.request = None
        self.timings["wait"] = _perf() - t0
        self._launched = []

    # --- clipping ---
    def clip_grad_norm(self, max_norm: float, grid=None) -> float:
        """Clip by the global norm (see :func:`clip_grad_norm_grid`); after :meth:`synchronize`."""
        return clip_grad_norm_grid(self.params, max_norm, grid or getattr(self.model, "grid", None))

    # --- description ---
    def collectives(self) -> list[Collective]:
        """The messages of one synchronised step: one (i)allreduce per non-empty bucket."""
        if self.group.size == 1:
            return []
        op = "iallreduce" if self.overlap else "allreduce"
        return [Collective(b.phase, op, self.group.name, b.numel, b.dtype.itemsize)
                for b in self.buckets if b.numel]

    def __repr__(self):
        sizes = ", ".join(f"{b.nbytes / 2**20:.2f}" for b in self.buckets)
        return (f"DataParallel(group={self.group.name} size {self.group.size}, "
                f"{len(self.buckets)} buckets [{sizes}] MiB, overlap={self.overlap})")


# --------------------------------------------------------------------------- #
# gradient clipping on a grid
# --------------------------------------------------------------------------- #
def clip_grad_norm_grid(params, max_norm, grid, eps=1e-6) -> float:
    """Clip gradients by their global L2 norm over the whole (dp x tp) model.

    Sharded parameters (``sharding.axis`` set, group "tp") contribute their local
    sum of squares on every tensor rank; replicated ones are counted once (on
    tensor rank 0); one allreduce over the tensor group (phase ``clip.norm``, 1
    float64) completes the sum. Data-parallel replicas hold identical gradients
    after :meth:`DataParallel.synchronize`, so nothing crosses the data group, and
    every rank gets the same norm. ``grid`` None (or tp = 1) sends nothing.

    Returns the norm before clipping (a Python float, the same on all ranks).
    """
    params = list(params)
    tp_comm = None if grid is None or grid.tp == 1 else grid.tp_comm
    counted = [p for p in params if (p.sharding is not None and p.sharding.axis is not None)
               or tp_comm is None or tp_comm.rank == 0]

    def complete(sq: float) -> float:
        buf = np.array([sq], dtype=np.float64)
        with trace.phase("clip.norm"):
            tp_comm.allreduce(buf, out=buf)
        return float(buf[0])

    return clip_grad_norm(params, max_norm, norm_reduce=complete if tp_comm is not None else None,
                          eps=eps, counted=counted)


def clip_collectives(grid) -> list[Collective]:
    """The message of :func:`clip_grad_norm_grid` on ``grid``."""
    if grid is None or grid.tp == 1:
        return []
    return [Collective("clip.norm", "allreduce", grid.tp_comm.name, 1, 8)]
