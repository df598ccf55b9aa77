"""Harness of bench/fc_scaling.py and bench/conv_scaling.py: P = 1..N side by side in one job.

Launch with N ranks; each case runs a model on the first P = dp * tp ranks while
the others wait in a barrier that sleeps (MPICH's blocking barrier spins and would
steal the working ranks' cores). Cases are interleaved repeat by repeat, so all of
them see the same background load; the figure of a case is its best repeat (step
time = the slowest rank's). BLAS threads per rank: mpifc.threads rule for P ranks
on this node (cores // P, at least 1; OMP_NUM_THREADS wins). A point with more
ranks than cores is marked oversubscribed (*).

Columns
-------
step ms     one training step (zero_grad, forward, loss, backward with the
            data-parallel buckets, synchronize, Adam), best repeat, slowest rank
speedup     step time of P = 1 (same model and batch, listed first) / this step time
samples/s   global batch / step time
comm %      exposed communication / step time, mean over ranks: blocking calls
            (tensor-parallel layers, loss, SyncBatchNorm) + starting and waiting
            for the data-parallel iallreduces (not the part hidden behind backward)
params, grads, optim  MiB of arrays this rank holds (largest rank): Parameter.data,
            the gradient buckets, the optimizer's slots after a step
p+o / (1/P) (params + optim) of the largest rank over (params + optim of P = 1) / P:
            1.00 is a perfect split; data-parallel replicas show P
"""
from __future__ import annotations

import argparse
import time

import mpifc  # noqa: F401 - before NumPy: sets OPENBLAS_THREAD_TIMEOUT (mpifc.threads)
import numpy as np
from threadpoolctl import threadpool_limits

from mpifc.comm import Grid, balanced_counts, trace, world
from mpifc.models import build_model
from mpifc.optim import Adam
from mpifc.parallel import DataParallel
from mpifc.threads import blas_threads, cores_available

MiB = 2.0**20


def parse_args(doc: str, steps=5, repeats=5) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller batches, fewer steps and repeats")
    p.add_argument("--steps", type=int, default=steps, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=repeats, help="interleaved repeats (best is kept)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--bucket-mb", type=float, default=25.0)
    a = p.parse_args()
    if a.quick:
        a.steps, a.repeats = 2, 2
    return a


def soft_barrier(comm) -> None:
    """All ranks meet; a waiting rank sleeps between tests instead of spinning."""
    with trace.disabled():
        req = comm.iallreduce(np.zeros(1))
        while not req.test():
            time.sleep(5e-4)
        req.wait()


class Case:
    """One model on one dp x tp layout of the first P ranks (built collectively over the world)."""

    def __init__(self, comm, family, model_cfg, dp, tp, global_batch, args):
        self.family, self.dp, self.tp, self.P = family, dp, tp, dp * tp
        self.base_key = (id(model_cfg), global_batch)     # P = 1 of the same model and batch
        self.global_batch = global_batch
        self.active = comm.rank < self.P
        sub = comm.split(0 if self.active else 1, name=f"P{self.P}")   # collective over the world
        self.threads = blas_threads(self.P)
        self.samples, self.comm_s = [], []
        if not self.active:
            return
        dtype = np.dtype(args.dtype)
        self.grid = Grid(sub, dp, tp)
        with trace.disabled():
            self.net = build_model(model_cfg, self.grid, seed=0, dtype=dtype)
            self.dpar = DataParallel(self.net, self.grid.dp_comm, bucket_mb=args.bucket_mb)
        self.opt = Adam(self.net.named_parameters(), lr=1e-4)
        counts, _ = balanced_counts(global_batch, dp)
        b = counts[self.grid.dp_rank]
        rng = np.random.default_rng(self.grid.dp_rank)
        self.x = rng.standard_normal((b, *self.net.input_shape)).astype(dtype)
        self.y = rng.integers(0, self.net.num_classes, b)
        self.scale = dp * b / global_batch
        with threadpool_limits(limits=self.threads), trace.disabled():
            self.step()                     # warm-up; creates the optimizer's slots

    @property
    def layout(self) -> str:
        return f"dp{self.dp}xtp{self.tp}"

    def step(self) -> float:
        """One training step; returns its exposed data-parallel seconds (post + wait)."""
        d = self.dpar
        d.zero_grad()
        logits = self.net.forward(self.x)
        self.net.loss.forward(logits, self.y)
        d.backward(self.net.loss.backward(self.scale))
        d.synchronize()
        self.opt.step()
        return d.timings["post"] + d.timings["wait"]

    def timed_block(self, steps: int) -> None:
        with threadpool_limits(limits=self.threads):
            trace.reset()
            dp_exposed = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                dp_exposed += self.step()
            dt = time.perf_counter() - t0
        blocking = sum(e["t1"] - e["t0"] for e in trace.events() if e["op"] != "iallreduce")
        trace.reset()
        self.samples.append(dt / steps)
        self.comm_s.append((blocking + dp_exposed) / steps)

    def memory(self) -> dict:
        params = sum(p.data.nbytes for p in self.net.parameters())
        grads = sum(b.buffer.nbytes for b in self.dpar.buckets)
        optim = sum(a.nbytes for slot in self.opt.state.values() for a in slot if a is not None)
        return {"params": params, "grads": grads, "optim": optim}


