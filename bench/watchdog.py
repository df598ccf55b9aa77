"""What train.watchdog_s costs a training step: digits-mlp steps with the watchdog on and off.

    mpiexec -n 2 python bench/watchdog.py [--steps 40] [--repeats 7]

The trainer's step loop (train_step, then watchdog.beat) on the digits-mlp preset,
blocks of --steps steps with the watchdog off and on (timeout 30 s: it never fires),
interleaved so that both modes see the same load. Prints the median step time of each
mode (the slower rank's), their ratio, and what one beat() costs in the main thread.
Target (issue 16): on / off <= 1.01 -- nothing measurable per step.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

from mpifc.comm import watchdog, world
from mpifc.config import load_config
from mpifc.train import Trainer

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=40)
p.add_argument("--repeats", type=int, default=7)
args = p.parse_args()

comm = world()
tmp = comm.bcast_obj(tempfile.mkdtemp() if comm.rank == 0 else None)
cfg = load_config("digits-mlp", [f"data.dir={tmp}/data", "train.trace=false"])
tr = Trainer(cfg, quiet=True, comm=comm, out=f"{tmp}/run")


def block(on: bool) -> float:
    """Seconds per step over one block (the slower rank's)."""
    batches = iter(tr.loader)
    with watchdog.running(30 if on else 0, comm):
        comm.barrier()
        t0 = time.perf_counter()
        for i in range(args.steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(tr.loader)
                batch = next(batches)
            tr.train_step(batch)
            tr.step += 1
            watchdog.beat(tr.step)
        dt = (time.perf_counter() - t0) / args.steps
    return comm.allreduce(np.array([dt]), op="max")[0]


block(False)                                     # warm-up
times = {False: [], True: []}
for r in range(args.repeats):
    for on in ((False, True) if r % 2 == 0 else (True, False)):
        times[on].append(block(on))

with watchdog.running(30, comm):                 # the main thread's cost of one beat
    n = 200_000
    t0 = time.perf_counter()
    for i in range(n):
        watchdog.beat(i)
    beat_ns = (time.perf_counter() - t0) / n * 1e9

if comm.rank == 0:
    off, on = np.median(times[False]), np.median(times[True])
    print(f"digits-mlp, {comm.size} rank(s), {args.repeats} x {args.steps} steps per mode")
    print(f"step off {off * 1e3:8.3f} ms   on {on * 1e3:8.3f} ms   on/off {on / off:.3f} "
          f"(target <= 1.01)   beat() {beat_ns:.0f} ns")
