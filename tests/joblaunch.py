"""Launch a separate mpiexec job from a test (abort, CLI and launch-script tests).

The child must not inherit the PMI/Hydra variables of an enclosing mpiexec, or it
would try to join that job instead of starting its own.
"""
import os
import subprocess
import sys
import time

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPIR_", "MPI_LOCAL", "OMPI_")


def child_env(extra=None, pythonpath=None):
    """os.environ minus any enclosing launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def run_job(args, n, timeout=60, env=None, cwd=None):
    """Run ``mpiexec -n n *args``; returns (CompletedProcess, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.run([MPIEXEC, "-n", str(n), *args], capture_output=True, text=True,
                       timeout=timeout, env=child_env(env), cwd=cwd)
    return p, time.perf_counter() - t0
