"""Ranks whose shapes differ from EACH OTHER end the job with an error, never a hang.

No rank can see locally that its batch differs from its peers'. Under MPIFC_DEBUG=1
the communicator compares every collective's element count across ranks before the
call and raises CollectiveMismatch on every rank, naming the call and the counts;
without it MPI fails the mismatched call ("message truncated") on at least one rank
and the abort handler ends the job. Each case is its own mpiexec job under a timeout.
"""
import os
import sys
import textwrap

import pytest

from joblaunch import MPIEXEC, run_job as _run

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")

# rank 1 gets a batch of 5, the others 4: every local check passes
SCRIPT = """
    import sys
    import numpy as np
    from mpifc.comm import world, install_abort_handler
    from mpifc.parallel import ColumnParallelLinear, ParallelSoftmaxCrossEntropy, RowParallelLinear
    install_abort_handler()
    c = world()
    N = 5 if c.rank == 1 else 4
    kind = sys.argv[1]
    if kind == "column-gather":
        ColumnParallelLinear(6, 8, c, gather_output=True, seed=1).forward(np.ones((N, 3, 6), np.float32))
    elif kind == "column-backward":
        fc = ColumnParallelLinear(6, 8, c, seed=1)
        y = fc.forward(np.ones((N, 6), np.float32))
        fc.backward(np.ones_like(y))
    elif kind == "row":
        RowParallelLinear(6, 8, c, input_is_sharded=False, seed=1).forward(np.ones((N, 6), np.float32))
    elif kind == "loss":
        loss = ParallelSoftmaxCrossEntropy(10, c)
        loss.forward(np.ones((N, loss.Q_r), np.float32), np.zeros(N, np.int64))
    print(f"rank {c.rank} passed", flush=True)
"""


def run_job(kind, n, debug):
    env = {"MPIFC_DEBUG": "1" if debug else "0", "MPIFC_DEBUG_TIMEOUT": "20"}
    return _run([sys.executable, "-c", textwrap.dedent(SCRIPT), kind], n, timeout=90, env=env)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("kind", ["column-gather", "column-backward", "row", "loss"])
def test_debug_mode_names_a_batch_that_differs_between_ranks(kind, n):
    p, dt = run_job(kind, n, debug=True)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "collective mismatch" in p.stderr, p.stderr[-3000:]
    # the counts of rank 0 and of the odd rank 1 are both named
    assert "rank 0:" in p.stderr and "rank 1:" in p.stderr, p.stderr[-3000:]


@pytest.mark.parametrize("kind", ["column-gather", "column-backward", "row", "loss"])
def test_default_mode_ends_the_job_with_an_error(kind):
    p, dt = run_job(kind, 3, debug=False)
    assert p.returncode != 0, p.stdout + p.stderr
