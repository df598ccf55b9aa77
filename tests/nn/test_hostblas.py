"""Host GEMMs through oneMKL (mpifc.nn.hostblas) give what np.matmul gives.

np.matmul is the reference. Every operand layout the layers hand over (transposed
views, batched and broadcast operands, grouped convolutions, given outputs) is run
through :func:`hostblas.matmul` with the size threshold at zero, so small products
take the oneMKL path too; layouts a BLAS cannot take must still come back right,
from NumPy. The oneMKL cases skip when the ``mkl`` extra is not installed (CI
installs it).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from mpifc.nn import functional as F
from mpifc.nn import hostblas

HAVE_MKL = hostblas._find_mkl_rt() is not None
needs_mkl = pytest.mark.skipif(not HAVE_MKL, reason='oneMKL not installed (pip install "mpifc[mkl]")')


@pytest.fixture
def every_size(monkeypatch):
    """oneMKL for every product, however small (the layers' threshold is for speed)."""
    monkeypatch.setattr(hostblas, "MKL_MIN_MACS", 0)
    monkeypatch.setattr(hostblas, "MKL_MIN_MACS_THREADED", 0)
    hostblas.set_mode("mkl")
    yield
    hostblas.set_mode(None)


def rnd(shape, dt=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dt)


def tol(dt):
    return 1e-5 if dt == np.float32 else 1e-12


def check(a, b, out=None):
    want = np.matmul(a, b)
    got = hostblas.matmul(a, b, out=out)
    if out is not None:
        assert got is out
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=tol(a.dtype), atol=tol(a.dtype) * np.abs(want).max(initial=1))


def _cases():
    A, B = rnd((5, 7)), rnd((7, 3), seed=1)
    yield "NN", A, B, None
    yield "TN", np.asfortranarray(A), B, None
    yield "NT", A, np.asfortranarray(B), None
    yield "TT", rnd((7, 5)).T, rnd((3, 7), seed=1).T, None
    yield "column stride", rnd((5, 14))[:, ::2], B, None               # not a BLAS layout
    yield "row stride", rnd((10, 7))[::2], B, None                     # lda = 14
    yield "rows @ W.T", rnd((4, 2, 5, 7)), rnd((3, 7), seed=1).T, None
    yield "W @ batch", A, rnd((4, 3, 7, 2), seed=1), None
    Wg, c = rnd((3, 4, 6)), rnd((5, 3, 6, 8), seed=1)
    yield "groups, out", Wg, c, np.empty((5, 3, 4, 8), np.float32)
    yield "one group", rnd((1, 4, 6)), rnd((5, 1, 6, 8), seed=1), np.empty((5, 1, 4, 8), np.float32)
    yield "W.T @ batch", Wg.transpose(0, 2, 1), rnd((5, 3, 4, 8), seed=1), None
    yield "batch @ batch.T", c, rnd((5, 3, 4, 8), seed=1).transpose(0, 1, 3, 2), None
    yield "strided out", A, B, np.empty((5, 6), np.float32)[:, ::2]
    yield "empty rows", rnd((0, 3)), rnd((3, 4)), None
    yield "empty inner", rnd((2, 0)), rnd((0, 4)), None
    yield "float64", A.astype(np.float64), B.astype(np.float64), None
    yield "1 column", rnd((6, 1)), rnd((1, 5)), None


CASES = list(_cases())


@pytest.mark.parametrize("name,a,b,out", CASES, ids=[c[0] for c in CASES])
def test_numpy_mode_is_np_matmul_exactly(name, a, b, out):
    with hostblas.using("numpy"):
        got = hostblas.matmul(a, b, out=out)
    np.testing.assert_array_equal(got, np.matmul(a, b))


# layouts no BLAS call can take (or nothing to multiply): NumPy computes them
NOT_BLAS = {"column stride", "strided out", "empty rows", "empty inner"}


