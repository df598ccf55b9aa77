"""The CuPy test double (tests/fakecupy.py) and mpifc.backend's hook for it.

The double is what lets a CPU machine prove the device path (issue 15), so its wall
must hold: no implicit conversion to NumPy, every explicit copy counted.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import fakecupy as cp
from mpifc import backend

HERE = os.path.dirname(os.path.abspath(__file__))


def test_implicit_conversion_to_numpy_is_refused():
    d = cp.asarray(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(d)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array(d)
    with pytest.raises(TypeError):
        np.exp(d)                       # a NumPy ufunc on device data
    with pytest.raises(TypeError, match="numpy.ndarray"):
        d + np.ones(3)                  # host array mixed into device arithmetic
    with pytest.raises(TypeError, match="numpy.ndarray"):
        cp.maximum(d, np.zeros(3))
    with pytest.raises(ValueError, match="one-element"):
        float(d)
    with pytest.raises(ValueError, match="one-element"):
        bool(d > 0)
    with pytest.raises(TypeError, match="host access"):
        d.tobytes()


def test_copies_are_counted_and_device_math_stays_on_the_device():
    cp.reset_counts()
    h = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = cp.asarray(h)                                        # h2d
    y = cp.maximum(d * 2 - 3, 0).sum(axis=1)                 # device only
    assert type(y) is cp.ndarray and type(d.T @ d) is cp.ndarray
    assert type(np.moveaxis(d, 0, 1)) is cp.ndarray          # numpy function: runs on device
    assert cp.counts["h2d"] == 1 and cp.counts["d2h"] == 0
    np.testing.assert_array_equal(y.get(), np.maximum(h * 2 - 3, 0).sum(axis=1))   # d2h
    out = np.empty((2, 3), np.float32)
    assert cp.asnumpy(d, out=out) is out                     # d2h into a given buffer
    d.set(h + 1)                                             # h2d
    d[0] = np.zeros(3, np.float32)                           # h2d (host data into a slice)
    assert float(d.sum()) == 4 + 5 + 6                       # scalar read
    assert cp.counts["h2d"] == 3 and cp.counts["d2h"] == 2 and cp.counts["scalar"] == 1
    assert cp.counts["h2d_bytes"] == 24 + 24 + 12 and cp.counts["d2h_bytes"] == 8 + 24
    with pytest.raises(ValueError, match="shape/dtype"):
        d.set(h.astype(np.float64))


def test_device_count_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("FAKECUPY_DEVICES", "4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cp.cuda.runtime.getDeviceCount() == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert cp.cuda.runtime.getDeviceCount() == 2
    cp.cuda.Device(1).use()
    assert cp.current_device == 1
    with pytest.raises(RuntimeError, match="InvalidDevice"):
        cp.cuda.Device(2).use()


def test_backend_recognises_the_double(dev):
    d = dev.asarray(np.ones(3))
    assert backend.is_device_array(d) and not backend.is_device_array(np.ones(3))
    assert backend.get_array_module(d) is dev and backend.get_array_module(np.ones(3)) is np
    assert backend.available_backends() == ["numpy", "cupy"]
    assert backend.backend_module("cupy") is dev
    h = backend.to_host(d)
    assert type(h) is np.ndarray and dev.counts["d2h"] == 1
    assert type(backend.to_device(h, dev)) is dev.ndarray and dev.counts["h2d"] == 2


def test_device_module_env_names_a_file():
    """MPIFC_DEVICE_MODULE=<path>.py: a fresh process uses that module in place of cupy."""
    code = ("from mpifc import backend; import numpy as np; "
            "d = backend.to_device(np.ones(2), backend.backend_module('cupy')); "
            "print(type(d).__module__, backend.device_count())")
    env = {**os.environ, "MPIFC_DEVICE_MODULE": os.path.join(HERE, "fakecupy.py"),
           "FAKECUPY_DEVICES": "3"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fakecupy", "3"]


def test_backend_parametrised_layer_and_optimizer_tests_pass_on_the_double():
    """The CuPy cases of the layer / functional / optimizer tests (the GPU test subset of
    scripts/gpu-check.sh), run with the double as the device module."""
    env = {**os.environ, "MPIFC_DEVICE_MODULE": os.path.join(HERE, "fakecupy.py")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    files = [os.path.join(HERE, f) for f in ("nn/test_layers.py", "nn/test_functional.py",
                                             "optim/test_optimizers.py",
                                             "optim/test_schedules_clip.py")]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-k", "cupy", *files], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(HERE))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last, last
    assert int(last.split(" passed")[0].split()[-1]) >= 50, last     # the cupy cases ran


def test_gradient_norm_on_the_device_is_read_back_once(dev):
    """clip_grad_norm on device gradients: one scalar read for all parameters, the host norm."""
    from mpifc.nn.module import Parameter
    from mpifc.optim.clip import clip_grad_norm

    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (3,), (2, 2, 2))]

    def params(xp):
        ps = []
        for g in grads:
            p = Parameter(xp.zeros(g.shape, np.float32))
            p.grad = xp.asarray(g).copy()     # clipping scales it in place
            ps.append(p)
        return ps

    host = params(np)
    want = clip_grad_norm(host, 1.0)
    on_dev = params(dev)
    dev.reset_counts()
    got = clip_grad_norm(on_dev, 1.0)
    assert dev.counts["scalar"] == 1 and dev.counts["d2h"] == 0
    assert got == pytest.approx(want, rel=1e-6)
    for p, q in zip(on_dev, host):
        np.testing.assert_allclose(p.grad.get(), q.grad, rtol=1e-6)
