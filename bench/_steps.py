"""One training-step measurement in a fresh process: bench/layers.py's tables 2 and 3.

    python bench/_steps.py SIDE MODEL --threads N --steps S [--dtype float32]

SIDE is mpifc or torch; MODEL is mlp (784-1024-1024-10, batch 256), cnn (the
articles' classifier on 3x32x32, batch 64) or cnn224 (the same on 224x224x3,
batch 8). Prints one JSON line: the fastest step in ms after two warm-up steps,
and the peak resident memory above the process's size before the model was built.

Each side runs in its own process so neither sees the other's heap, caches or
idle threads (in one process torch's step ran next to the arrays and thread pools
mpifc left behind, and the reverse); bench/layers.py alternates the children.
"""
import argparse
import json
import os
import resource
import time

import mpifc  # noqa: F401 - before NumPy: sets OPENBLAS_THREAD_TIMEOUT (mpifc.threads)
import numpy as np
from threadpoolctl import threadpool_limits

import mpifc.nn as nn
from mpifc.optim import SGD

SHAPES = {"mlp": ((256, 784), None), "cnn": ((64, 3, 32, 32), 8), "cnn224": ((8, 3, 224, 224), 56)}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mpifc_net(model, dt=np.float32, rng=None):
    """The mpifc side's ``model`` (see SHAPES), input gradient off (the input is data)."""
    rng = np.random.default_rng(1) if rng is None else rng
    if model == "mlp":
        return nn.Sequential(nn.Linear(784, 1024, rng=rng, dtype=dt), nn.ReLU(),
                             nn.Linear(1024, 1024, rng=rng, dtype=dt), nn.ReLU(),
                             nn.Linear(1024, 10, rng=rng, dtype=dt), input_grad=False)
    side = SHAPES[model][1]
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, rng=rng, dtype=dt), nn.BatchNorm2d(32, dtype=dt), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, rng=rng, dtype=dt), nn.BatchNorm2d(64, dtype=dt), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * side * side, 64, rng=rng, dtype=dt), nn.ReLU(),
        nn.Linear(64, 10, rng=rng, dtype=dt), input_grad=False)


def torch_net(model):
    """The same ``model`` in torch.nn (torch's own initialisation, float32)."""
    import torch

    tnn = torch.nn
    if model == "mlp":
        return tnn.Sequential(tnn.Linear(784, 1024), tnn.ReLU(), tnn.Linear(1024, 1024), tnn.ReLU(),
                              tnn.Linear(1024, 10))
    side = SHAPES[model][1]
    return tnn.Sequential(
        tnn.Conv2d(3, 32, 3, padding=1), tnn.BatchNorm2d(32), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(32, 64, 3, padding=1), tnn.BatchNorm2d(64), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Flatten(), tnn.Linear(64 * side * side, 64), tnn.ReLU(), tnn.Linear(64, 10))


def mpifc_step(model, x, t, dt):
    net = mpifc_net(model, dt)
    opt, loss = SGD(net.parameters(), lr=0.01, momentum=0.9), nn.SoftmaxCrossEntropy()

    def step():
        opt.zero_grad()
        loss.forward(net.forward(x), t)
        net.backward(loss.backward())
        opt.step()
    return step


def torch_step(model, x, t, dt, threads):
    import torch

    torch.set_num_threads(threads)
    net = torch_net(model).to(torch.float32 if dt == np.float32 else torch.float64)
    return torch_sgd_step(net, x, t)


def torch_sgd_step(net, x, t):
    """The torch side's step on ``net`` (a model, or one wrapped in DDP): zero_grad,
    cross-entropy forward and backward, SGD-momentum update -- as mpifc_step's."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss = torch.nn.CrossEntropyLoss()
    tx, tt = torch.from_numpy(x), torch.from_numpy(t)

    def step():
        opt.zero_grad()
        loss(net(tx), tt).backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=["mpifc", "torch"])
    ap.add_argument("model", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    threadpool_limits(limits=args.threads)
    dt = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPES[args.model][0]).astype(dt)
    t = rng.integers(0, 10, size=x.shape[0])
    if args.side == "torch":
        import torch  # noqa: F401 - loaded before the baseline, as mpifc's modules are
    base = rss_bytes()
    step = (mpifc_step(args.model, x, t, dt) if args.side == "mpifc"
            else torch_step(args.model, x, t, dt, args.threads))
    times = []
    for _ in range(args.steps + 2):       # two warm-up steps: optimizer state, caches
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"ms": min(times[2:]) * 1e3, "peak_mb": peak / 2**20}))


if __name__ == "__main__":
    main()
