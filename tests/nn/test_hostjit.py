"""The compiled host kernels (mpifc.nn.hostjit, Numba) give what the NumPy kernels give.

The NumPy code in mpifc.nn.functional is the reference: every function that has a
compiled path is run both ways on the same inputs, in float32 and float64, on
shapes that reach the edges (rows shorter than the BatchNorm threshold, windows
that leave rows and columns over, a 3x3 window, NaN and infinity).
"""
import subprocess
import sys

import numpy as np
import pytest

from mpifc.nn import blockpool, hostblas, hostjit, im2col
from mpifc.nn import functional as F

numba = pytest.importorskip("numba")


def both(fn, *args):
    """fn(*args) with the NumPy kernels, then with the compiled ones."""
    out = []
    for m in ("numpy", "numba"):
        hostjit.set_mode(m)
        try:
            out.append(fn(*args))
        finally:
            hostjit.set_mode(None)
    return out


def flat(v):
    if isinstance(v, tuple):
        return [a for x in v for a in flat(x)]
    return [v] if isinstance(v, np.ndarray) else []


def assert_same(a, b, rtol):
    for x, y in zip(flat(a), flat(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=rtol,
                                   atol=rtol, equal_nan=True)


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dt(request):
    return request.param


def tol(dt):
    return 2e-5 if dt == np.float32 else 1e-12


@pytest.mark.parametrize("shape", [(6, 5, 7, 9), (3, 4, 40), (2, 3, 4, 4)])
def test_batchnorm_training_forward_and_backward(shape, dt):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2 + 1e3).astype(dt)       # offset: the shift matters
    g, b = rng.uniform(0.5, 2, shape[1]).astype(dt), rng.standard_normal(shape[1]).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)

    def run():
        y, cache, mean, var = F.batchnorm_forward(x, g, b)
        return (y, mean, var) + F.batchnorm_backward(dy, cache)
    ref, jit = both(run)
    assert_same(ref, jit, tol(dt))


def test_batchnorm_rows_too_short_stay_numpy(monkeypatch):
    """(N, C) input (rows of 1) keeps the NumPy loops: the kernel is never called."""
    hostjit.set_mode("numba")
    try:
        mod = hostjit.kernels(np)
        monkeypatch.setattr(mod, "bn_sums", None)        # a call would raise TypeError
        x = np.random.default_rng(0).standard_normal((8, 5))
        F.batchnorm_forward(x, np.ones(5), np.zeros(5))
    finally:
        hostjit.set_mode(None)


def test_relu_forward_backward_with_nan_and_inf(dt):
    x = np.array([[-1.0, 0.0, -0.0, 2.5, np.nan, np.inf, -np.inf, 1e-30]] * 3, dtype=dt)
    dy = np.array([[1.0, np.nan, 3.0, -4.0, 5.0, np.inf, 7.0, 8.0]] * 3, dtype=dt)

    def run():
        y, mask = F.relu_forward(x)
        return y, mask, F.relu_backward(dy, mask)
    ref, jit = both(run)
    assert_same(ref, jit, 0)
    assert np.isnan(jit[0][0, 4]) and not jit[1][0, 4]          # NaN passes through


