"""scripts/gpu-check.sh on a machine without a GPU: one line, exit status 1, at once."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_fails_in_one_line_without_a_gpu():
    smi = shutil.which("nvidia-smi")
    if smi and "GPU" in subprocess.run([smi, "-L"], capture_output=True, text=True).stdout:
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if k != "MPIFC_DEVICE_MODULE"}
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu-check.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("gpu-check: no NVIDIA GPU here")
