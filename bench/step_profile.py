"""Where a training step's time goes: each layer's forward and backward, timed apart.

    OMP_NUM_THREADS=1 python bench/step_profile.py [--threads N] [--repeat R] [--batch B]

The source articles' classifier on 3x32x32 (conv32-BN-ReLU-pool, conv64-BN-ReLU-pool,
dense64, dense10), float32, SGD momentum. Per layer: the minimum over --repeat steps
of its forward and of its backward (wall clock). The step against torch is in
bench/layers.py; this table shows which layer to work on next.
"""
import argparse
import time

import mpifc  # noqa: F401 - before NumPy: sets OPENBLAS_THREAD_TIMEOUT (mpifc.threads)
import numpy as np
from threadpoolctl import threadpool_limits

import mpifc.nn as nn
from mpifc.nn import hostjit
from _steps import mpifc_net  # bench/: the classifier bench/layers.py times
from mpifc.optim import SGD

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--repeat", type=int, default=15)
ap.add_argument("--batch", type=int, default=64)
args = ap.parse_args()
threadpool_limits(limits=args.threads)
rng = np.random.default_rng(0)
net = mpifc_net("cnn", rng=rng)
x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
t = rng.integers(0, 10, args.batch)
opt, loss = SGD(net.parameters(), lr=0.01, momentum=0.9), nn.SoftmaxCrossEntropy()
L = net.layers
best = {}


def note(key, dt):
    best[key] = min(best.get(key, np.inf), dt)


for it in range(args.repeat + 2):
    t0 = time.perf_counter()
    opt.zero_grad()
    if it >= 2:
        note(("step", "zero_grad"), time.perf_counter() - t0)
    h = x
    for i, layer in enumerate(L):
        t0 = time.perf_counter()
        h = layer.forward(h)
        if it >= 2:
            note((i, "forward"), time.perf_counter() - t0)
    t0 = time.perf_counter()
    loss.forward(h, t)
    dy = loss.backward()
    if it >= 2:
        note(("step", "loss"), time.perf_counter() - t0)
    for i in reversed(range(net._first_param, len(L))):
        t0 = time.perf_counter()
        dy = L[i].backward(dy)
        if it >= 2:
            note((i, "backward"), time.perf_counter() - t0)
    t0 = time.perf_counter()
    opt.step()
    if it >= 2:
        note(("step", "sgd"), time.perf_counter() - t0)

print(f"bench/step_profile.py: classifier 3x32x32, batch {args.batch}, {args.threads} thread(s), "
      f"{hostjit.active()} kernels, min of {args.repeat} steps per entry")
print(f"{'layer':<28s} {'forward ms':>10s} {'backward ms':>11s}")
for i, layer in enumerate(L):
    f, b = best.get((i, "forward"), 0.0), best.get((i, "backward"), 0.0)
    print(f"{i:>2d} {type(layer).__name__:<25s} {f * 1e3:10.2f} {b * 1e3:11.2f}")
for k in ("zero_grad", "loss", "sgd"):
    print(f"   {k:<25s} {best[('step', k)] * 1e3:10.2f}")
print(f"sum of minima: {sum(best.values()) * 1e3:.1f} ms")
