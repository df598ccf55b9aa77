"""Nothing hangs: one failing rank ends the job; debug mode names mismatched collectives."""
import os
import sys
import textwrap

import pytest

from joblaunch import MPIEXEC, run_job as _run


def run_job(code, n, timeout=60, env=None):
    return _run([sys.executable, "-c", textwrap.dedent(code)], n, timeout=timeout, env=env)


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")
def test_one_rank_raises_job_ends_nonzero():
    p, _ = run_job("""
        import numpy as np
        from mpifc.comm import world, install_abort_handler
        install_abort_handler()
        c = world()
        if c.rank == 1:
            raise RuntimeError("boom on purpose")
        c.allreduce(np.ones(4))       # ranks 0 and 2 would wait here forever
    """, 3)
    assert p.returncode != 0           # ended (run_job's timeout fails the test on a hang)
    assert "rank 1 of 3 failed with RuntimeError: boom on purpose" in p.stderr


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")
def test_debug_mode_names_mismatched_collective():
    p, _ = run_job("""
        import numpy as np
        from mpifc.comm import world, install_abort_handler
        install_abort_handler()
        c = world(debug=True)
        c.allreduce(np.ones(4))
        if c.rank == 0:
            c.bcast(np.ones(4))
        else:
            c.allreduce(np.ones(4))
    """, 2)
    assert p.returncode != 0
    assert "collective mismatch" in p.stderr and "call #2" in p.stderr
    assert "rank 0: bcast" in p.stderr and "rank 1: allreduce" in p.stderr


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")
def test_debug_mode_reports_missing_rank():
    p, _ = run_job("""
        import time
        import numpy as np
        from mpifc.comm import world, install_abort_handler
        install_abort_handler()
        c = world(debug=True)
        if c.rank == 0:
            c.allreduce(np.ones(4))
        else:
            time.sleep(20)
            print("slept through", flush=True)
    """, 2, env={"MPIFC_DEBUG_TIMEOUT": "2"})
    # rank 0 gave up after 2 s and the abort ended rank 1 in its 20 s sleep
    assert p.returncode != 0 and "slept through" not in p.stdout
    assert "never issued it" in p.stderr
