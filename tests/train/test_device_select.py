"""train.device: which GPU each rank takes, and the one-line errors (mpifc/device.py).

The GPUs are the CuPy test double's (tests/fakecupy.py): FAKECUPY_DEVICES of them,
or as many as CUDA_VISIBLE_DEVICES lists. The ranks of a test job share one node,
so the node-local rank is the world rank.
"""
import os
import subprocess
import sys

import pytest

import fakecupy as cp
from joblaunch import MPIEXEC, run_job
from mpifc import backend
from mpifc.device import DeviceError, select_device

HERE = os.path.dirname(os.path.abspath(__file__))
DOUBLE = os.path.join(os.path.dirname(HERE), "fakecupy.py")


@pytest.fixture
def dev(monkeypatch):
    old = backend.set_device_module(cp)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("MPIFC_DEVICE_ID", raising=False)
    yield cp
    backend.set_device_module(old)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(backend, "device_count", lambda: 0)
    monkeypatch.setattr(backend, "cupy_importable", lambda: False)


def _raises_everywhere(comm, fn, match):
    with pytest.raises(DeviceError, match=match) as e:
        fn()
    assert e.value.all_ranks
    return str(e.value)


@pytest.mark.mpi(min_size=1)
def test_cpu_and_auto_without_a_gpu(comm, no_gpu):
    assert select_device("cpu", comm).kind == "cpu"
    assert select_device("auto", comm).kind == "cpu"
    msg = _raises_everywhere(comm, lambda: select_device("cuda", comm),
                             r"pip install mpifc\[gpu\]")
    assert "\n" not in msg and msg.startswith("rank 0")


@pytest.mark.mpi(min_size=1)
def test_one_gpu_per_local_rank(comm, dev, monkeypatch):
    monkeypatch.setenv("FAKECUPY_DEVICES", str(comm.size + 1))
    d = select_device("cuda", comm)
    assert (d.kind, d.index, d.local_rank, d.local_size) == ("cuda", comm.rank, comm.rank,
                                                               comm.size)
    assert cp.current_device == comm.rank and str(d) == f"cuda:{comm.rank}"
    assert d.xp is cp and select_device("auto", comm).index == comm.rank


@pytest.mark.mpi(min_size=1)
def test_cuda_visible_devices_and_the_per_rank_override(comm, dev, monkeypatch):
    monkeypatch.setenv("FAKECUPY_DEVICES", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(4 + i) for i in range(comm.size)))
    assert select_device("cuda", comm).index == comm.rank        # indices of the visible ones
    monkeypatch.setenv("MPIFC_DEVICE_ID", str(comm.size - 1 - comm.rank))
    assert select_device("cuda", comm).index == comm.size - 1 - comm.rank
    monkeypatch.setenv("MPIFC_DEVICE_ID", str(comm.size) if comm.rank == 0 else "0")
    msg = _raises_everywhere(comm, lambda: select_device("cuda", comm), "MPIFC_DEVICE_ID")
    assert msg.startswith("rank 0:")


@pytest.mark.mpi(min_size=2)
def test_a_gpu_bound_to_each_rank_is_its_device_0(comm, dev, monkeypatch):
    """srun --gpu-bind: each rank sees one GPU of its own (CUDA_VISIBLE_DEVICES differs)."""
    monkeypatch.setenv("FAKECUPY_DEVICES", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(comm.rank))
    d = select_device("cuda", comm)
    assert (d.index, d.local_rank, d.local_size) == (0, 0, 1)


@pytest.mark.mpi(min_size=2)
def test_more_ranks_than_gpus_needs_share_gpu(comm, dev, monkeypatch):
    monkeypatch.setenv("FAKECUPY_DEVICES", "1")
    _raises_everywhere(comm, lambda: select_device("cuda", comm),
                       f"{comm.size} ranks on this node but 1 visible GPU.*train.share_gpu")
    d = select_device("cuda", comm, share_gpu=True)
    assert d.index == 0 and d.local_rank == comm.rank


# ---------------------------------------------------------------------- the command line
def _job(args, n, **env):
    full = {"MPIFC_DEVICE_MODULE": DOUBLE, "FAKECUPY_DEVICES": "2", **env}
    return run_job([sys.executable, "-m", "mpifc", *args], n, timeout=240, env=full)


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")
def test_train_and_eval_with_device_on_the_command_line(tmp_path):
    """mpiexec -n 2 mpifc train --device cuda (two double GPUs), then eval --device cpu;
    more ranks than GPUs: one line naming train.share_gpu, printed once, exit 1."""
    data, out = f"data.dir={tmp_path}/data", str(tmp_path / "run")
    p, _ = _job(["train", "digits-cnn", "--device", "cuda", "--set", "train.max_steps=3",
                 "--set", data, "--out", out], 2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "CuPy on cuda:0 (rank 0)" in p.stdout
    p, _ = _job(["eval", out, "--device", "cpu", "--set", data], 2)
    assert p.returncode == 0 and "test_acc" in p.stdout, p.stdout + p.stderr
    p, _ = _job(["train", "digits-cnn", "--device", "cuda", "--set", "train.max_steps=1",
                 "--set", data, "--out", str(tmp_path / "three")], 3)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if "train.share_gpu" in ln]
    assert len(lines) == 1 and "3 ranks on this node but 2 visible GPU(s)" in lines[0], p.stderr


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")
def test_cuda_without_cupy_is_one_line_naming_the_extra(tmp_path):
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('cupy') is not None)"
    if subprocess.run([sys.executable, "-c", code]).returncode:
        pytest.skip("cupy is installed here")
    p, _ = run_job([sys.executable, "-m", "mpifc", "train", "digits-cnn", "--device", "cuda",
                    "--set", f"data.dir={tmp_path}/data", "--out", str(tmp_path / "r")], 2,
                   timeout=240, env={"MPIFC_DEVICE_MODULE": ""})
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install mpifc[gpu]" in lines[0], p.stderr
