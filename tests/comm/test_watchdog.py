"""Watchdog: a rank that stops making progress ends the job, naming it."""
import os
import sys
import textwrap
import threading

import pytest

from joblaunch import MPIEXEC, run_job as _run
from mpifc.comm.watchdog import running, slow_ranks

needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")


def run_job(code, n, timeout=60, env=None):
    return _run([sys.executable, "-c", textwrap.dedent(code)], n, timeout=timeout, env=env)


# Rank 1 of a 3-rank `mpifc train --watchdog 3` freezes at step 3: FAULT=stop stops the
# process (SIGSTOP, as a debugger or a swapped-out node would), FAULT=sleep loops
# outside communication.
FROZEN_RANK = """
    import os, signal, sys, time
    from mpifc import train as T
    step = T.Trainer.train_step
    def frozen(self, batch):
        if self.comm.rank == 1 and self.step == 3:
            if os.environ["FAULT"] == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            while True:
                time.sleep(0.1)
        return step(self, batch)
    T.Trainer.train_step = frozen
    from mpifc.cli import main
    sys.exit(main(["train", "digits-mlp", "--quiet", "--watchdog", "3",
                   "--set", "train.epochs=1", "--set", "train.trace=false",
                   "--set", "data.dir=" + os.environ["DATA"], "--out", os.environ["OUT"]]))
"""


@needs_mpiexec
@pytest.mark.parametrize("fault,why", [("stop", "rank(s) 1 did not answer"),
                                       ("sleep", "rank 1 is outside communication at")])
def test_frozen_rank_ends_the_job_and_is_named(tmp_path, fault, why):
    # before: no watchdog; the job waited forever (here: until the test's timeout)
    p, dt = run_job(FROZEN_RANK, 3, timeout=90, env={
        "FAULT": fault, "DATA": str(tmp_path), "OUT": str(tmp_path / "run")})
    assert p.returncode != 0
    assert p.stderr.count("mpifc: watchdog: no step finished within 3 s") == 1, p.stderr
    assert "slow rank(s) 1:" in p.stderr and why in p.stderr


@needs_mpiexec
def test_debug_mode_reports_a_rank_that_stops_inside_a_collective():
    # the debug check used to time only the signature exchange: a rank stopping after it,
    # inside the collective, hung the job
    p, dt = run_job("""
        import os, signal
        import numpy as np
        from mpifc.comm import world, install_abort_handler
        install_abort_handler()
        c = world(debug=True)
        c.allreduce(np.ones(4))
        if c.rank == 1:
            real = c.mpi
            class Frozen:                   # stops inside the collective, after the check
                def __getattr__(self, name):
                    return getattr(real, name)
                def Allreduce(self, *a, **k):
                    os.kill(os.getpid(), signal.SIGSTOP)
            c.mpi = Frozen()
        c.allreduce(np.ones(4))
    """, 3, env={"MPIFC_DEBUG_TIMEOUT": "2"})
    assert p.returncode != 0
    assert "no allreduce (collective #2) finished within 2 s" in p.stderr
    assert "slow rank(s) 1:" in p.stderr


def test_slow_ranks_verdict():
    at = "train.py:10 in step"
    # a rank that did not answer
    assert slow_ranks(3, {0: (5, True, at), 2: (5, True, at)})[0] == [1]
    # a rank behind the others
    assert slow_ranks(3, {0: (5, True, at), 1: (4, False, at), 2: (5, True, at)})[0] == [1]
    # a rank computing while the others wait in communication
    slow, why = slow_ranks(3, {0: (5, True, at), 1: (5, False, at), 2: (5, True, at)})
    assert slow == [1] and "rank 1 is outside communication at train.py:10" in why[0]
    # everybody in communication (a mismatch), or everybody busy: nobody in particular
    assert slow_ranks(2, {0: (5, True, at), 1: (5, True, at)}) == ([], [])
    assert slow_ranks(2, {0: (5, False, at), 1: (5, False, at)}) == ([], [])


def test_off_by_default_and_stops_with_the_job(tmp_path):
    from mpifc.config import load_config
    from mpifc.train import train

    with running(0) as w:
        assert w is None
    cfg = load_config("digits-mlp", [f"data.dir={tmp_path}", "train.epochs=1",
                                      "train.trace=false", "train.watchdog_s=30"])
    last = train(cfg, quiet=True, out=str(tmp_path / "run"))
    assert last["test_acc"] > 0.5
    assert not [t for t in threading.enumerate() if t.name == "mpifc-watchdog"]


@pytest.mark.parametrize("value", ["-1", '"10"', "true"])
def test_watchdog_s_is_validated(value):
    from mpifc.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.watchdog_s must be a number >= 0"):
        load_config("digits-mlp", [f"train.watchdog_s={value}"])
