"""Nothing hangs: how a rank that fails or exits ends the job.

Without this, one rank dying leaves the others blocked in their next collective
forever. ``install_abort_handler()`` (the ``mpifc`` entry point calls it first) and
``exit_code(exc)`` (the entry point's ``except``) apply one policy:

* A ``UserError`` (mpifc.errors) raised by every rank (``all_ranks``): each rank
  waits at most ``MPIFC_AGREE_TIMEOUT`` s (10) for its peers to fail too (an
  ``Ibarrier`` on a private communicator); when they all do, rank 0 prints the
  message, one line, and every rank exits with status 1 -- no ``MPI_Abort``. When
  a peer does not fail in that time the claim was wrong: this rank prints its line
  and aborts the job.
* A ``UserError`` raised by one rank: that rank prints ``mpifc: rank R of P: ...``
  and calls ``MPI_Abort``, so ``mpiexec`` kills every rank and exits non-zero.
* ``SystemExit`` with a non-zero status: agreed like an all-ranks error (printed
  once, every rank exits with that status), or the job is aborted with that status.
  While a job is in progress (``job_in_progress()``, entered by the trainer) any
  ``SystemExit`` on one rank, status 0 included, aborts the job at once: a job in
  lockstep cannot end on one rank's word, and a rank leaving with 0 must not let
  ``mpiexec`` report success.
* Anything else is a bug: its traceback, prefixed with the rank, and ``MPI_Abort``.

``MPIFC_DEBUG=1`` prints the traceback of a ``UserError`` too. A rank that leaves
a job in progress any other way (``sys.exit`` in a script, the end of the script)
is caught at interpreter exit and aborts the job. ``os._exit`` and signals are
beyond any handler: the launcher sees the process end.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
import traceback

from mpi4py import MPI

from mpifc.errors import UserError

#: seconds between printing the failure and MPI_Abort (output forwarding)
ABORT_GRACE_S = 0.3


class _State:
    in_progress = 0              # depth of job_in_progress() on this rank
    exit_status = None           # the SystemExit that left a job in progress, if any
    agree_comm = None            # private duplicate of COMM_WORLD for the agreement
    atexit_registered = False


_STATE = _State()


def _world():
    c = MPI.COMM_WORLD
    return c.Get_rank(), c.Get_size()


def _debug() -> bool:
    return os.environ.get("MPIFC_DEBUG", "0") == "1"


def agree_timeout() -> float:
    return float(os.environ.get("MPIFC_AGREE_TIMEOUT", "10"))


def _write(text: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def _traceback_lines(exc) -> str:
    rank = _world()[0]
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return "".join(f"[rank {rank}] {line}" for chunk in lines for line in chunk.splitlines(True))


def abort(code: int = 1) -> None:
    """End every rank of the job now with exit status ``code`` (MPI_Abort)."""
    # MPI_Abort tears the job down at once; output still in the launcher's pipes can be
    # lost with it (MPICH's hydra dropped both ranks' messages in about 1 run of 6 when
    # two ranks failed together). Give the launcher a moment to forward the message.
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    MPI.COMM_WORLD.Abort(code)


def _abort_with(msg: str, code: int) -> None:
    rank, size = _world()
    _write(f"mpifc: rank {rank} of {size}: {msg}; aborting the job")
    abort(code)


def _agree(message: str):
    """Wait (bounded) until every rank of the job has failed too.

    Returns the list of every rank's message on rank 0 ([] elsewhere) when they all
    did, None when some rank did not arrive within ``agree_timeout()``."""
    comm = _STATE.agree_comm
    if comm is None:           # the handler was not installed on every rank: no agreement
        return None
    req = comm.Ibarrier()
    deadline = time.monotonic() + agree_timeout()
    while not req.Test():
        if time.monotonic() > deadline:
            return None
        time.sleep(1e-3)
    # every rank is here: the gather cannot hang
    return comm.gather(message, root=0) or []


def _print_agreed(messages: list, fmt) -> None:
    """Rank 0: each distinct message once (with its ranks when they differ)."""
    size = len(messages)
    distinct = list(dict.fromkeys(messages))
    for m in distinct:
        if m is None:
            continue
        if len(distinct) == 1:
            _write(fmt(m))
        else:
            ranks = ",".join(str(r) for r, x in enumerate(messages) if x == m)
            _write(fmt(f"rank(s) {ranks} of {size}: {m}"))


def _exit_status(exc: SystemExit) -> tuple[int, str | None]:
    """(status, message) of a SystemExit, as Python's own exit would see them."""
    code = exc.code
    if code is None:
        return 0, None
    if isinstance(code, int):
        return code, None
    return 1, str(code)


