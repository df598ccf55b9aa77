# Sourced by the scripts: a local virtual environment with mpifc installed from this checkout.
# MPIFC_VENV overrides the location; MPIFC_EXTRAS the pip extras (default: test).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MPIFC_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "mpifc: creating virtual environment $VENV" >&2
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import mpifc, mpi4py, h5py, pytest_mpi" 2>/dev/null || [ "${MPIFC_REINSTALL:-0}" = 1 ]; then
  echo "mpifc: installing mpifc[${MPIFC_EXTRAS:-test}] into $VENV" >&2
  python -m pip install -q --disable-pip-version-check -e "$ROOT[${MPIFC_EXTRAS:-test}]"
fi
cd "$ROOT"