def run(title: str, specs, args) -> None:
    """specs: (family, model_cfg, dp, tp, global_batch); cases larger than the job are skipped."""
    comm = world()
    N, rank = comm.size, comm.rank
    cases = [Case(comm, *s, args) for s in specs if s[2] * s[3] <= N]
    for _ in range(args.repeats):
        for c in cases:
            soft_barrier(comm)
            if c.active:
                c.timed_block(args.steps)
        soft_barrier(comm)
    mine = [(c.samples, c.comm_s, c.memory()) if c.active else None for c in cases]
    every = comm.gather_obj(mine, root=0)
    if rank != 0:
        return
    cores = cores_available()
    print(f"{title}: {N} ranks launched, {cores} cores, {args.dtype}, best of {args.repeats} x "
          f"{args.steps} steps, bucket {args.bucket_mb} MiB{' (--quick)' if args.quick else ''}")
    print(f"{'model':<14}{'layout':<11}{'P':>2}{'thr':>4}{'batch':>6}{'step ms':>10}{'speedup':>8}"
          f"{'samples/s':>10}{'comm %':>7}{'params':>9}{'grads':>8}{'optim':>8}{'p+o/(1/P)':>10}")
    base_t, base_po = {}, {}
    for i, c in enumerate(cases):
        per_rank = [e[i] for e in every if e[i] is not None]
        # the repeat whose slowest rank was fastest
        t_rep = np.max([r[0] for r in per_rank], axis=0)
        best = int(np.argmin(t_rep))
        t = float(t_rep[best])
        frac = float(np.mean([r[1][best] for r in per_rank])) / t
        mem = {k: max(r[2][k] for r in per_rank) for k in ("params", "grads", "optim")}
        po = mem["params"] + mem["optim"]
        if c.P == 1:
            base_t[c.base_key], base_po[c.base_key] = t, po
        ratio = po / (base_po[c.base_key] / c.P) if c.base_key in base_po else float("nan")
        speed = base_t[c.base_key] / t if c.base_key in base_t else float("nan")
        over = "*" if c.P > cores else " "
        print(f"{c.family:<14}{c.layout:<11}{c.P:>2}{c.threads:>4}{c.global_batch:>6}"
              f"{t * 1e3:>9.1f}{over}{speed:>8.2f}{c.global_batch / t:>10.0f}{100 * frac:>7.1f}"
              f"{mem['params'] / MiB:>9.2f}{mem['grads'] / MiB:>8.2f}{mem['optim'] / MiB:>8.2f}"
              f"{ratio:>10.3f}")
    if any(c.P > cores for c in cases):
        print(f"* oversubscribed: more ranks than the {cores} cores (ranks time-share them)")
