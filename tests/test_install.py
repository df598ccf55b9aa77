"""Installing: the `mpich` wheel is an extra, never a dependency, and the scripts install
it only where no site MPI is on PATH (two mpiexec on PATH start N copies of a 1-rank job).

scripts/env.sh runs here against a fake virtual environment whose `python` records the
pip command it is given (no network, no real install)."""
import os
import shutil
import subprocess
import tomllib

import pytest

from mpifc.comm import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(world().size != 1, reason="single-process tests")

FAKE_PYTHON = """#!/bin/bash
# imports fail (so env.sh installs); `-m pip ...` is recorded and "installs" mpiexec
if [ "$1" = -c ]; then exit 1; fi
echo "$*" >> "$FAKE_LOG"
case "$*" in *mpich*) printf '#!/bin/sh\\n' > "$(dirname "$0")/mpiexec"; chmod +x "$(dirname "$0")/mpiexec";; esac
"""


def test_mpich_is_an_extra_not_a_dependency():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        proj = tomllib.load(f)["project"]
    assert not any(d.split(">")[0].split("=")[0].strip() == "mpich" for d in proj["dependencies"])
    assert any(d.startswith("mpich") for d in proj["optional-dependencies"]["mpich"])
    assert not any(d.startswith("mpich") for d in proj["optional-dependencies"]["test"])
    assert proj["optional-dependencies"]["security"] == ["cryptography>=42"]   # not a dependency
    assert not any(d.startswith("cryptography") for d in proj["dependencies"])
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        # CI runs the compiled kernels, oneMKL and the signing, encryption, export, plot tests
        assert '".[test,fast,mkl,mpich,security,export,plot]"' in f.read()


def _env_sh(tmp_path, need, site_mpiexec):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    site = tmp_path / "site"
    site.mkdir()
    if site_mpiexec:
        (site / "mpiexec").write_text("#!/bin/sh\n")
        (site / "mpiexec").chmod(0o755)
    log = tmp_path / "pip.log"
    env = {"PATH": f"{site}:/usr/bin:/bin", "MPIFC_VENV": str(venv), "MPIFC_NEED": need,
           "FAKE_LOG": str(log), "HOME": str(tmp_path)}
    r = subprocess.run([shutil.which("bash"), "-c", f'. "{ROOT}/scripts/env.sh"'], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return log.read_text()


@pytest.mark.skipif(shutil.which("mpiexec", path="/usr/bin:/bin") is not None,
                    reason="a system mpiexec in /usr/bin")
@pytest.mark.parametrize("need, site, want", [
    ("test", True, f"-e {ROOT}[test,fast,mkl,security,export,plot]"),          # site MPI: never the wheel
    ("test", False, f"-e {ROOT}[test,fast,mkl,security,export,plot,mpich]"),   # laptop / CI: the wheel brings mpiexec
    ("run", True, f"-e {ROOT}[fast,mkl]\n"),     # demo on a site MPI: mpifc, its kernels and GEMMs
    ("run", False, f"-e {ROOT}[fast,mkl,mpich]"),
])
def test_env_sh_installs_the_wheel_only_without_a_site_mpi(tmp_path, need, site, want):
    got = _env_sh(tmp_path, need, site)
    assert want in got, got
    assert ("mpich" in got) == (not site)