def exit_code(exc: BaseException) -> int:
    """The exit status for ``exc`` on this rank, after printing what it needs.

    Aborts the job (does not return) when the ranks do not fail together; re-raises
    what is neither a UserError nor a SystemExit (a bug: the traceback hook shows it).
    """
    rank, size = _world()
    if isinstance(exc, UserError):
        if _debug():
            _write(_traceback_lines(exc))
        msg = str(exc) or type(exc).__name__
        if size == 1:
            _write(f"mpifc: {msg}")
            return 1
        if not exc.all_ranks:
            _abort_with(msg, 1)
        got = _agree(msg)
        if got is None:
            _abort_with(f"{msg} (not every rank failed within {agree_timeout():g} s)", 1)
        if rank == 0:
            _print_agreed(got, lambda m: f"mpifc: {m}")
        return 1
    if isinstance(exc, SystemExit):
        status, msg = _exit_status(exc)
        if _STATE.in_progress and size > 1:
            _abort_with(f"exited with status {status} while the job was in progress"
                        + (f" ({msg})" if msg else ""), status or 1)
        _STATE.in_progress = 0
        if status == 0 or size == 1:
            raise exc                       # Python prints a message and exits as usual
        got = _agree(msg)
        if got is None:
            _abort_with(msg or f"exited with status {status}", status)
        if rank == 0:
            _print_agreed(got, lambda m: m)
        return status
    raise exc


def _hook(exc_type, exc, tb):
    rank, size = _world()
    if exc_type is KeyboardInterrupt and size == 1:
        sys.__excepthook__(exc_type, exc, tb)
        return
    if isinstance(exc, UserError):
        exit_code(exc)                      # returns only when every rank failed with it
        return
    _write(_traceback_lines(exc))
    _write(f"mpifc: rank {rank} of {size} failed with {exc_type.__name__}: {exc}; "
           "aborting the job")
    abort(1)


def _at_exit() -> None:
    """A rank leaving a job in progress (sys.exit, end of script) aborts the job."""
    if _STATE.in_progress and _world()[1] > 1:
        status = _STATE.exit_status
        _abort_with(f"exited with status {status or 0} while the job was in progress",
                    status or 1)


def _register_atexit() -> None:
    # mpi4py finalises MPI in a C-level exit hook, after the Python atexit functions
    if not _STATE.atexit_registered:
        atexit.register(_at_exit)
        _STATE.atexit_registered = True


def install_abort_handler() -> None:
    """Make an uncaught exception on this rank end the job (see the module docstring).

    Collective over COMM_WORLD the first time (duplicates it for the agreement):
    call it on every rank."""
    if _STATE.agree_comm is None:
        _STATE.agree_comm = MPI.COMM_WORLD.Dup()
    sys.excepthook = _hook
    _register_atexit()


@contextlib.contextmanager
def job_in_progress():
    """Mark a job whose ranks must finish together (the trainer's ``train()``).

    Inside it, a rank that exits (``SystemExit``, any status; the end of the
    interpreter) aborts the whole job with a non-zero status naming the rank,
    instead of leaving its peers waiting or letting the job report success."""
    _register_atexit()
    _STATE.in_progress += 1
    try:
        yield
    except SystemExit as e:         # the mark stays: the handler or the exit hook aborts
        _STATE.exit_status = _exit_status(e)[0]
        raise
    except BaseException:           # an exception is the handler's (or the caller's) to judge
        _STATE.in_progress -= 1
        raise
    _STATE.in_progress -= 1


def in_progress() -> bool:
    return _STATE.in_progress > 0
