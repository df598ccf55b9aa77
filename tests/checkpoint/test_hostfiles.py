"""hostfiles/: the example hostfiles parse with the simulator's parser, and the batch
scripts are valid bash that launch ``mpifc train`` as documented (run here with fake
scontrol/srun/mpiexec/mpifc commands that record how they were called)."""
import os
import shutil
import subprocess

import pytest

from mpifc.comm import world
from mpifc.sim.cluster import from_hostfile, parse_hostfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOSTFILES = os.path.join(ROOT, "hostfiles")
SCRIPTS = ["slurm-srun.sbatch", "slurm-mpiexec.sbatch", "pbs.sh"]

# subprocesses and files in a per-test directory: one process is enough
pytestmark = pytest.mark.skipif(world().size != 1, reason="single-process tests")

FAKE = """#!/bin/bash
echo "$(basename "$0") $* | OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}" >> "$FAKE_LOG"
if [ "$(basename "$0")" = scontrol ]; then printf 'cn001\\ncn002\\n'; fi
"""


@pytest.mark.parametrize("name, want", [("mpich.hosts", [("node01", 4), ("node02", 4)]),
                                        ("openmpi.hosts", [("node01", 4), ("node02", 4)])])
def test_hostfiles_parse(name, want):
    path = os.path.join(HOSTFILES, name)
    with open(path) as f:
        assert parse_hostfile(f.read(), where=path) == want
    cl = from_hostfile(path, "ib-hdr100")
    assert (cl.nodes, cl.ranks_per_node) == (2, 4)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    r = subprocess.run(["bash", "-n", os.path.join(HOSTFILES, script)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def _run(script, tmp_path, env_extra):
    fake = tmp_path / "bin"
    fake.mkdir()
    for cmd in ("scontrol", "srun", "mpiexec", "mpifc"):
        p = fake / cmd
        p.write_text(FAKE)
        p.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
           "HOME": str(tmp_path), "MPIFC_VENV": str(tmp_path / "no-venv"), **env_extra}
    r = subprocess.run([shutil.which("bash"), os.path.join(HOSTFILES, script)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return log.read_text().splitlines()


def test_slurm_srun_script(tmp_path):
    calls = _run("slurm-srun.sbatch", tmp_path,
                 {"SLURM_CPUS_PER_TASK": "4", "SLURM_SUBMIT_DIR": str(tmp_path),
                  "SLURM_JOB_ID": "77"})
    assert calls[0].startswith("srun --ntasks=1 --nodes=1 mpifc data prepare digits")
    # srun does not inherit --cpus-per-task since Slurm 22.05: the script passes it again
    assert calls[1].startswith("srun --mpi=pmix --cpus-per-task=4 --cpu-bind=cores mpifc train "
                               "digits-cnn "
                               "--set parallel.tp=2 --set train.out=runs/digits-cnn-77")
    assert all(c.endswith("OMP_NUM_THREADS=4") for c in calls)


def test_slurm_mpiexec_script_builds_a_hostfile(tmp_path):
    calls = _run("slurm-mpiexec.sbatch", tmp_path,
                 {"SLURM_CPUS_PER_TASK": "3", "SLURM_SUBMIT_DIR": str(tmp_path),
                  "SLURM_JOB_ID": "78", "SLURM_JOB_NODELIST": "cn[001-002]",
                  "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4"})
    hostfile = tmp_path / "hosts-78.txt"
    assert parse_hostfile(hostfile.read_text()) == [("cn001", 2), ("cn002", 2)]
    assert calls[0].startswith("scontrol show hostnames cn[001-002]")
    assert calls[1].startswith("mpifc data prepare digits")
    assert calls[2].startswith(f"mpiexec -f hosts-78.txt -n 4 -genv OMP_NUM_THREADS 3 mpifc "
                               "train digits-cnn --set parallel.tp=2")
    assert all(c.endswith("OMP_NUM_THREADS=3") for c in calls)


def test_pbs_script_uses_nodefile(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("cn001\ncn001\ncn002\ncn002\n")     # one line per rank (mpiprocs=2)
    calls = _run("pbs.sh", tmp_path, {"PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": str(tmp_path),
                                      "PBS_JOBID": "9.pbs", "OMP_NUM_THREADS": "4"})
    assert parse_hostfile(nodefile.read_text()) == [("cn001", 2), ("cn002", 2)]
    assert calls[0].startswith("mpifc data prepare digits")
    assert calls[1].startswith(f"mpiexec -f {nodefile} -n 4 -genv OMP_NUM_THREADS 4 mpifc train "
                               "digits-cnn --set parallel.tp=2 --set train.out=runs/digits-cnn-9.pbs")
