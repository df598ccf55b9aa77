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


# ---------------------------------------------------------------- expected errors, exits
needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")


def mpifc_job(n, *args, timeout=120, env=None, cwd=None):
    return _run([sys.executable, "-m", "mpifc", *args], n, timeout=timeout, env=env, cwd=cwd)[0]


BAD_LAYER = """
[model]
input = [64]
layers = [{type = "lineer", out = 10}]
"""


@needs_mpiexec
@pytest.mark.parametrize("case", ["layout", "non-finite", "layer"])
def test_error_on_every_rank_is_one_line_printed_once(tmp_path, case):
    # the three: tp=2 on 3 ranks (GridError), a non-finite loss (TrainingError),
    # an unknown layer type (ConfigError). Before: a traceback from each rank and
    # MPI_Abort; now rank 0 prints one line and every rank exits 1.
    (tmp_path / "bad.toml").write_text(BAD_LAYER)
    config, sets, line = {
        "layout": ("digits-mlp", ["parallel.tp=2"],
                   "mpifc: tp=2 does not divide the 3 ranks of the job"),
        "non-finite": ("digits-mlp", ["optim.name=sgd", "optim.lr=1e6", "optim.momentum=0.0"],
                       "mpifc: non-finite loss at step"),
        # checked with the whole config at load: the line names the file
        "layer": (str(tmp_path / "bad.toml"), [],
                  f"mpifc train: {tmp_path / 'bad.toml'}: model.layers[0]: unknown type 'lineer'"),
    }[case]
    args = [a for kv in [*sets, f"data.dir={tmp_path}", "train.trace=false"] for a in ("--set", kv)]
    p = mpifc_job(3, "train", config, "--quiet", "--out", str(tmp_path / "run"), *args,
                  timeout=90)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count(line) == 1, p.stderr
    assert sum(ln.startswith("mpifc") for ln in p.stderr.splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr and "MPI_Abort" not in p.stderr


@needs_mpiexec
def test_debug_mode_shows_the_traceback_of_an_expected_error(tmp_path):
    p = mpifc_job(2, "train", "digits-mlp", "--set", "parallel.tp=3",
                  "--set", f"data.dir={tmp_path}", timeout=60, env={"MPIFC_DEBUG": "1"})
    assert p.returncode == 1 and "Traceback" in p.stderr and "factor_layout" in p.stderr


@needs_mpiexec
def test_agreed_system_exit_message_is_printed_once(tmp_path):
    # `mpifc eval` agrees on a missing checkpoint and raises SystemExit("mpifc eval: ...")
    # on every rank; Python printed it once per rank.
    p = mpifc_job(3, "eval", str(tmp_path / "nothing-here"), timeout=60)
    assert p.returncode == 1
    assert p.stderr.count("mpifc eval:") == 1, p.stderr


@needs_mpiexec
def test_error_on_one_rank_names_it_and_ends_the_job():
    p, dt = run_job("""
        import numpy as np
        from mpifc.comm import world, install_abort_handler
        from mpifc.data import DatasetError
        install_abort_handler()
        c = world()
        if c.rank == 1:
            raise DatasetError("data/x.h5: no such file", all_ranks=False)   # this rank's view
        c.allreduce(np.ones(4))
    """, 3)
    assert p.returncode != 0
    assert p.stderr.count("mpifc: rank 1 of 3: data/x.h5: no such file; aborting the job") == 1
    assert "Traceback" not in p.stderr


@needs_mpiexec
def test_all_ranks_error_raised_by_one_rank_still_ends_the_job():
    # a wrong all_ranks claim must not hang: the rank waits for its peers, then aborts
    p, dt = run_job("""
        import numpy as np
        from mpifc.comm import world, install_abort_handler
        from mpifc.config import ConfigError
        install_abort_handler()
        c = world()
        if c.rank == 2:
            raise ConfigError("train.epochs must be an integer >= 1")
        c.allreduce(np.ones(4))
    """, 3, timeout=60, env={"MPIFC_AGREE_TIMEOUT": "1"})
    assert p.returncode != 0
    assert "mpifc: rank 2 of 3: train.epochs must be an integer >= 1" in p.stderr


# A training job on 3 ranks in which rank 1 leaves at step 2 by FAULT; VIA = "cli" runs
# `mpifc train` (its main()), "script" calls train() from a plain script.
FAULT_JOB = """
    import os, sys
    from mpifc import train as T
    fault, via = os.environ["FAULT"], os.environ["VIA"]
    step = T.Trainer.train_step
    def faulty(self, batch):
        if self.comm.rank == 1 and self.step == 2:
            if fault == "exit0":
                sys.exit(0)
            raise SystemExit(int(fault[4:]))
        return step(self, batch)
    T.Trainer.train_step = faulty
    args = ["--set", "train.epochs=1", "--set", "train.trace=false",
            "--set", "data.dir=" + os.environ["DATA"]]
    if via == "cli":
        from mpifc.cli import main
        sys.exit(main(["train", "digits-mlp", "--quiet", "--out", os.environ["OUT"], *args]))
    from mpifc.config import load_config
    T.train(load_config("digits-mlp", [a for a in args if a != "--set"]), quiet=True,
            out=os.environ["OUT"])
"""


@needs_mpiexec
@pytest.mark.parametrize("via", ["cli", "script"])
def test_system_exit_on_one_rank_mid_training_ends_the_job_with_its_status(tmp_path, via):
    # before: the other ranks waited in their next collective forever
    p, dt = run_job(FAULT_JOB, 3, timeout=60, env={
        "FAULT": "exit3", "VIA": via, "DATA": str(tmp_path), "OUT": str(tmp_path / "run")})
    assert p.returncode == 3, p.stderr
    assert "mpifc: rank 1 of 3: exited with status 3 while the job was in progress" in p.stderr


@needs_mpiexec
@pytest.mark.parametrize("via", ["cli", "script"])
def test_exit_0_on_one_rank_mid_training_fails_the_job(tmp_path, via):
    # before: a hang, or rc 0 (success) when the launcher saw rank 1's status first
    p, dt = run_job(FAULT_JOB, 3, timeout=60, env={
        "FAULT": "exit0", "VIA": via, "DATA": str(tmp_path), "OUT": str(tmp_path / "run")})
    assert p.returncode != 0
    assert "mpifc: rank 1 of 3: exited with status 0 while the job was in progress" in p.stderr
