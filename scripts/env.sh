# Sourced by the scripts: a local virtual environment with mpifc installed from this checkout.
#   MPIFC_VENV      the environment's location (default: .venv in the checkout)
#   MPIFC_EXTRAS    pip extras to install (default: what the calling script needs --
#                   fast (Numba kernels) and mkl (oneMKL GEMMs, x86-64) always,
#                   test,security,export,plot for the tests --
#                   plus `mpich`, the embedded MPI wheel,
#                   unless a site MPI's mpiexec is already on PATH: a site MPI never
#                   gets a second mpiexec beside it)
#   MPIFC_REINSTALL=1  install again even when everything imports
# The calling script sets MPIFC_NEED: "run" (mpifc and MPI) or "test" (also pytest-mpi).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MPIFC_VENV:-$ROOT/.venv}"
NEED="${MPIFC_NEED:-run}"
site_mpiexec="$(command -v mpiexec || true)"
case "$site_mpiexec" in "$VENV"/*) site_mpiexec="" ;; esac
if [ -z "${MPIFC_EXTRAS+x}" ]; then
  MPIFC_EXTRAS="fast,mkl"                                           # Numba kernels, oneMKL GEMMs
  [ "$NEED" = test ] && MPIFC_EXTRAS="test,fast,mkl,security,export,plot"   # signing: cryptography; export: safetensors; plot: matplotlib
  if [ -z "$site_mpiexec" ]; then
    MPIFC_EXTRAS="${MPIFC_EXTRAS:+$MPIFC_EXTRAS,}mpich"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "mpifc: creating virtual environment $VENV" >&2
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
modules="mpifc, mpi4py, h5py"
case ",$MPIFC_EXTRAS," in *,fast,*) modules="$modules, numba" ;; esac
[ "$NEED" = test ] && modules="$modules, pytest_mpi, cryptography, safetensors"
check="import $modules"
case ",$MPIFC_EXTRAS,$(uname -s)-$(uname -m)" in   # the mkl wheel (x86-64 Linux) has no module: ask for its files
  *,mkl,*Linux-x86_64) check="$check; from mpifc.nn import hostblas; assert hostblas._find_mkl_rt()" ;;
esac
if ! python -c "$check" 2>/dev/null || ! command -v mpiexec >/dev/null \
   || [ "${MPIFC_REINSTALL:-0}" = 1 ]; then
  spec="$ROOT${MPIFC_EXTRAS:+[$MPIFC_EXTRAS]}"
  echo "mpifc: installing $spec into $VENV" >&2
  python -m pip install -q --disable-pip-version-check -e "$spec"
fi
if ! command -v mpiexec >/dev/null; then
  echo "mpifc: no mpiexec on PATH: load your site MPI (module load ...) or set MPIFC_EXTRAS=mpich" >&2
  exit 1
fi
cd "$ROOT"
