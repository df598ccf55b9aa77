"""``mpifc calibrate``: measure this machine and write its cluster TOML.

Run under mpiexec on the machines to describe (every rank calls :func:`calibrate`):

    mpiexec -n 4 python -m mpifc calibrate --out cluster.toml

What is measured, all through the mpifc communicator with tracing off (so the costs
are those of the same uppercase mpi4py buffer calls the trainer makes):
  * nodes: ranks grouped by host name (MPI_Get_processor_name);
  * ping-pong, one way = half a round trip, 8 B .. 4 MiB, between world rank 0 and a
    rank on its node (intra) and a rank on another node (inter, if the job spans
    nodes) -> LinkModel breakpoints (LinkModel.from_pingpong);
  * the MPI library's own collectives (allreduce, allgather, reduce_scatter, bcast,
    reduce, alltoall) over message sizes and group sizes 2..P, each group being the
    first g world ranks (a sub-communicator) -> MeasuredTable entries, which the cost
    model prefers to its closed forms, so the library's real switch points are used;
    and allreduce on a 1-rank communicator (the call's own cost, for groups of one);
  * with 2 or more ranks, the overlap efficiency: how much of a 1 MiB iallreduce
    (or max_bytes if smaller) hides behind compute when posted the way DataParallel
    posts a gradient bucket (:func:`_overlap_efficiency`);
  * local rates on every rank at once (as in training): float32 GEMM at a few sizes
    and thin products (the aspect curve), convolution through
    mpifc.nn.functional.conv2d_forward (im2col + GEMM) when that module is present,
    else the GEMM rate stands in for conv (said in the notes), element-wise and
    layer-kernel bandwidth over sizes, the per-call costs (trivial calls, small
    reductions), strided rows, and the rate of a local sum (gamma); each the slowest
    rank's time in the fastest of several sweeps (:func:`_sweep_local_times`).

Collective timing: after a short warm-up, per trial a barrier, then k calls, each
after untimed cache-evicting work and timed alone on every rank (as a step calls
them, :func:`_measure_group`); the trial time is the maximum over ranks (one
allreduce at the end of a series), and the result is the median over trials. Times
are then made non-decreasing in message size (:func:`lower_envelope`: noise only
adds time). Ranks outside a measured group wait at the next world barrier.
"""
from __future__ import annotations

import itertools
import os
import statistics
import time

import numpy as np

from mpifc.comm import processor_name, trace, world
from mpifc.sim.cluster import (Cluster, ComputeRates, LinkModel, MeasuredTable, Thresholds,
                               fastest_of, preset)

_perf = time.perf_counter

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "bcast", "reduce", "alltoall")


