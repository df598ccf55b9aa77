"""A short communication demo: every collective once, traced, summary printed on rank 0.

    mpiexec -n 2 mpifc demo
"""
from __future__ import annotations

import numpy as np

from mpifc.comm import balanced_counts, trace, world
from mpifc.comm.collect import sync_clock, write_trace
from mpifc.comm.halo import halo_exchange


def run(outdir: str = "runs/demo", n: int = 1000) -> dict | None:
    comm = world()
    sync_clock(comm)
    r, P = comm.rank, comm.size
    counts, displs = balanced_counts(n, P)
    full = np.arange(n * 4, dtype=np.float32).reshape(n, 4) if r == 0 else None
    with trace.phase("init.scatter_weight"):
        shard = comm.scatter(full, np.empty((counts[r], 4), np.float32), counts)
    with trace.phase("forward"):
        whole = comm.allgather(shard, counts)
        halo = halo_exchange(comm, shard, 1, 1)
    with trace.phase("backward"):
        g = comm.allreduce(shard.sum(0))
        part = comm.reduce_scatter(whole, counts)
        req = comm.iallreduce(np.ones(1 << 16, np.float32))
        req.wait()
    comm.barrier()
    ok = np.isclose(whole.sum(), n * 4 * (n * 4 - 1) / 2) and part.shape == shard.shape
    ok = comm.allreduce(np.array([int(bool(ok))]), op="min")[0] == 1
    paths = write_trace(comm, outdir, prefix="demo")
    if r == 0:
        print(f"mpifc demo on {P} rank(s): collectives {'OK' if ok else 'WRONG'}; "
              f"halo rows {halo.shape[0] - shard.shape[0]}, grad sum {float(g.sum()):.0f}")
        print(paths["table"])
        print(f"trace: {paths['chrome']} (open in https://ui.perfetto.dev), per-rank {paths['jsonl']}")
    return paths
