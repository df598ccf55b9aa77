"""How close does a replay of a recorded run come to the run's own times?

    mpiexec -n 4 python bench/replay_accuracy.py [--steps 8] [--sleep 0.03] [--runs 3]

Each run trains STEPS steps of the digits-mlp preset (build_model + DataParallel, a
global batch of 64, marked with trace.step as the trainer marks them) at dp x tp =
N x 1 and 1 x N, the last rank sleeping SLEEP seconds inside every step so that the
others wait for it in their collectives: the run's communication time is then mostly
skew, which the replay must rebuild from the recorded compute gaps, plus the
collectives themselves, costed from a quick calibration taken in the same job. It
prints per layout and run the measured and replayed communication time per rank and
step time (medians over steps; mean over ranks / slowest rank) with their errors.

Target (issue 6): |error| <= 25 % for both, per run. On a 2-core machine shared with
other jobs a rank that wakes from sleep or waits in MPI can lose a scheduler time
slice (milliseconds) that the calibration's medians do not contain: runs with more
ranks than cores miss it now and then (tp = 4 at 4 ranks: replay 35.5 ms against
24.8 ms measured in one run), which is why this is a bench line and not a test.
Prints from rank 0 only.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from mpifc.comm import Grid, balanced_counts, trace, world
from mpifc.comm.collect import sync_clock, write_trace
from mpifc.config import load_config
from mpifc.models import build_model
from mpifc.optim import Adam
from mpifc.parallel import DataParallel
from mpifc.sim.calibrate import calibrate
from mpifc.sim.replay import replay

TARGET = 0.25


def record(comm, cfg, out, dp, tp, steps, sleep):
    grid = Grid(comm, dp, tp)
    net = build_model(cfg["model"], grid, seed=0)
    ddp = DataParallel(net, grid.dp_comm, bucket_mb=0.05)
    opt = Adam(net.parameters(), lr=1e-3)
    B = 64
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, B)
    counts, displs = balanced_counts(B, dp)
    sl = slice(displs[grid.dp_rank], displs[grid.dp_rank] + counts[grid.dp_rank])
    x, y = np.ascontiguousarray(x[sl]), y[sl]
    trace.reset()
    sync_clock(comm)
    for k in range(steps):
        with trace.step(k + 1, B):
            ddp.zero_grad()
            net.loss.forward(net.forward(x), y)
            net.loss.correct()
            if comm.rank == comm.size - 1:
                time.sleep(sleep)
            ddp.backward(net.loss.backward(dp * len(y) / B))
            ddp.synchronize()
            opt.step()
    write_trace(comm, out)
    comm.barrier()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=0.03)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    comm = world()
    cluster = calibrate(None, quick=True, ops=("allreduce", "allgather"))
    cfg = load_config("digits-mlp")
    base = comm.bcast_obj(tempfile.mkdtemp(prefix="replay-acc-") if comm.rank == 0 else None)
    if comm.rank == 0:
        print(f"replay accuracy, {comm.size} ranks, {args.steps} steps, last rank sleeps "
              f"{args.sleep * 1e3:.0f} ms per step (target |error| <= {TARGET:.0%})")
        print(f"{'layout':<8}{'run':>4}{'comm meas':>11}{'comm pred':>11}{'err':>8}"
              f"{'step meas':>11}{'step pred':>11}{'err':>8}  target")
    misses = 0
    for tp in sorted({1, comm.size}):
        dp = comm.size // tp
        for run in range(args.runs):
            out = os.path.join(base, f"dp{dp}tp{tp}-{run}")
            record(comm, cfg, out, dp, tp, args.steps, args.sleep)
            if comm.rank != 0:
                continue
            rep = replay(out, cluster)
            mc, pc = rep.measured_comm_s, rep.predicted_comm_s
            ms, ps = rep.measured_step_s, rep.predicted_step_s
            ec, es = (pc - mc) / mc, (ps - ms) / ms
            ok = abs(ec) <= TARGET and abs(es) <= TARGET
            misses += not ok
            print(f"{dp}x{tp:<6}{run:>4}{mc * 1e3:>9.2f}ms{pc * 1e3:>9.2f}ms{ec:>+8.1%}"
                  f"{ms * 1e3:>9.2f}ms{ps * 1e3:>9.2f}ms{es:>+8.1%}  {'met' if ok else 'MISSED'}")
    if comm.rank == 0:
        print(f"{misses} run(s) missed the target")


if __name__ == "__main__":
    main()
