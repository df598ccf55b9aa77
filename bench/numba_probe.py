"""How much would a compiled element-wise kernel buy? BatchNorm + ReLU forward, NumPy vs Numba.

    OMP_NUM_THREADS=1 python bench/numba_probe.py      # needs: pip install numba (not a dependency)

Issue 14's step targets are out of reach for kernels that make one NumPy pass per
operation (see the closing notes): the classifier's BatchNorm, ReLU and max-pool
passes are about half of its step. This probe measures the size of the prize before
anyone adds a dependency: the training-mode BatchNorm forward (shifted float64 sums
per channel, then normalise) fused with the ReLU that follows it, one pass over the
statistics and one over the output, as one Numba kernel parallel over channels,
against mpifc's NumPy kernels (``batchnorm_forward`` then ``relu_forward``) on the
classifier's first activation (64, 32, 32, 32), float32, inputs ~ 1e3 + N(0, 1), at
1 and 2 threads. The first call (compilation) is not timed. Nothing in mpifc uses
Numba.
"""
import sys
import time

import mpifc  # noqa: F401 - before NumPy: sets OPENBLAS_THREAD_TIMEOUT (mpifc.threads)
import numpy as np
from threadpoolctl import threadpool_limits

import mpifc.nn.functional as F

try:
    import numba
    from numba import njit, prange
except ImportError:
    sys.exit("bench/numba_probe.py needs numba: pip install numba (it is not an mpifc dependency)")


@njit(parallel=True)
def bn_relu_forward(x, gamma, beta, eps, y, mask):
    """x, y : (N, C, L); per channel: shift k (first sample's mean), float64 sums of
    d = x - k, then y = max((x - k) * a + c, 0) and mask = y > 0."""
    N, C, L = x.shape
    mean, var = np.empty(C), np.empty(C)
    for c in prange(C):
        k = 0.0
        for j in range(L):
            k += x[0, c, j]
        k = np.float32(k / L)
        s = 0.0
        ss = 0.0
        for n in range(N):
            for j in range(L):
                d = np.float64(x[n, c, j] - k)
                s += d
                ss += d * d
        m = s / (N * L)
        v = max(ss / (N * L) - m * m, 0.0)
        inv = 1.0 / np.sqrt(v + eps)
        a = np.float32(gamma[c] * inv)
        b = np.float32(beta[c] - m * gamma[c] * inv)
        for n in range(N):
            for j in range(L):
                t = (x[n, c, j] - k) * a + b
                mask[n, c, j] = t > 0
                y[n, c, j] = t if t > 0 else np.float32(0)
        mean[c], var[c] = k + m, v
    return mean, var


def best_ms(fn, repeat=20):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    rng = np.random.default_rng(0)
    N, C, H = 64, 32, 32
    x = (rng.standard_normal((N, C, H, H)) + 1e3).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    x3 = x.reshape(N, C, H * H)
    y, mask = np.empty_like(x3), np.empty(x3.shape, dtype=bool)
    bn_relu_forward(x3, gamma, beta, 1e-5, y, mask)          # compile

    def numpy_side():
        z, _, _, _ = F.batchnorm_forward(x, gamma, beta)
        return F.relu_forward(z)[0]
    ref = numpy_side().reshape(N, C, H * H)
    err = float(np.abs(y - ref).max())
    print(f"bench/numba_probe.py: BatchNorm2d + ReLU forward on {x.shape} float32 "
          f"(numba {numba.__version__}); max |numba - numpy| = {err:.1e}")
    print(f"{'threads':>7s} {'numpy ms':>9s} {'numba ms':>9s} {'ratio':>6s}")
    for threads in (1, 2):
        threadpool_limits(limits=threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        tn = best_ms(lambda: bn_relu_forward(x3, gamma, beta, 1e-5, y, mask))
        tp = best_ms(numpy_side)
        print(f"{threads:>7d} {tp:9.2f} {tn:9.2f} {tn / tp:6.2f}")


if __name__ == "__main__":
    main()
