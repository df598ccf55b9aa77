"""Shared test harness.

Multi-rank tests are marked ``@pytest.mark.mpi(min_size=N)`` and run as
``mpiexec -n N python -m mpi4py -m pytest --with-mpi --only-mpi``. A failed
assertion on one rank must fail every rank: after the setup and call phases of an
MPI test the ranks exchange their verdicts, and a rank that passed while another
failed reports a failure naming the failing ranks. (A rank that hangs is killed by
pytest-timeout, which takes the whole mpiexec job down with it.)
"""
import os

import pytest

# One BLAS thread per rank: ranks share the cores of this machine.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")


def _rank_log(r: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"mpifc-pytest-rank{r}.log")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Under mpiexec, only rank 0 prints pytest's report; rank k writes it to a log file.

    Failures on rank k still fail rank 0 (see the verdict exchange below), whose
    report names the rank and its log. MPIFC_TEST_ALL_OUTPUT=1 keeps every rank's output.
    """
    if not _mpi_testing(config) or os.environ.get("MPIFC_TEST_ALL_OUTPUT"):
        return
    from _pytest.config import create_terminal_writer

    from mpifc.comm import world

    r = world().rank
    tr = config.pluginmanager.getplugin("terminalreporter")
    if r > 0 and tr is not None:
        tr._tw = create_terminal_writer(config, file=open(_rank_log(r), "w"))


def _mpi_testing(config) -> bool:
    return bool(config.getoption("--with-mpi", False) or config.getoption("--only-mpi", False))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when not in ("setup", "call") or item.get_closest_marker("mpi") is None:
        return
    if not _mpi_testing(item.config):
        return
    from mpifc.comm import world

    comm = world()
    if comm.size == 1:
        return
    verdicts = comm.mpi.allgather(bool(report.failed))   # untraced, raw: harness only
    failed = [r for r, f in enumerate(verdicts) if f]
    if failed and not report.failed:
        report.outcome = "failed"
        logs = ", ".join(_rank_log(r) for r in failed if r > 0)
        report.longrepr = (f"failed on rank(s) {failed} of {comm.size} (this rank {comm.rank} passed)"
                           + (f"; their reports: {logs}" if logs else ""))


@pytest.fixture
def comm():
    """The world communicator, with a clean trace."""
    from mpifc.comm import trace, world

    trace.reset()
    trace.enable()
    c = world()
    yield c
    trace.reset()


@pytest.fixture
def dev():
    """The CuPy test double (tests/fakecupy.py) as mpifc's device module, counters at 0."""
    import fakecupy as cp
    from mpifc import backend

    old = backend.set_device_module(cp)
    cp.reset_counts()
    yield cp
    backend.set_device_module(old)


def all_ranks_ok(comm, ok: bool) -> bool:
    """True when ``ok`` holds on every rank (collective: call it on all ranks)."""
    return all(comm.mpi.allgather(bool(ok)))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """``--with-mpi --only-mpi`` runs only the MPI-marked tests.

    pytest-mpi 0.6 ignores --only-mpi when --with-mpi is also given, so the serial
    tests would run again at every rank count; deselect them here instead.
    """
    if not config.getoption("--only-mpi", False):
        return
    keep = [i for i in items if i.get_closest_marker("mpi") is not None]
    dropped = [i for i in items if i.get_closest_marker("mpi") is None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