@needs_mkl
@pytest.mark.parametrize("name,a,b,out", CASES, ids=[c[0] for c in CASES])
def test_mkl_matches_np_matmul(every_size, monkeypatch, name, a, b, out):
    assert hostblas.active() == "mkl"
    done = []
    for fn in ("_gemm", "_batched"):
        real = getattr(hostblas, fn)
        monkeypatch.setattr(hostblas, fn, lambda *args, _f=real, **kw: done.append(_f(*args, **kw)) or done[-1])
    check(a, b, out)
    assert any(done) == (name not in NOT_BLAS), done


@needs_mkl
def test_mkl_leaves_what_it_cannot_take_to_numpy(every_size):
    a, b = rnd((5, 7)).astype(np.float64), rnd((7, 3))
    check(a, b)                                          # mixed dtypes: NumPy promotes
    ia, ib = np.arange(6).reshape(2, 3), np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(hostblas.matmul(ia, ib), ia @ ib)
    with pytest.raises(ValueError):
        hostblas.matmul(rnd((2, 3)), rnd((4, 2)))        # NumPy's shape error


@needs_mkl
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("groups,stride,pad", [(1, 1, 1), (2, 1, 1), (1, 2, 0)])
def test_conv_and_linear_gradients_same_with_mkl(every_size, dt, groups, stride, pad):
    x, W, b = rnd((3, 4, 7, 6), dt), rnd((6, 4 // groups, 3, 3), dt, 1), rnd(6, dt, 2)
    res = {}
    for m in ("numpy", "mkl"):
        with hostblas.using(m):
            y, cache = F.conv2d_forward(x, W, b, stride, pad, groups=groups)
            dx, dW, db = F.conv2d_backward(np.ones_like(y) * rnd(y.shape, dt, 3), cache)
            h = y.reshape(3, -1)
            V = rnd((5, h.shape[1]), dt, 4)
            z = F.linear_forward(h, V)
            dh, dV, _ = F.linear_backward(rnd(z.shape, dt, 5), h, V)
            res[m] = (y, dx, dW, db, z, dh, dV)
    for p, q in zip(res["numpy"], res["mkl"], strict=True):
        np.testing.assert_allclose(q, p, rtol=tol(dt) * 10, atol=tol(dt) * 10 * np.abs(p).max())


def test_mode_from_environment():
    assert hostblas.mode({}) == "auto"
    assert hostblas.mode({"MPIFC_BLAS": " NumPy "}) == "numpy"
    with pytest.raises(ValueError, match="MPIFC_BLAS"):
        hostblas.mode({"MPIFC_BLAS": "openblas"})
    with pytest.raises(ValueError):
        hostblas.set_mode("fast")
    hostblas.set_mode("numpy")
    with hostblas.using("auto"):
        assert hostblas._state["mode"] == "auto"
    assert hostblas._state["mode"] == "numpy"
    hostblas.set_mode(None)
    with hostblas.using("numpy"):
        assert hostblas.active() == "numpy" and hostblas.lib() is None


def test_without_mkl_auto_uses_numpy_and_mkl_says_how_to_install(monkeypatch):
    monkeypatch.setattr(hostblas, "_find_mkl_rt", lambda: None)
    monkeypatch.setitem(hostblas._state, "lib", None)
    monkeypatch.setitem(hostblas._state, "failed", None)
    with hostblas.using("auto"):
        assert hostblas.active() == "numpy"
        a, b = rnd((3, 4)), rnd((4, 2))
        np.testing.assert_array_equal(hostblas.matmul(a, b), a @ b)
    with hostblas.using("mkl"), pytest.raises(RuntimeError, match=r"mpifc\[mkl\]"):
        hostblas.lib()


def _run_ok(code):
    """Run ``code`` in a fresh interpreter with MPIFC_BLAS=mkl; it must print ok."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MPIFC_BLAS": "mkl"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@needs_mkl
def test_mkl_threads_follow_the_rank_and_threadpoolctl():
    """oneMKL starts with NumPy's BLAS threads and is one more pool for threadpoolctl
    (a rank's one-thread limit must reach it, or 2 ranks on 2 cores oversubscribe)."""
    code = (
        "import mpifc, numpy as np\n"
        "from threadpoolctl import threadpool_info, threadpool_limits\n"
        "threadpool_limits(1)\n"
        "from mpifc.nn import hostblas, blockpool\n"
        "assert hostblas.active() == 'mkl'\n"
        "n = {i['internal_api']: i['num_threads'] for i in threadpool_info()}\n"
        "assert n['mkl'] == 1, n\n"
        "threadpool_limits(2)\n"
        "n = {i['internal_api']: i['num_threads'] for i in threadpool_info()}\n"
        "assert n['mkl'] == 2 and blockpool.width() == 2, n\n"
        "print('ok')\n")
    _run_ok(code)


@needs_mkl
def test_mkl_first_loaded_inside_a_thread_share_gets_the_rank_threads():
    """A conv's first GEMM runs inside blockpool's shares, where BLAS has one thread:
    oneMKL loaded there must still end with the rank's threads (it once kept one,
    and the linear layers of a 2-thread rank ran on one core)."""
    code = (
        "import mpifc, numpy as np\n"
        "from threadpoolctl import threadpool_info, threadpool_limits\n"
        "threadpool_limits(2)\n"
        "from mpifc.nn import hostblas, blockpool\n"
        "hostblas.MKL_MIN_MACS = 0\n"
        "a = np.ones((8, 8), np.float32)\n"
        "def share(i0, i1):\n"
        "    return float(hostblas.matmul(a, a)[0, 0])\n"
        "assert blockpool.run(share, [(0, 1), (1, 2)]) == [8.0, 8.0]\n"
        "n = {i['internal_api']: i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}\n"
        "assert hostblas.active() == 'mkl' and n['mkl'] == 2 and blockpool.width() == 2, n\n"
        "print('ok')\n")
    _run_ok(code)


@needs_mkl
@pytest.mark.parametrize("threads,mkl", [(1, False), (2, True)])
def test_a_rank_with_several_threads_sends_smaller_products_to_mkl(monkeypatch, threads, mkl):
    """On one thread products under MKL_MIN_MACS stay with NumPy's BLAS; with several
    (outside a share) everything from MKL_MIN_MACS_THREADED goes to oneMKL."""
    from mpifc.nn import blockpool

    monkeypatch.setattr(blockpool, "width", lambda: threads)
    done = []
    real = hostblas._gemm
    monkeypatch.setattr(hostblas, "_gemm", lambda *a: done.append(real(*a)) or done[-1])
    with hostblas.using("mkl"):
        check(rnd((256, 1024)), rnd((1024, 10), seed=1))            # 2.6 M multiply-adds
        check(rnd((8, 8)), rnd((8, 8), seed=1))                     # tiny: NumPy either way
    assert done == ([True] if mkl else [])


@needs_mkl
def test_every_share_thread_runs_its_blas_on_one_thread():
    """oneMKL's thread count is per thread (GNU OpenMP): the one-thread limit of a
    blockpool share must reach the pool thread's oneMKL too, not only the caller's
    (a 2-thread rank's shares once ran 2-thread oneMKL GEMMs side by side)."""
    code = (
        "import mpifc, numpy as np\n"
        "from threadpoolctl import threadpool_limits\n"
        "threadpool_limits(2)\n"
        "from mpifc.nn import hostblas, blockpool\n"
        "assert hostblas.active() == 'mkl'\n"
        "def share(i0, i1):\n"
        "    return sorted({c.get_num_threads() for c in blockpool._blas_controllers()})\n"
        "for _ in range(3):\n"
        "    assert blockpool.run(share, [(0, 1), (1, 2)]) == [[1], [1]]\n"
        "assert blockpool.width() == 2\n"
        "print('ok')\n")
    _run_ok(code)
