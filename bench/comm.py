"""Latency and bandwidth of mpifc collectives beside the raw mpi4py buffer calls.

    mpiexec -n 2 python bench/comm.py [--max-bytes 67108864] [--ops allreduce,allgather]

For each op and message size (4 B .. 64 MiB) three variants run interleaved on the
same preallocated buffers: raw mpi4py (uppercase call), mpifc with tracing on,
mpifc with tracing off. Each figure is the median over repeats of the per-call time
(max over ranks). Bandwidth is message bytes / time. "ratio" is mpifc-traced
bandwidth over raw (1.00 = no loss); "+us" the extra microseconds per call.
"best" is the same ratio from the fastest repeat of each variant: on a machine
shared with other work the median carries that work's bursts, the fastest repeat
is the cost of the calls themselves (both are printed; neither replaces the other).

Reading "+us": at 2 ranks on one host, time a rank spends outside the MPI call shows up
about twice in the per-call time of mid-sized collectives (measured here: a 2 us spin
after each 64 KiB Allgather, on one rank or both, added 3.9-4.7 us per call), so the
wrapper's ~0.5 us of Python per traced call reads as ~1 us in this table.
"""
import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mpifc.comm import trace, world  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--max-bytes", type=int, default=64 << 20)
p.add_argument("--ops", default="allreduce,allgather,reduce_scatter,bcast")
p.add_argument("--repeats", type=int, default=7)
p.add_argument("--budget", type=float, default=0.05, help="seconds per timed block")
args = p.parse_args()

comm = world()
raw = comm.mpi                      # the mpi4py communicator underneath
P, rank = comm.size, comm.rank
sizes = [4 << (2 * i) for i in range(13) if (4 << (2 * i)) <= args.max_bytes]   # 4 B, 16 B, ... 64 MiB


def make(op, nbytes):
    """Buffers and the three callables (raw, mpifc) for one op and message size."""
    n = max(nbytes // 4, 1)
    x = np.ones(n, np.float32)
    if op == "allreduce":
        y = np.empty_like(x)
        return (lambda: raw.Allreduce(x, y)), (lambda: comm.allreduce(x, out=y))
    if op == "allgather":          # each rank contributes nbytes / P
        m = max(n // P, 1)
        xs, y = np.ones(m, np.float32), np.empty(m * P, np.float32)
        return (lambda: raw.Allgather(xs, y)), (lambda: comm.allgather(xs, out=y))
    if op == "reduce_scatter":
        m = max(n // P, 1)
        xs, y = np.ones(m * P, np.float32), np.empty(m, np.float32)
        return (lambda: raw.Reduce_scatter_block(xs, y)), (lambda: comm.reduce_scatter(xs, out=y))
    if op == "bcast":
        return (lambda: raw.Bcast(x, 0)), (lambda: comm.bcast(x, 0))
    raise SystemExit(f"unknown op {op}")


def per_call(fn, iters):
    raw.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t0) / iters
    return max(raw.allgather(dt))       # the slowest rank's time


if rank == 0:
    print(f"bench/comm.py: {P} ranks, median of {args.repeats} repeats, float32 buffers")
    print(f"{'op':<15}{'bytes':>10}{'raw us':>10}{'mpifc us':>10}{'untraced':>10}"
          f"{'raw GB/s':>10}{'mpifc GB/s':>11}{'ratio':>7}{'+us':>7}{'+us untr':>9}{'best':>7}")
for op in args.ops.split(","):
    for nbytes in sizes:
        f_raw, f_mpifc = make(op, nbytes)
        f_raw(), f_mpifc()                                  # warm-up
        t1 = per_call(f_raw, 1)
        iters = int(max(1, min(2000, args.budget / max(t1, 1e-7))))
        iters = raw.bcast(iters, root=0)
        r_raw, r_on, r_off = [], [], []
        for i in range(args.repeats):
            # rotate the order so drift and warm-up favour no variant
            for k in [(i + j) % 3 for j in range(3)]:
                if k == 0:
                    r_raw.append(per_call(f_raw, iters))
                elif k == 1:
                    trace.enable()
                    r_on.append(per_call(f_mpifc, iters))
                    trace.reset()
                else:
                    trace.disable()
                    r_off.append(per_call(f_mpifc, iters))
        a, b, c = np.median(r_raw), np.median(r_on), np.median(r_off)
        if rank == 0:
            print(f"{op:<15}{nbytes:>10}{a * 1e6:>10.2f}{b * 1e6:>10.2f}{c * 1e6:>10.2f}"
                  f"{nbytes / a / 1e9:>10.3f}{nbytes / b / 1e9:>11.3f}{a / b:>7.3f}"
                  f"{(b - a) * 1e6:>7.2f}{(c - a) * 1e6:>9.2f}{min(r_raw) / min(r_on):>7.3f}",
                  flush=True)
trace.enable()