def _sizes(lo: int, hi: int, factor: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def _inner_reps(nbytes: int, quick: bool) -> int:
    """Back-to-back calls per trial: many for tiny messages (timer and skew), few for big."""
    if nbytes <= 4096:
        return 10 if quick else 40
    if nbytes <= 262144:
        return 4 if quick else 10
    return 1 if quick else 3


def lower_envelope(seconds) -> list[float]:
    """Times made non-decreasing in message size: t'(n) = min over sizes >= n of t.

    On a shared machine noise only ever adds time (another process, a page fault, a
    scheduler tick), so where a larger message was measured faster than a smaller one,
    the smaller one's measurement is the noisy one.
    """
    out, best = [], float("inf")
    for t in reversed(list(seconds)):
        best = min(best, t)
        out.append(best)
    return out[::-1]


def _warm_up(comm, seconds: float = 0.3) -> None:
    """Exercise the library for a moment: first calls set up connections and caches."""
    x = np.ones(1024, dtype=np.float32)
    t_end = _perf() + seconds
    go = 1
    while go:
        comm.allreduce(x, out=x)
        x[:] = 1
        go = int(comm.bcast(np.array([_perf() < t_end], dtype=np.int32), root=0)[0])


def _node_layout(comm):
    """(node index of every world rank, host names in node order)."""
    names = comm.allgather_obj(processor_name())
    hosts: list[str] = []
    for h in names:
        if h not in hosts:
            hosts.append(h)
    return [hosts.index(h) for h in names], hosts


# --------------------------------------------------------------------------- ping-pong
def _pingpong(comm, a: int, b: int, sizes, trials: int, quick: bool) -> list[float]:
    """One-way times between world ranks a and b (others return an empty list)."""
    out = []
    buf = np.zeros(max(sizes) // 4 + 1, dtype=np.float32)
    for n in sizes:
        x = buf[: max(n // 4, 1)]
        k = _inner_reps(n, quick)
        times = []
        if comm.rank in (a, b):
            peer = b if comm.rank == a else a
            for _ in range(trials + 1):                    # first round warms up
                t0 = _perf()
                for _ in range(k):
                    if comm.rank == a:
                        comm.sendrecv(x, peer, None, None)
                        comm.sendrecv(None, None, x, peer)
                    else:
                        comm.sendrecv(None, None, x, peer)
                        comm.sendrecv(x, peer, None, None)
                times.append((_perf() - t0) / (2 * k))
            out.append(statistics.median(times[1:]))
    comm.barrier()
    return lower_envelope(out)


# ---------------------------------------------------------------------------- collectives
def _run_collective(g, op: str, nbytes: int) -> tuple[int, callable]:
    """(bytes in the cost model's convention, a no-argument call) for op on group g."""
    p = g.size
    if op in ("allreduce", "bcast", "reduce"):
        elems = max(nbytes // 4, 1)
        x = np.ones(elems, dtype=np.float32)
        y = np.empty_like(x)
        calls = {"allreduce": lambda: g.allreduce(x, out=y),
                 "bcast": lambda: g.bcast(x, root=0),
                 "reduce": lambda: g.reduce(x, root=0)}
        return elems * 4, calls[op]
    per = max(nbytes // (4 * p), 1)        # elements per rank block
    if op == "allgather":
        x = np.ones(per, dtype=np.float32)
        y = np.empty(per * p, dtype=np.float32)
        return per * p * 4, lambda: g.allgather(x, out=y)
    if op == "reduce_scatter":
        x = np.ones(per * p, dtype=np.float32)
        y = np.empty(per, dtype=np.float32)
        return per * p * 4, lambda: g.reduce_scatter(x, out=y)
    if op == "alltoall":
        x = np.ones(per * p, dtype=np.float32)
        y = np.empty_like(x)
        return per * p * 4, lambda: g.alltoall(x, out=y)
    raise ValueError(f"calibrate cannot measure {op!r}")


#: bytes swept between two timed collective calls (twice a 1 MiB L2; see _between_calls)
BETWEEN_BYTES = 2 << 20


def _between_calls():
    """Work run (untimed) before each timed collective call, as a training step runs
    its layers between two collectives: one touch per cache line of BETWEEN_BYTES and
    the call mix once, so the call finds the data and code caches as a step leaves them."""
    junk = np.zeros(BETWEEN_BYTES // 4, dtype=np.float32)
    mix = _in_turn(_call_mix())

    def work():
        junk[::16] += 1.0
        mix()
    return work


def _measure_group(g, op: str, sizes, trials: int, quick: bool):
    """Median over trials of the max over ranks of one call's time, per size.

    Each call is timed alone, after :func:`_between_calls` work and with no barrier in
    between (a barrier would warm up the very paths the call takes): the time of a
    collective inside a training step, where it finds its buffers and MPI's own state
    out of the caches and the ranks arrive a little apart. Back-to-back calls measured
    2-5 us less for small messages and 8-15 us less at 64 KiB - 512 KiB on 2 ranks
    here, and in-step calls about twice their back-to-back time."""
    work = _between_calls()
    actual, local = [], []
    for n in sizes:
        nb, call = _run_collective(g, op, n)
        k = _inner_reps(nb, quick)
        call()                                              # warm-up (and connection setup)
        row = []
        for _ in range(trials):
            g.barrier()
            total = 0.0
            for _ in range(k):
                work()
                t0 = _perf()
                call()
                total += _perf() - t0
            row.append(total / k)
        actual.append(nb)
        local.append(row)
    worst = g.allreduce(np.asarray(local, dtype=np.float64), op="max")
    return actual, lower_envelope(float(np.median(r)) for r in worst)


# ---------------------------------------------------------------------------- overlap
def _overlap_efficiency(comm, nbytes: int, trials: int) -> float:
    """Share of a non-blocking allreduce's time hidden behind compute (-1..1; below 0
    when posting, testing and waiting cost more than the blocking call).

    As DataParallel runs a bucket: post the iallreduce, compute for twice its blocking
    time in 4 chunks with an MPI_Test between them (its "poll" progress), then wait.
    hidden = (compute alone + blocking allreduce - that whole sequence) / blocking
    allreduce, each the slowest rank's time and the median over trials. The compute is
    a fixed count of small GEMMs (fine-grained, so no chunk overshoots its share)."""
    x = np.ones(max(nbytes // 4, 1), dtype=np.float32)
    a = np.ones((32, 32), dtype=np.float32)

    def timed(fn):
        out = []
        for _ in range(trials):
            comm.barrier()
            t0 = _perf()
            fn()
            out.append(_perf() - t0)
        return out

    t_block = timed(lambda: comm.allreduce(x, out=x))
    t0 = _perf()
    for _ in range(50):
        a @ a
    per_gemm = max((_perf() - t0) / 50, 1e-8)
    blk = float(np.median(comm.allreduce(np.asarray(t_block), op="max")))
    n = max(int(2 * blk / 4 / per_gemm), 1)
    n = int(comm.allreduce(np.array([n]), op="max")[0])      # the same work on every rank

    def work():
        for _ in range(n):
            a @ a

    def chunks(req=None):
        for _ in range(4):
            work()
            if req is not None:
                req.test()

    def overlapped():
        req = comm.iallreduce(x, out=x)
        chunks(req)
        req.wait()

    t_comp = timed(chunks)
    t_both = timed(overlapped)
    worst = comm.allreduce(np.asarray([t_block, t_comp, t_both]), op="max")
    blk, comp, both = (float(np.median(r)) for r in worst)
    return min(max((comp + blk - both) / blk, -1.0), 1.0)


def overlap_meaning(eff: float) -> str:
    """What an overlap efficiency means, in one line (printed by ``mpifc calibrate``)."""
    if eff >= 0.995:
        return "a non-blocking allreduce hides wholly behind compute"
    if eff > 0.005:
        return f"{eff:.0%} of a non-blocking allreduce hides behind compute"
    if eff > -0.005:
        return "nothing hides: a non-blocking allreduce costs what a blocking one does"
    clamp = ", at least: -1 is the floor" if eff <= -0.995 else ""
    return (f"posting and waiting for a non-blocking allreduce takes longer than a blocking "
            f"one here (by {-eff:.0%} of its time{clamp}), so the simulator models the "
            "gradient overlap as a loss")


# ---------------------------------------------------------------------------- compute
#: shortest trial of a local-rate measurement (s): long enough that the ranks, started
#: together by a barrier, run their kernels at the same time and share the memory
#: system and the cores' caches as they do in training
MIN_TRIAL_S = 1e-3


def _median_time(fn, reps: int, inner: int = 1, comm=None) -> float:
    """Median over ``reps`` trials of the time of one call, each trial at least ``inner``
    calls and at least MIN_TRIAL_S long; with ``comm``, a barrier starts every trial."""
    t0 = _perf()
    fn()
    one = max(_perf() - t0, 1e-7)
    inner = max(inner, int(MIN_TRIAL_S / one) + 1) if comm is not None else inner
    ts = []
    for _ in range(reps):
        if comm is not None:
            comm.barrier()
        t0 = _perf()
        for _ in range(inner):
            fn()
        ts.append((_perf() - t0) / inner)
    return statistics.median(ts)


def _in_turn(calls):
    """One call that makes each of ``calls`` once, in order."""
    def run():
        for f in calls:
            f()
    return run


def _call_mix():
    """Trivial calls of the kinds the layers, losses and optimizers make on small arrays
    (a ufunc into a buffer, an allocating ufunc, reductions, fancy indexing, a
    comparison with any(), a view, a slice store, an allocation): their mean time is the per-call cost ``call_s``."""
    a = np.ones(4, dtype=np.float32)
    b = np.ones(4, dtype=np.float32)
    c = np.empty(4, dtype=np.float32)
    m = np.ones((2, 2), dtype=np.float32)
    idx = np.array([0, 1])
    return [lambda: np.maximum(a, 0, out=c), lambda: a * b, lambda: m.sum(axis=0),
            lambda: m.max(axis=1, keepdims=True), lambda: m[idx, idx], lambda: (a > 0).any(),
            lambda: m.reshape(4), lambda: c.__setitem__(slice(0, 2), b[:2]),
            lambda: np.zeros(4, dtype=np.float32)]


def _reduce_mix(rng):
    """Small reductions and indexing on a (64, 5) batch of class scores, the calls a
    loss and its metrics make (a max and an argmax along an axis, a sum, a mean, exp
    of a broadcast difference, a comparison pair, nonzero, fancy indexing in and out,
    np.full, any along an axis): their mean time is ``reduce_call_s``."""
    z = rng.standard_normal((64, 5), dtype=np.float32)
    t = np.arange(64) % 5
    m = z.max(axis=1)
    hit = z == m[:, None]
    rows = np.arange(0, 64, 2)
    out = np.zeros(64, dtype=np.float32)
    return [lambda: z.max(axis=1), lambda: np.argmax(hit, axis=1), lambda: z.sum(axis=1),
            lambda: z.mean(), lambda: np.exp(z - m[:, None]), lambda: (t >= 0) & (t < 5),
            lambda: np.nonzero(t)[0], lambda: z[rows, t[rows]],
            lambda: out.__setitem__(rows, z[rows, 0]), lambda: np.full(64, 5, dtype=np.int64),
            lambda: hit.any(axis=1)]


#: element counts of the element-wise curve (float32: 1 KiB .. 4 MiB arrays)
ELEMENTWISE_ELEMS = (256, 1024, 4096, 16384, 65536, 262144, 1 << 20)


#: sweeps of the local measurements per calibration round, (quick, full): about 0.6 s
#: and 2.5 s on one core here (see :func:`_sweep_local_times`)
SWEEPS = (4, 8)
#: rows of 4 elements in each strided pass (a (64, 32, 8, 8) array's (64, 32, 8) rows / 2)
STRIDED_ROWS = 16384
#: float32 elements of the streaming add that gives the reduction rate (4 MiB)
REDUCTION_ELEMS = 1 << 20
#: elements of each masked store timed for ComputeRates.masked_s
MASKED_ELEMS = 32768
#: the two wide dimensions of the thin products (ComputeRates.gemm_aspect_curve)
GEMM_THIN_SIDE = 256


def _thin_dims(quick: bool) -> tuple:
    """The thin dimension of the thin products measured (quick: every other one)."""
    return (4, 16, 64) if quick else (4, 8, 16, 32, 64, 128)


def _local_times(comm, quick: bool, rng) -> tuple[list, dict]:
    """One sweep of the local measurements: (seconds in a fixed order, what was measured:
    {"gemm": square GEMM flops, "thin": thin dimensions, "conv": conv flops}); see
    :func:`_derive_rates` for what they are."""
    reps = 3 if quick else 5
    local = []                                   # seconds, in a fixed order

    # per-call cost: a mix of trivial calls run one after the other, as a layer's code
    # runs them (the same call 200 times in a row measured ~17 % less per call here:
    # warm branch predictors and caches that a training step does not give)
    mix = _call_mix()

    local.append(_median_time(_in_turn(mix), reps, 200, comm) / len(mix))
    # small reductions and indexing, as a loss and its metrics make them
    rmix = _reduce_mix(rng)
    local.append(_median_time(_in_turn(rmix), reps, 50, comm) / len(rmix))
    # masked stores with data-dependent masks (max pooling's argmax): 16 random masks in
    # turn, so that the branch predictor cannot learn one (it did, within ~32K elements)
    masks = [rng.random(MASKED_ELEMS) > 0.5 for _ in range(16)]
    dest = np.zeros(MASKED_ELEMS, dtype=np.uint8)
    turn = itertools.cycle(masks)

    def masked_store():
        np.putmask(dest, next(turn), 3)
    local.append(_median_time(masked_store, reps, 16, comm) / MASKED_ELEMS)

    # element-wise kernel (a binary ufunc: two reads, one write) over array sizes
    ew = []
    for n in (4,) + ELEMENTWISE_ELEMS:
        x = np.ones(n, dtype=np.float32)
        y = np.ones_like(x)
        z = np.empty_like(x)
        ew.append(_median_time(lambda: np.add(x, y, out=z), reps, max(1, 4096 // n), comm))
    local += ew

    # the layers' own element-wise kernels: the ReLU forward + backward pair, which the
    # workload prices as relu_fwd + relu_bwd passes in 3 calls (maximum, compare, multiply)
    # -- the NumPy pair, whatever the host kernels: the compiled ReLU moves fewer bytes
    # than those passes count, and timing it here inflated the rate every NumPy pass
    # is priced at (digits-cnn predicted 34 % under its measured step)
    from mpifc.nn import hostjit
    from mpifc.nn.functional import relu_backward, relu_forward
    kern = []
    with hostjit.using("numpy"):
        for n in (4,) + ELEMENTWISE_ELEMS:
            x = rng.standard_normal(n, dtype=np.float32)
            dy = np.ones_like(x)
            kern.append(_median_time(lambda: relu_backward(dy, relu_forward(x)[1]), reps,
                                     max(1, 4096 // n), comm))
    local += kern

    # strided passes over a 4-d (N, C, H, W) view, 16384 rows of 4 elements: (a) every
    # other row and column (a pooling window), (b) the first 4 of 8 columns (an im2col
    # offset); less the same bytes at the element-wise curve's rate
    src = np.ones((64, 32, 8, 8), dtype=np.float32)
    dst_a = np.zeros((64, 32, 4, 4), dtype=np.float32)   # zeros: no NaN or denormal garbage
    dst_b = np.zeros((64, 32, 8, 4), dtype=np.float32)
    # a binary ufunc (a strided view and a contiguous array), as pooling and col2im do
    t_str = [_median_time(lambda: np.add(src[:, :, ::2, ::2], dst_a, out=dst_a), reps, 4, comm) * 2,
             _median_time(lambda: np.add(src[:, :, :, :4], dst_b, out=dst_b), reps, 4, comm)]
    local += t_str

    # GEMMs as the layers run them (mpifc.nn.hostblas: oneMKL when installed)
    from mpifc.nn import hostblas
    gemm = []
    for m in ((32, 64, 128, 256) if quick else (32, 64, 128, 256, 512)):
        a = rng.standard_normal((m, m), dtype=np.float32)
        b = rng.standard_normal((m, m), dtype=np.float32)
        t = _median_time(lambda: hostblas.matmul(a, b), reps, max(1, 64 // m * 4), comm)
        gemm.append((2.0 * m ** 3, t))
    local += [t for _, t in gemm]
    # thin products as a linear layer makes them (x @ W.T, dy[:, rows].T @ x, dy @ W):
    # GEMM_THIN_SIDE wide, d thin as the batch and as the output features
    from mpifc.nn.functional import linear_backward_input, linear_backward_weight, linear_forward
    L = GEMM_THIN_SIDE
    for d in _thin_dims(quick):
        for N, D, Fo in ((d, L, L), (L, L, d)):
            x = rng.standard_normal((N, D), dtype=np.float32)
            w = rng.standard_normal((Fo, D), dtype=np.float32)
            dy = rng.standard_normal((N, Fo), dtype=np.float32)
            local.append(_median_time(lambda: linear_forward(x, w), reps, 1, comm))
            local.append(_median_time(lambda: linear_backward_weight(dy, x), reps, 1, comm))
            local.append(_median_time(lambda: linear_backward_input(dy, w), reps, 1, comm))
    conv = []
    try:
        from mpifc.nn.functional import conv2d_forward
    except ImportError:
        conv2d_forward = None
    if conv2d_forward is not None:
        for (N, C, H, K) in ((4, 8, 16, 16), (8, 16, 32, 32)):
            x = rng.standard_normal((N, C, H, H), dtype=np.float32)
            w = rng.standard_normal((K, C, 3, 3), dtype=np.float32)
            t = _median_time(lambda: conv2d_forward(x, w, None, 1, 1), reps, 1, comm)
            conv.append((2.0 * N * K * C * 9 * H * H, t))
    local += [t for _, t in conv]
    big = np.ones(REDUCTION_ELEMS, dtype=np.float32)
    other = np.ones_like(big)
    local.append(_median_time(lambda: np.add(big, other, out=big), reps, 1, comm))
    return local, {"gemm": [f for f, _ in gemm], "thin": _thin_dims(quick),
                   "conv": [f for f, _ in conv]}


def _sweep_local_times(comm, quick: bool, sweeps: int | None = None, best=None):
    """(times, what was measured) as :func:`_local_times`: each time the slowest rank's,
    in the fastest of ``sweeps`` sweeps over all the local measurements, one after the
    other, and of ``best`` (the times of earlier rounds) when given.

    Why the fastest, and why of raw times: a virtual machine can run at two speeds in
    turns (here the same code took 1.35 us or 2.2 us per call, in stretches of 0.5 s to
    several seconds, from other tenants), and figures derived from one sweep then mix
    the two states (a GEMM timed fast, net of a call cost timed slow, gave 243 GFLOP/s
    on 32 x 32). The fastest of each measurement describes the machine without that
    load; rates are derived from them afterwards (:func:`_derive_rates`).
    """
    rng = np.random.default_rng(comm.rank)
    local = best
    for _ in range(sweeps or SWEEPS[0 if quick else 1]):
        t, what = _local_times(comm, quick, rng)
        # the slowest rank's time of this sweep: a step needs every rank at once, so
        # the fastest sweep is the one where all ranks were fast together
        t = list(comm.allreduce(np.asarray(t, dtype=np.float64), op="max"))
        local = t if local is None else [min(a, b) for a, b in zip(local, t)]
    return local, what


def _derive_rates(comm, local, what: dict) -> dict:
    """Local rates from the times of :func:`_sweep_local_times`, each the slowest rank's
    (all ranks measure at once, as in training): GEMM and conv curves, the element-wise
    curve, streaming element-wise and sum rates, the per-call cost and the per-row cost
    of strided passes."""
    worst = list(comm.allreduce(np.asarray(local, dtype=np.float64), op="max"))
    k = 3
    call_s, reduce_call_s, masked_s = float(worst[0]), float(worst[1]), float(worst[2])
    t_tiny = worst[k]                            # the kernel on 4 elements: its own call cost
    ew_t = worst[k + 1:k + 1 + len(ELEMENTWISE_ELEMS)]
    k += 1 + len(ELEMENTWISE_ELEMS)
    kern_t = worst[k:k + 1 + len(ELEMENTWISE_ELEMS)]
    k += 1 + len(ELEMENTWISE_ELEMS)
    s_pool, s_col = worst[k:k + 2]
    k += 2
    gemm_f, thin, conv_f = what["gemm"], what["thin"], what["conv"]
    ng, nc = len(gemm_f), len(conv_f)
    g_t = worst[k:k + ng]
    k += ng
    thin_t = worst[k:k + 6 * len(thin)]
    k += 6 * len(thin)
    c_t, t_red = worst[k:k + nc], worst[-1]

    def net(t):          # a call's time less the per-call cost (never below 10 % of it)
        return max(t - call_s, 0.1 * t)

    # (bytes per call, GB/s) with two reads + a write, net of the kernel's own call
    # cost (its time on 4 elements); times made non-decreasing in size first
    ew_t = lower_envelope(ew_t)
    elementwise_curve = [(12.0 * n, 12.0 * n / max(t - t_tiny, 0.1 * t) / 1e9)
                         for n, t in zip(ELEMENTWISE_ELEMS, ew_t)]
    # the ReLU pair the same way, its bytes as the workload counts them (3 calls)
    from mpifc.sim.workload import _PASSES
    per_elem = (_PASSES["relu_fwd"] + _PASSES["relu_bwd"]) * 4
    kern_tiny, kern_t = kern_t[0], lower_envelope(kern_t[1:])
    kernel_curve = [(per_elem * n / 3, per_elem * n / max(t - kern_tiny, 0.1 * t) / 1e9)
                    for n, t in zip(ELEMENTWISE_ELEMS, kern_t)]
    moved = 3.0 * 4 * STRIDED_ROWS * 4           # bytes of one strided add
    rates = ComputeRates(elementwise_curve=elementwise_curve)
    flat = t_tiny + moved / (rates.elementwise_rate(moved) * 1e9)
    row_s = max(0.5 * (s_pool + s_col) - flat, 0.0) / STRIDED_ROWS
    gemm_curve = [(f, f / net(t) / 1e9) for f, t in zip(gemm_f, g_t)]
    # each thin product against the square curve at its FLOPs (the mean of its 6 forms)
    square = ComputeRates(gemm_curve=gemm_curve, call_s=call_s)
    L = GEMM_THIN_SIDE
    aspect_curve = []
    for i, d in enumerate(thin):
        flops = 2.0 * L * L * d
        t = statistics.fmean(thin_t[6 * i:6 * i + 6])
        eff = square.seconds("gemm", flops=flops, calls=1) / t
        aspect_curve.append((d / (L * L * d) ** (1.0 / 3.0), min(eff, 1.0)))
    return {
        "gemm_curve": gemm_curve,
        "gemm_aspect_curve": aspect_curve,
        "conv_curve": [(f, f / t / 1e9) for f, t in zip(conv_f, c_t)] or None,
        "elementwise_gbps": elementwise_curve[-1][1],
        "elementwise_curve": elementwise_curve,
        "kernel_curve": kernel_curve,
        "reduction_Bps": 4.0 * REDUCTION_ELEMS / t_red,        # bytes of one operand
        "call_s": call_s,
        "reduce_call_s": reduce_call_s,
        "masked_s": masked_s,
        "row_s": row_s,
    }


# ---------------------------------------------------------------------------- driver
def calibrate(out: str | os.PathLike | None = None, *, quick: bool = False,
              max_bytes: int | None = None, ops=COLLECTIVES, inter_preset: str | None = None,
              name: str | None = None, rounds: int = 1, between_rounds=None,
              log=None) -> Cluster:
    """Measure this job's machines; every rank calls it and gets the same Cluster.

    out           TOML path written by rank 0 (None: do not write)
    quick         fewer sizes, ops and trials (for tests: a few seconds at 2 ranks)
    max_bytes     largest message measured (default 4 MiB, quick 256 KiB)
    ops           collectives to measure
    inter_preset  when the job runs on one node, the inter-node link is taken from this
                  network preset (default: a copy of the measured intra-node link,
                  which says nothing about a network; the notes say so)
    rounds        measure everything this many times, one round after the other, and
                  keep the fastest: of each link and collective figure
                  (:func:`mpifc.sim.cluster.fastest_of`), of each local measurement
                  before the compute rates are derived (:func:`_sweep_local_times`).
                  For machines whose speed comes and goes with other work (shared or
                  virtual machines): the result describes the machine without it
    between_rounds  callable(k) every rank runs after round k (0 .. rounds - 1): work
                  to interleave with the rounds, e.g. the steps a benchmark measures,
                  so that the calibration samples the same stretch of time as they do
    log           callable(str) for progress lines (rank 0 only), e.g. print
    """
    if rounds < 1:
        raise ValueError(f"calibrate: rounds must be >= 1 (got {rounds})")
    comm = world()
    say = (log if (log is not None and comm.rank == 0) else (lambda s: None))
    t_start = _perf()
    got, best = [], None
    for k in range(rounds):
        if rounds > 1:
            say(f"round {k + 1} of {rounds}")
        c, best = _calibrate_once(comm, quick, max_bytes, ops, inter_preset, name, say, best)
        got.append(c)
        if between_rounds is not None:
            between_rounds(k)
    cluster = fastest_of(got) if rounds > 1 else got[0]
    # the last round's rates come from the fastest time of every local measurement
    # over all the rounds (see _sweep_local_times), before any figure was derived
    cluster.compute = got[-1].compute
    # rank 0's clock for the note: a time that rounds differently per rank would
    # make the ranks' descriptions differ
    elapsed = comm.bcast_obj(_perf() - t_start if comm.rank == 0 else None)
    cluster.notes += (f"\ncalibration took {elapsed:.1f} s" + (" (quick mode)" if quick else "")
                      + (f"; the fastest of {rounds} rounds (links and collectives: of "
                         "each figure; compute rates: of each local measurement)"
                         if rounds > 1 else ""))
    if out is not None and comm.rank == 0:
        cluster.save(out)
    comm.barrier()
    return cluster


def _calibrate_once(comm, quick, max_bytes, ops, inter_preset, name, say, best=None):
    """One round of every measurement (see :func:`calibrate`), on every rank:
    (the Cluster, this rank's local times). ``best``: this rank's local times of the
    earlier rounds; the compute rates come from the fastest of them and this round's."""
    t_start = _perf()
    with trace.disabled():
        node_of, hosts = _node_layout(comm)
        P = comm.size
        counts = [node_of.count(i) for i in range(len(hosts))]
        rpn = max(counts)
        notes = [f"calibrated with {P} ranks on {len(hosts)} node(s): "
                 + ", ".join(f"{h}:{c}" for h, c in zip(hosts, counts)),
                 f"BLAS threads per rank: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"]
        max_bytes = max_bytes or (262144 if quick else 4 << 20)
        trials = 3 if quick else 7
        _warm_up(comm, 0.1 if quick else 0.5)

        # links
        pp_sizes = _sizes(8, max_bytes, 8 if quick else 4)
        same = [r for r in range(1, P) if node_of[r] == node_of[0]]
        other = [r for r in range(1, P) if node_of[r] != node_of[0]]
        intra = inter = None
        if same:
            t = _pingpong(comm, 0, same[0], pp_sizes, trials, quick)
            intra = comm.bcast_obj(t if comm.rank == 0 else None)
            say(f"ping-pong intra-node: {[f'{x * 1e6:.2f}us' for x in intra]}")
        if other:
            t = _pingpong(comm, 0, other[0], pp_sizes, trials, quick)
            inter = comm.bcast_obj(t if comm.rank == 0 else None)
            say(f"ping-pong inter-node: {[f'{x * 1e6:.2f}us' for x in inter]}")
        if intra is None and inter is None:
            base = preset("shm-node")
            intra_link, inter_link = base.intra, base.inter
            notes.append("one rank: no link measured; links are the shm-node preset "
                         "(textbook figures)")
        else:
            intra_link = LinkModel.from_pingpong(pp_sizes, intra) if intra else None
            inter_link = LinkModel.from_pingpong(pp_sizes, inter) if inter else None
            if intra_link is None:
                intra_link = inter_link
                notes.append("one rank per node: intra-node link not measured, set to inter")
            if inter_link is None:
                if inter_preset:
                    inter_link = preset(inter_preset).inter
                    notes.append(f"one node: inter-node link from preset {inter_preset} "
                                 "(textbook figures, not measured)")
                else:
                    inter_link = intra_link
                    notes.append("one node: inter-node link NOT measured; it is a copy of the "
                                 "intra-node link. Calibrate across nodes or pass a network preset.")

        # collectives over group sizes 2..P: the first g world ranks
        measured = []
        coll_sizes = _sizes(8, max_bytes, 16 if quick else 8)
        ops = tuple(ops) if not quick else tuple(o for o in ops if o in
                                                ("allreduce", "allgather", "reduce_scatter", "bcast"))
        # a 1-rank communicator: the call's own cost (wrapper, MPI's checks, the copy),
        # which a step pays for a collective over a group of one (e.g. the trainer's
        # finiteness check at 1 rank); every rank measures at once, as in training
        solo = comm.split(comm.rank, name="calib1")
        nb, secs = _measure_group(solo, "allreduce", coll_sizes, trials, quick)
        secs = list(comm.allreduce(np.asarray(secs, dtype=np.float64), op="max"))
        measured.append(MeasuredTable("allreduce", 1, 1, nb, secs))
        for g_size in range(2, P + 1):
            member = comm.rank < g_size
            sub = comm.split(0 if member else 1, key=comm.rank, name=f"calib{g_size}")
            span = len(set(node_of[:g_size]))
            if member:
                for op in ops:
                    nb, secs = _measure_group(sub, op, coll_sizes, trials, quick)
                    measured.append(MeasuredTable(op, g_size, span, nb, secs))
            comm.barrier()
            say(f"collectives on {g_size} ranks measured ({_perf() - t_start:.1f}s)")
        measured = comm.bcast_obj(measured if comm.rank == 0 else None)
        if P > 1:
            ov_bytes = min(1 << 20, max_bytes)
            # every rank computes the same figure (medians of the slowest rank's times)
            overlap = _overlap_efficiency(comm, ov_bytes, trials * 3)
            notes.append(f"overlap efficiency {overlap:.2f}: the share of a {ov_bytes} B "
                         "iallreduce hidden behind compute (posted, then 4 compute chunks "
                         "with an MPI_Test between them, then wait): "
                         + overlap_meaning(overlap))
            say(f"overlap efficiency {overlap:.2f} ({ov_bytes} B iallreduce): "
                + overlap_meaning(overlap))
        else:
            overlap = 1.0
            notes.append("one rank: overlap efficiency not measured (1.0, nothing to overlap)")

        # local rates
        local, what = _sweep_local_times(comm, quick, best=best)
        rates = _derive_rates(comm, local, what)
        if rates["conv_curve"] is None:
            rates["conv_curve"] = rates["gemm_curve"]
            notes.append("mpifc.nn.functional.conv2d_forward not available: conv rate = GEMM rate")
        else:
            notes.append("conv rate measured with mpifc.nn.functional.conv2d_forward (im2col + GEMM)")
        rates = comm.bcast_obj(rates if comm.rank == 0 else None)
        say(f"GEMM {rates['gemm_curve'][-1][1]:.1f} GFLOP/s, conv {rates['conv_curve'][-1][1]:.1f} "
            f"GFLOP/s, elementwise {rates['elementwise_gbps']:.2f} GB/s "
            f"({rates['elementwise_curve'][0][1]:.2f} GB/s at {rates['elementwise_curve'][0][0]:.0f} B; "
            f"layer kernels {rates['kernel_curve'][-1][1]:.2f} GB/s), "
            f"sum {rates['reduction_Bps'] / 1e9:.2f} GB/s, call {rates['call_s'] * 1e6:.2f} us, "
            f"strided row {rates['row_s'] * 1e9:.1f} ns")
    cluster = Cluster(
        name=name or (hosts[0] if len(hosts) == 1 else f"{hosts[0]}+{len(hosts) - 1}"),
        nodes=len(hosts), ranks_per_node=rpn, intra=intra_link, inter=inter_link,
        reduction_Bps=rates["reduction_Bps"],
        compute=ComputeRates(gemm_gflops=rates["gemm_curve"][-1][1],
                             conv_gflops=rates["conv_curve"][-1][1],
                             elementwise_gbps=rates["elementwise_gbps"],
                             gemm_curve=rates["gemm_curve"], conv_curve=rates["conv_curve"],
                             elementwise_curve=rates["elementwise_curve"],
                             kernel_curve=rates["kernel_curve"],
                             gemm_aspect_curve=rates["gemm_aspect_curve"],
                             call_s=rates["call_s"], row_s=rates["row_s"],
                             reduce_call_s=rates["reduce_call_s"],
                             masked_s=rates["masked_s"]),
        thresholds=Thresholds(), measured=measured,
        hosts=[(h, c) for h, c in zip(hosts, counts)],
        source="mpifc calibrate", notes="\n".join(notes), overlap_efficiency=overlap)
    return cluster, local
