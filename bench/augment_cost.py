"""What augmentation costs a training step: cifar-cnn with and without data.augment.

    mpiexec -n 2 python bench/augment_cost.py [--steps 10] [--repeats 3] [--pad 4]

Two trainers of the cifar-cnn preset (synthetic 3x32x32 images, batch 64, dp = job
size) on the same ranks, one with ``data.augment = ["crop", "flip"]``. Blocks of
``--steps`` training steps (loader batch + forward, backward, allreduce, update) run
interleaved, augment off / on, ``--repeats`` times, so both see the same background
load; a block's time is the slowest rank's, the figure is the best block. Also the
augmentation call alone on one rank's uint8 rows. Rank 0 prints.
"""
import argparse
import shutil
import tempfile
import time

import numpy as np

from mpifc.comm import world
from mpifc.config import load_config
from mpifc.data.augment import Augment
from mpifc.train import Trainer

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=10)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--pad", type=int, default=4)
a = p.parse_args()
comm = world()
tmp = comm.bcast_obj(tempfile.mkdtemp(prefix="augbench-") if comm.rank == 0 else None)
sets = [f"data.dir={tmp}/data", "train.trace=false", "train.checkpoint_every=0"]
runs = {}
for name, extra in (("off", []), ("crop+flip", ["data.augment=crop,flip",
                                                 f"data.crop_pad={a.pad}"])):
    runs[name] = Trainer(load_config("cifar-cnn", sets + extra), quiet=True, comm=comm,
                         out=f"{tmp}/{name}")
best = {k: np.inf for k in runs}
B = runs["off"].cfg["train"]["batch_size"]
steps = runs["off"].loader.steps_per_epoch
pos = 0
for r in range(a.repeats):
    for name, tr in runs.items():
        comm.barrier()
        t0 = time.perf_counter()
        for s in range(pos, pos + a.steps):
            tr.train_step(tr.loader.get_batch(s // steps, s % steps))
        dt = comm.allreduce(np.array([time.perf_counter() - t0]), op="max")[0]
        best[name] = min(best[name], dt)
    pos += a.steps
aug = Augment(("crop", "flip"), pad=a.pad, seed=0)
x = np.random.default_rng(0).integers(0, 256, (B // comm.size, 3, 32, 32), dtype=np.uint8)
t0, n = time.perf_counter(), 50
for i in range(n):
    aug(x, i, np.arange(x.shape[0]))
one = (time.perf_counter() - t0) / n
if comm.rank == 0:
    print(f"cifar-cnn, {comm.size} rank(s), batch {B}, {a.steps} steps x best of {a.repeats} "
          "interleaved blocks (machine shared with other jobs)")
    print(f"{'augment':<10} {'step ms':>8} {'samples/s':>10}")
    for name in runs:
        ms = best[name] / a.steps * 1e3
        print(f"{name:<10} {ms:8.1f} {B / ms * 1e3:10.0f}")
    print(f"ratio samples/s crop+flip / off: {best['off'] / best['crop+flip']:.3f}")
    print(f"augment call alone: {one * 1e3:.2f} ms for {x.shape[0]} uint8 images 3x32x32 "
          f"(pad {a.pad}), one rank")
comm.barrier()
if comm.rank == 0:
    shutil.rmtree(tmp, ignore_errors=True)