def test_relu_on_a_large_random_array(dt):
    x = np.random.default_rng(2).standard_normal((5, 3, 70_001 // 15)).astype(dt)
    dy = np.ones_like(x)
    ref, jit = both(lambda: F.relu_forward(x) + (F.relu_backward(dy, x > 0),))
    assert_same(ref, jit, 0)


def test_relu_of_a_strided_view_stays_numpy():
    x = np.random.default_rng(3).standard_normal((4, 6))[:, ::2]
    ref, jit = both(F.relu_forward, x)
    assert_same(ref, jit, 0)


@pytest.mark.parametrize("shape,k", [((3, 4, 8, 8), 2), ((2, 3, 7, 9), 2),
                                     ((2, 2, 9, 10), 3), ((1, 2, 6, 4), (3, 2))])
def test_maxpool_tiled_forward_backward(shape, k, dt):
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 4, shape).astype(dt)         # ties: the first maximum wins
    y0, _ = F.maxpool2d_forward(x, k)
    dy = rng.standard_normal(y0.shape).astype(dt)

    def run():
        y, cache = F.maxpool2d_forward(x, k)
        return y, cache[0], F.maxpool2d_backward(dy, cache)
    ref, jit = both(run)
    assert_same(ref, jit, 0)


def test_maxpool_window_with_nan_gives_nan(dt):
    x = np.zeros((1, 1, 4, 4), dtype=dt)
    x[0, 0, 1, 1] = np.nan
    x[0, 0, 2, 3] = 5
    ref, jit = both(F.maxpool2d_forward, x, 2)
    np.testing.assert_array_equal(jit[0], ref[0])              # NaN where numpy has NaN
    assert np.isnan(jit[0][0, 0, 0, 0]) and jit[0][0, 0, 1, 1] == 5


@pytest.mark.parametrize("stride,pad,groups", [(1, 1, 1), (1, 0, 1), (2, 1, 1), (1, 1, 2)])
def test_conv_forward_backward(stride, pad, groups, dt, monkeypatch):
    """The conv's compiled pieces (col2im of any geometry, the bias gradient) inside the
    whole layer, on planes of every size."""
    monkeypatch.setattr(im2col, "JIT_MIN_PLANE", 1)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 4, 9, 7)).astype(dt)
    W = rng.standard_normal((6, 4 // groups, 3, 3)).astype(dt)
    b = rng.standard_normal(6).astype(dt)

    def run():
        y, cache = F.conv2d_forward(x, W, b, stride, pad, groups=groups)
        dy = np.random.default_rng(7).standard_normal(y.shape).astype(dt)
        return (y,) + F.conv2d_backward(dy, cache)
    ref, jit = both(run)
    assert_same(ref, jit, tol(dt) * 10)


def test_two_threads_give_the_one_thread_result(monkeypatch):
    """Parallel over channels (sums) and planes (element-wise): the same bits at 2
    threads as at 1."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6, 10, 10)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g, b = np.ones(6, np.float32), np.zeros(6, np.float32)

    def run():
        y, cache, mean, var = F.batchnorm_forward(x, g, b)
        z, mask = F.relu_forward(y)
        p, pc = F.maxpool2d_forward(z, 2)
        return (y, mean, var, z, p, F.maxpool2d_backward(p, pc), F.relu_backward(dy, mask)
                ) + F.batchnorm_backward(dy, cache)
    monkeypatch.setattr(hostjit, "PARALLEL_MIN_BYTES", 0)      # small arrays, 2 threads
    monkeypatch.setattr(hostjit, "PARALLEL_MIN_BYTES_MKL", 0)
    hostjit.set_mode("numba")
    try:
        one = run()
        monkeypatch.setattr(blockpool, "width", lambda: 2)
        two = run()
    finally:
        hostjit.set_mode(None)
    for u, v in zip(one, two, strict=True):
        np.testing.assert_array_equal(u, v)


def test_kernels_follow_the_blas_threads(monkeypatch):
    monkeypatch.setattr(hostjit, "_state", {"mode": "numba", "mod": None})
    monkeypatch.setattr(blockpool, "width", lambda: 2)
    hostjit.kernels(np)
    assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    for blas in ("numpy", "mkl"):
        if blas == "mkl" and hostblas._find_mkl_rt() is None:
            continue
        with hostblas.using(blas):
            least = hostjit.parallel_min_bytes()
            assert least == (hostjit.PARALLEL_MIN_BYTES_MKL if blas == "mkl" else hostjit.PARALLEL_MIN_BYTES)
            hostjit.kernels(np, least - 1)                   # a small pass: one thread
            assert numba.get_num_threads() == 1
            hostjit.kernels(np, least)
            assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    monkeypatch.setattr(blockpool, "width", lambda: 1)
    hostjit.kernels(np)
    assert numba.get_num_threads() == 1


def test_modes_and_errors():
    assert hostjit.mode({}) == "auto"
    assert hostjit.mode({"MPIFC_KERNELS": " NumPy "}) == "numpy"
    with pytest.raises(ValueError, match="MPIFC_KERNELS='fortran'"):
        hostjit.mode({"MPIFC_KERNELS": "fortran"})
    with pytest.raises(ValueError, match="expected one of"):
        hostjit.set_mode("cuda")
    hostjit.set_mode("numpy")
    try:
        assert hostjit.kernels(np) is None and hostjit.active() == "numpy"
    finally:
        hostjit.set_mode(None)
    assert hostjit.active() == ("numpy" if hostjit.mode() == "numpy" else "numba")


def _run(code, **env):
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


BLOCK_NUMBA = "import sys; sys.modules['numba'] = None\n"


def test_without_numba_auto_falls_back_and_numba_mode_says_how_to_install():
    code = BLOCK_NUMBA + ("import numpy as np; from mpifc.nn import hostjit\n"
                          "print(hostjit.active())\n")
    r = _run(code, MPIFC_KERNELS="auto")
    assert r.returncode == 0 and r.stdout.strip() == "numpy", r.stderr
    r = _run(code, MPIFC_KERNELS="numba")
    assert r.returncode != 0 and 'pip install "mpifc[fast]"' in r.stderr


def test_openmp_workers_are_told_to_sleep_unless_the_user_chose():
    code = "import numpy as np; from mpifc.nn import hostjit; hostjit.kernels(np)\n" \
           "import os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = {"MPIFC_KERNELS": "numba"}
    clean = "import os; [os.environ.pop(v, None) for v in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')]\n"
    r = _run(clean + code, **env)
    assert r.stdout.split() == ["PASSIVE", "30000"], r.stderr
    r = _run(clean + "os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'\n" + code, **env)
    assert r.stdout.split() == ["ACTIVE", "None"], r.stderr
    r = _run(clean + "os.environ['GOMP_SPINCOUNT'] = '0'\n" + code, **env)
    assert r.stdout.split() == ["None", "0"], r.stderr


def test_numba_pool_is_sized_to_the_rank_threads_unless_set():
    code = ("import numpy as np; from threadpoolctl import threadpool_limits\n"
            "threadpool_limits(1)\n"
            "from mpifc.nn import hostjit; hostjit.kernels(np)\n"
            "import numba; print(numba.config.NUMBA_NUM_THREADS)")
    env = {"MPIFC_KERNELS": "numba"}
    r = _run("import os; os.environ.pop('NUMBA_NUM_THREADS', None)\n" + code, **env)
    assert r.stdout.strip() == "1", r.stderr
    r = _run(code, NUMBA_NUM_THREADS="2", **env)
    assert r.stdout.strip() == "2", r.stderr


def test_a_rank_limited_to_one_thread_stays_at_one_after_numba_loads():
    """Importing Numba loads SciPy's OpenBLAS with every core; the rank's limit must
    reach it, or blockpool.width() says 2 and a rank sharing its core splits its convs."""
    code = ("import os; os.environ.pop('OMP_NUM_THREADS', None); os.environ.pop('OPENBLAS_NUM_THREADS', None)\n"
            "import numpy as np; from threadpoolctl import threadpool_limits, threadpool_info\n"
            "threadpool_limits(1)\n"
            "from mpifc.nn import blockpool, hostjit; hostjit.kernels(np)\n"
            "blas = [(i['internal_api'], i['num_threads']) for i in threadpool_info() if i['user_api'] == 'blas']\n"
            "print(blockpool.width(), len(blas), max(n for _, n in blas))")
    r = _run(code, MPIFC_KERNELS="numba")
    assert r.returncode == 0, r.stderr
    width, libs, most = map(int, r.stdout.split())
    assert (width, most) == (1, 1), r.stdout
    if libs < 2:
        pytest.skip("Numba brought no BLAS of its own here (no SciPy)")


@pytest.mark.parametrize("opts", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                  dict(momentum=0.8, dampening=0.3, weight_decay=1e-2),
                                  dict(weight_decay=5e-4)])
def test_sgd_update_is_numpys_to_the_bit(opts, dt):
    """The compiled SGD step does NumPy's operations in NumPy's order and rounding."""
    from mpifc.nn.module import Parameter
    from mpifc.optim import SGD

    def run():
        rng = np.random.default_rng(8)
        ps = [Parameter(rng.standard_normal(s).astype(dt)) for s in [(70_001,), (3, 5)]]
        opt = SGD(ps, lr=0.05, **opts)
        for _ in range(3):                         # the first step, then momentum
            for p in ps:
                p.grad[...] = rng.standard_normal(p.shape)
            opt.step()
        return tuple(p.data.copy() for p in ps) + tuple(
            b for b in opt.state["momentum"] if b is not None)
    ref, jit = both(run)
    assert_same(ref, jit, 0)


def test_read_only_install_compiles_into_a_temporary_cache():
    """No writable cache beside the package nor in the home directory (a site install):
    Numba refuses to compile a cached kernel; the kernels still load, with a warning."""
    code = ("import os, warnings; os.environ.pop('NUMBA_CACHE_DIR', None)\n"
            "import numba.core.caching as c\n"
            "c.CacheImpl._locator_classes = [c.UserProvidedCacheLocator]   # nothing writable\n"
            "import numpy as np; from mpifc.nn import hostjit\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    print(hostjit.active(), any('NUMBA_CACHE_DIR' in str(x.message) for x in w))\n"
            "import mpifc.nn.functional as F\n"
            "print(F.relu_forward(np.array([-1.0, 2.0], np.float32))[0])")
    r = _run(code, MPIFC_KERNELS="auto")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["numba True", "[0. 2.]"], r.stdout


@pytest.mark.parametrize("name,opts", [("Adam", {}), ("Adam", dict(weight_decay=1e-2)),
                                       ("AdamW", dict(weight_decay=1e-2)),
                                       ("Adam", dict(betas=(0.5, 0.9), eps=1e-3))])
def test_adam_update_is_numpys_to_the_bit(name, opts, dt):
    from mpifc import optim
    from mpifc.nn.module import Parameter

    def run():
        rng = np.random.default_rng(9)
        ps = [Parameter(rng.standard_normal(s).astype(dt)) for s in [(70_001,), (3, 5)]]
        opt = getattr(optim, name)(ps, lr=0.01, **opts)
        for _ in range(3):
            for p in ps:
                p.grad[...] = rng.standard_normal(p.shape)
            opt.step()
        return tuple(p.data.copy() for p in ps) + tuple(
            b for s in opt.slots for b in opt.state[s])
    ref, jit = both(run)
    assert_same(ref, jit, 0)


def test_cached_tells_a_cold_cache(tmp_path):
    """The trainer's start line says when the first run compiles (a cold cache): an
    empty NUMBA_CACHE_DIR (it wins over the package's __pycache__) is cold; once a run
    has used the kernels, the next run finds them."""
    code = ("import numpy as np; from mpifc.nn import hostjit; print(hostjit.cached())\n"
            "import mpifc.nn.functional as F; from mpifc.nn.module import Parameter\n"
            "from mpifc.optim import SGD\n"
            "x = np.ones((2, 3, 4, 4), np.float32); F.relu_forward(x)\n"
            "F.batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))\n"
            "p = Parameter(np.ones(3, np.float32)); SGD([p], lr=0.1).step()\n")
    env = dict(MPIFC_KERNELS="numba", NUMBA_CACHE_DIR=str(tmp_path))
    first = _run(code, **env)
    assert first.stdout.strip() == "False", first.stderr
    second = _run(code, **env)
    assert second.stdout.strip() == "True", second.stderr
