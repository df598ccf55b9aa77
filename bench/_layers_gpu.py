"""bench/layers.py --device cuda: mpifc.nn on CuPy beside cuBLAS GEMM and PyTorch on the GPU.

    python bench/layers.py --device cuda [--repeat R] [--dtype float32]

Table 1: Linear and Conv2d forward+backward on the GPU as GFLOP/s, beside the
GFLOP/s of the three equivalent matrix products as plain CuPy GEMMs (cuBLAS) on
ready-made operands; ratio = layer / GEMM.
Table 2: one training step (zero_grad, forward, softmax cross-entropy, backward,
SGD-momentum update) of the MLP and of the classifier CNN: mpifc on the GPU, mpifc
on one CPU core (NumPy, 1 BLAS thread), torch on the GPU when importable; ratios
CPU / GPU (issue 15's target: >= 10 for the CNN) and mpifc GPU / torch GPU.
Every timed run ends with a device synchronise; the runs of a row are interleaved.
Without a usable GPU: one line, exit status 1.
"""
import sys
import time

import numpy as np


def main(args) -> int:
    from mpifc import backend

    if backend.device_count() == 0:
        why = "cupy sees no CUDA device" if backend.cupy_importable() else "cupy is not installed"
        print(f"bench/layers.py --device cuda: {why}; pip install mpifc[gpu] on a GPU machine",
              file=sys.stderr)
        return 1
    import mpifc.nn as nn
    from mpifc.optim import SGD
    from threadpoolctl import threadpool_limits

    cp = backend.backend_module("cupy")
    backend.use_device(0)
    dt = np.dtype(args.dtype)
    rng = np.random.default_rng(0)

    def randn(xp, *shape):
        return xp.asarray(rng.standard_normal(shape).astype(dt))

    def sync():
        backend.synchronize()

    def best_times(fns, repeat=args.repeat, warmup=3):
        for _ in range(warmup):
            for fn in fns:
                fn()
        sync()
        ts = [[] for _ in fns]
        for _ in range(repeat):
            for fn, t in zip(fns, ts):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                t.append(time.perf_counter() - t0)
        return [float(np.min(t)) for t in ts]

    def gemm3_run(M, Kd, F, G=1):
        W, col, dy = randn(cp, F, Kd), randn(cp, Kd, M), randn(cp, F, M)
        y, dW, dcol = cp.empty((F, M), dt), cp.empty((F, Kd), dt), cp.empty((Kd, M), dt)

        def run():
            for _ in range(G):
                cp.matmul(W, col, out=y)
                cp.matmul(dy, col.T, out=dW)
                cp.matmul(W.T, dy, out=dcol)
        return run

    def layer_run(layer, x):
        dy = cp.ones_like(layer.forward(x))

        def run():
            layer.forward(x)
            layer.backward(dy)
        return run

    print(f"mpifc bench/layers.py --device cuda   {backend.device_name(0)}   dtype={dt}   "
          f"repeat={args.repeat} (best of)")
    print()
    hdr = f"{'layer (GPU)':<44s} {'ms':>8s} {'GFLOP/s':>8s} {'GEMM GFLOP/s':>13s} {'ratio':>6s}"
    print(hdr)
    print("-" * len(hdr))
    for N, D, F in [(256, 784, 1024), (256, 1024, 1024), (1024, 4096, 4096), (1024, 512, 512)]:
        layer = nn.Linear(D, F, rng=rng, dtype=dt, xp=cp)
        t, tg = best_times([layer_run(layer, randn(cp, N, D)), gemm3_run(N, D, F)])
        flops = 3 * 2.0 * N * D * F
        print(f"{f'Linear N={N} {D}->{F}':<44s} {t * 1e3:8.2f} {flops / t / 1e9:8.1f} "
              f"{flops / tg / 1e9:13.1f} {tg / t:6.2f}")
    for N, C, K, H, k, s, p in [(64, 3, 32, 32, 3, 1, 1), (64, 32, 64, 16, 3, 1, 1),
                                (128, 64, 128, 16, 3, 1, 1), (128, 64, 64, 32, 3, 2, 1)]:
        layer = nn.Conv2d(C, K, k, stride=s, padding=p, rng=rng, dtype=dt, xp=cp)
        Ho = (H + 2 * p - k) // s + 1
        M, Kd = N * Ho * Ho, C * k * k
        flops = 3 * 2.0 * M * Kd * K
        t, tg = best_times([layer_run(layer, randn(cp, N, C, H, H)), gemm3_run(M, Kd, K)])
        print(f"{f'Conv2d N={N} {C}->{K} {H}x{H} k{k} s{s} p{p}':<44s} {t * 1e3:8.2f} "
              f"{flops / t / 1e9:8.1f} {flops / tg / 1e9:13.1f} {tg / t:6.2f}")

    def mlp(xp):
        return nn.Sequential(nn.Linear(784, 1024, rng=rng, dtype=dt, xp=xp), nn.ReLU(),
                             nn.Linear(1024, 1024, rng=rng, dtype=dt, xp=xp), nn.ReLU(),
                             nn.Linear(1024, 10, rng=rng, dtype=dt, xp=xp), input_grad=False)

    def cnn(xp):
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, rng=rng, dtype=dt, xp=xp), nn.BatchNorm2d(32, dtype=dt, xp=xp),
            nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, rng=rng, dtype=dt, xp=xp), nn.BatchNorm2d(64, dtype=dt, xp=xp),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 8 * 8, 64, rng=rng, dtype=dt, xp=xp), nn.ReLU(),
            nn.Linear(64, 10, rng=rng, dtype=dt, xp=xp), input_grad=False)

    def step(model, x, t, cpu=False):
        opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.SoftmaxCrossEntropy()

        def run():
            with threadpool_limits(limits=1) if cpu else _nothing():
                opt.zero_grad()
                loss_fn.forward(model.forward(x), t)
                model.backward(loss_fn.backward())
                opt.step()
        return run

    try:
        import torch
        torch_gpu = torch.cuda.is_available()
    except ImportError:
        torch, torch_gpu = None, False

    def step_torch(kind, x, t):
        tnn = torch.nn
        if kind == "mlp":
            model = tnn.Sequential(tnn.Linear(784, 1024), tnn.ReLU(), tnn.Linear(1024, 1024),
                                   tnn.ReLU(), tnn.Linear(1024, 10))
        else:
            model = tnn.Sequential(
                tnn.Conv2d(3, 32, 3, padding=1), tnn.BatchNorm2d(32), tnn.ReLU(), tnn.MaxPool2d(2),
                tnn.Conv2d(32, 64, 3, padding=1), tnn.BatchNorm2d(64), tnn.ReLU(), tnn.MaxPool2d(2),
                tnn.Flatten(), tnn.Linear(64 * 8 * 8, 64), tnn.ReLU(), tnn.Linear(64, 10))
        tdt = torch.float32 if dt == np.float32 else torch.float64
        model = model.to("cuda", tdt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = tnn.CrossEntropyLoss()
        tx, tt = torch.from_numpy(x).cuda(), torch.from_numpy(t).cuda()

        def run():
            opt.zero_grad()
            loss_fn(model(tx), tt).backward()
            opt.step()
            torch.cuda.synchronize()
        return run

    print()
    hdr = (f"{'training step':<40s} {'GPU ms':>8s} {'1 CPU ms':>9s} {'CPU/GPU':>8s} "
           f"{'torch GPU ms':>12s} {'GPU/torch':>9s}")
    print(hdr)
    print("-" * len(hdr))
    for kind, make, xshape, B in [("mlp", mlp, (784,), 256), ("cnn", cnn, (3, 32, 32), 64),
                                  ("cnn", cnn, (3, 32, 32), 256)]:
        xh = rng.standard_normal((B, *xshape)).astype(dt)
        th = rng.integers(0, 10, size=B)
        fns = [step(make(cp), cp.asarray(xh), cp.asarray(th)),
               step(make(np), xh, th, cpu=True)]
        if torch_gpu:
            fns.append(step_torch(kind, xh, th))
        times = best_times(fns, repeat=max(3, args.repeat // 4) if kind == "cnn" else args.repeat)
        tg, tc = times[0], times[1]
        name = (f"MLP 784-1024-1024-10, batch {B}" if kind == "mlp"
                else f"CNN conv32-conv64-d64-d10 3x32x32, b{B}")
        tt = f"{times[2] * 1e3:12.2f} {tg / times[2]:9.2f}" if torch_gpu else f"{'n/a':>12s} {'n/a':>9s}"
        print(f"{name:<40s} {tg * 1e3:8.2f} {tc * 1e3:9.2f} {tc / tg:8.1f} {tt}")
    print("(target: CPU/GPU >= 10 for the CNN; "
          + (f"torch {torch.__version__} on the GPU)" if torch_gpu
             else "torch on the GPU not importable: pip install 'mpifc[compare]' with a CUDA torch)"))
    return 0


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
