"""NumPy's BLAS (OpenBLAS in NumPy's wheels) against oneMKL on the layers' own GEMMs.

    OMP_NUM_THREADS=1 python bench/gemm_backends.py [--threads N] [--repeat R]

The products the bench/ models run, as mpifc.nn.functional hands them over
(transposed views included): the MLP's linear layers at batch 256 (forward, dW,
dx) and the classifier's convolutions, one image per product, batched over a block.
Both libraries are timed in this process, alternating, best of --repeat; oneMKL
through mpifc.nn.hostblas with its size threshold off. Needs the mkl extra.
"""
import argparse
import time

import mpifc  # noqa: F401 - before NumPy: sets OPENBLAS_THREAD_TIMEOUT (mpifc.threads)
import numpy as np
from threadpoolctl import threadpool_limits

from mpifc.nn import hostblas

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--repeat", type=int, default=20)
args = ap.parse_args()
if hostblas._find_mkl_rt() is None:
    raise SystemExit('bench/gemm_backends.py: oneMKL is not installed (pip install "mpifc[mkl]")')
hostblas.set_mode("mkl")
hostblas.MKL_MIN_MACS = 0
hostblas.lib()
threadpool_limits(limits=args.threads)
rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape, dtype=np.float32)


def cases():
    for D, F in ((784, 1024), (1024, 1024), (1024, 10)):
        x, W, dy = r(256, D), r(F, D), r(256, F)
        yield f"linear {D}->{F} fwd  x @ W.T", x, W.T, None
        yield f"linear {D}->{F} dW   dy.T @ x", dy.T, x, None
        yield f"linear {D}->{F} dx   dy @ W", dy, W, None
    for C, K, L, m in ((3, 32, 1024, 9), (32, 64, 256, 3)):
        D = C * 9
        W, col, dy = r(1, K, D), r(m, 1, D, L), r(m, 1, K, L)
        yield f"conv {C}->{K} fwd  W @ col[i], {m} img", W, col, np.empty((m, 1, K, L), np.float32)
        yield f"conv {C}->{K} dW   col[i] @ dy[i].T", col, dy.transpose(0, 1, 3, 2), np.empty((m, 1, D, K), np.float32)
        yield f"conv {C}->{K} dcol W.T @ dy[i]", W.transpose(0, 2, 1), dy, np.empty((m, 1, D, L), np.float32)


def best(fn):
    fn()
    t = np.inf
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


print(f"bench/gemm_backends.py   threads={args.threads}   float32   best of {args.repeat}")
print(f"{'product':44s} {'MFLOP':>7s} {'OpenBLAS':>9s} {'oneMKL':>8s} {'ratio':>6s}  (GFLOP/s; ratio = oneMKL/OpenBLAS)")
for name, a, b, out in cases():
    flop = 2.0 * np.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), dtype=float) \
        * a.shape[-2] * a.shape[-1] * b.shape[-1]
    ts = {"numpy": np.inf, "mkl": np.inf}
    for _ in range(2):                       # alternate the two, twice
        for m in ts:
            with hostblas.using(m):
                ts[m] = min(ts[m], best(lambda: hostblas.matmul(a, b, out=out)))
    g = {m: flop / t / 1e9 for m, t in ts.items()}
    print(f"{name:44s} {flop / 1e6:7.1f} {g['numpy']:9.1f} {g['mkl']:8.1f} {g['mkl'] / g['numpy']:6.2f}")
