"""Watchdog: a rank that stops making progress ends the job, naming the slow rank(s).

A frozen rank (SIGSTOP, a deadlock outside MPI, a read from a dead file system)
leaves its peers blocked in their next collective forever. With ``train.watchdog_s``
(or ``--watchdog SECONDS``) each rank runs a daemon thread; the trainer calls
``beat(step)`` after every step (two attribute writes, no communication). When a
rank sees no beat for ``timeout_s``:

1. it sends its status (last step, whether its main thread is inside an
   mpifc.comm call, where it is) to every other rank, on a private duplicate of the
   communicator with non-blocking point-to-point calls, and waits at most
   ``answer_s`` for theirs (each watchdog thread polls for such messages and
   answers them, so a live peer answers within a poll interval);
2. the slow ranks are those that did not answer (stopped, or holding the GIL), those
   at a lower step than the others, and those computing outside communication while
   the others wait inside it;
3. the lowest rank that is not slow prints one line naming them and calls
   ``MPI_Abort``; the others abort a little later if it could not.

The same machinery times each collective in debug mode (``MPIFC_DEBUG=1``): a
collective that does not complete within ``MPIFC_DEBUG_TIMEOUT`` seconds is reported
with the ranks that are not inside it (``Watchdog.arm`` / ``disarm``).

Needs ``MPI_THREAD_MULTIPLE`` (mpi4py asks for it; MPICH and Open MPI provide it):
the watchdog thread communicates while the main thread is blocked in a collective.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import weakref

import numpy as np
from mpi4py import MPI

from mpifc.errors import UserError

_TAG = 0x57D0             # private communicator: any tag would do
_STATUS_BYTES = 256       # step (int64), in communication (int64), location (utf-8)
_COMM_FILE = os.path.join("mpifc", "comm", "communicator.py")
_monotonic = time.monotonic


def _main_thread_status() -> tuple[bool, str]:
    """(inside an mpifc.comm call, innermost 'file:line in function') of the main thread."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    where, in_comm = "?", False
    f = frame
    while f is not None:
        if f.f_code.co_filename.endswith(_COMM_FILE):
            in_comm = True
        f = f.f_back
    if frame is not None:
        where = (f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} "
                 f"in {frame.f_code.co_name}")
    return in_comm, where


def _pack(step: int, in_comm: bool, where: str) -> np.ndarray:
    buf = np.zeros(_STATUS_BYTES, dtype=np.uint8)
    buf[:16] = np.frombuffer(np.array([step, int(in_comm)], dtype=np.int64).tobytes(), np.uint8)
    text = where.encode("utf-8", "replace")[:_STATUS_BYTES - 16]
    buf[16:16 + len(text)] = np.frombuffer(text, np.uint8)
    return buf


def _unpack(buf: np.ndarray) -> tuple[int, bool, str]:
    step, in_comm = np.frombuffer(buf[:16].tobytes(), dtype=np.int64)
    where = buf[16:].tobytes().rstrip(b"\0").decode("utf-8", "replace")
    return int(step), bool(in_comm), where


def slow_ranks(size: int, answers: dict) -> tuple[list[int], list[str]]:
    """Who is behind, from ``answers`` {rank: (step, in_comm, where)}; (ranks, reasons)."""
    missing = [r for r in range(size) if r not in answers]
    reasons = []
    if missing:
        reasons.append(f"rank(s) {_ranks(missing)} did not answer (stopped, or holding the GIL)")
    steps = {r: a[0] for r, a in answers.items()}
    behind = []
    if steps and len(set(steps.values())) > 1:
        top = max(steps.values())
        behind = sorted(r for r, s in steps.items() if s < top)
        for r in behind:
            reasons.append(f"rank {r} at step {steps[r]} ({answers[r][2]}), the others at {top}")
    outside = sorted(r for r, a in answers.items() if not a[1] and r not in behind)
    if outside and len(outside) < len(answers):         # some wait in communication
        for r in outside:
            reasons.append(f"rank {r} is outside communication at {answers[r][2]}")
    else:
        outside = []
    return sorted(set(missing) | set(behind) | set(outside)), reasons


def _ranks(rs) -> str:
    return ",".join(map(str, rs))


def threads_supported() -> bool:
    """True when a second thread may call MPI while the main thread is inside MPI."""
    return MPI.Query_thread() >= MPI.THREAD_MULTIPLE


class Watchdog:
    """One rank's watchdog over ``comm`` (an mpi4py communicator; duplicated here).

    Collective over ``comm`` at construction. ``beat(step)`` after each unit of
    progress; ``stop()`` (or leaving the ``with``) ends the thread. ``armed=False``
    times only between ``arm(what)`` and ``disarm()`` (debug mode's collectives).
    """

    def __init__(self, timeout_s: float, comm=None, *, what: str = "step",
                 answer_s: float | None = None, armed: bool = True, name: str = "world"):
        if not timeout_s > 0:
            raise ValueError(f"watchdog timeout must be > 0 seconds, got {timeout_s}")
        if not threads_supported():
            raise UserError("the watchdog (train.watchdog_s) needs MPI_THREAD_MULTIPLE; this "
                            f"MPI provides thread level {MPI.Query_thread()} "
                            f"(MULTIPLE = {MPI.THREAD_MULTIPLE})", all_ranks=True)
        self.timeout_s = float(timeout_s)
        self.answer_s = (float(answer_s) if answer_s is not None
                         else min(max(2.0, self.timeout_s / 2), 30.0))
        self.comm = (comm or MPI.COMM_WORLD).Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.name, self.what = name, what
        self.step = 0
        self._last = _monotonic()
        self._armed = armed
        self._stop = threading.Event()
        self._answers: dict = {}          # peer rank -> (step, in_comm, where)
        self._sent: set = set()
        self._sends: list = []            # (request, buffer): alive until sent
        self._poll_s = min(1.0, self.timeout_s / 10)
        self._thread = threading.Thread(target=self._run, name="mpifc-watchdog", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # --- called from the main thread: cheap ---
    def beat(self, step: int) -> None:
        """Progress: ``step`` finished now."""
        self.step = step
        self._last = _monotonic()

    def arm(self, what: str) -> None:
        self.what = what
        self._last = _monotonic()
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # --- the thread ---
    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self._answer()
            if self._armed and _monotonic() - self._last > self.timeout_s:
                self._fire()
                return

    def _status(self) -> np.ndarray:
        in_comm, where = _main_thread_status()
        return _pack(self.step, in_comm, where)

    def _send(self, dest: int, status: np.ndarray) -> None:
        self._sends.append((self.comm.Isend(status, dest=dest, tag=_TAG), status))
        self._sent.add(dest)

    def _answer(self) -> None:
        """Take the peers' status messages; answer each peer once with ours."""
        st = MPI.Status()
        while self.comm.Iprobe(MPI.ANY_SOURCE, _TAG, st):
            src = st.Get_source()
            buf = np.empty(_STATUS_BYTES, dtype=np.uint8)
            self.comm.Recv(buf, source=src, tag=_TAG)
            self._answers[src] = _unpack(buf)
            if src not in self._sent:
                self._send(src, self._status())

    def _exchange(self) -> dict:
        """Every rank's status that arrives within ``answer_s``, by rank (self included)."""
        mine = self._status()
        for r in range(self.size):
            if r != self.rank and r not in self._sent:
                self._send(r, mine)
        deadline = _monotonic() + self.answer_s
        while len(self._answers) < self.size - 1 and _monotonic() < deadline:
            self._answer()
            time.sleep(0.01)
        return {**self._answers, self.rank: _unpack(mine)}

    def _fire(self) -> None:
        step, what = self.step, self.what
        answers = self._exchange()
        slow, reasons = slow_ranks(self.size, answers)
        if self._stop.is_set():                    # the job moved on / ended meanwhile
            return
        head = (f"mpifc: watchdog: no {what} finished within {self.timeout_s:g} s "
                f"(communicator {self.name!r}, {self.size} ranks)")
        if not reasons:
            inside = all(a[1] for a in answers.values())
            here = f"rank {self.rank} at {answers[self.rank][2]}"
            reasons = [f"every rank is waiting inside communication ({here}; mismatched "
                       "collectives? run with MPIFC_DEBUG=1)" if inside else
                       f"every rank is still busy after {what} {step} ({here}); is the "
                       "timeout shorter than the work?"]
        healthy = [r for r in sorted(answers) if r not in slow]
        reporter = healthy[0] if healthy else self.rank
        if self.rank != reporter:
            # the reporter aborts the job; if it cannot, report from here a little later
            if self._stop.wait(self.answer_s + 2.0):
                return
        msg = (head + (f"; slow rank(s) {_ranks(slow)}: " if slow else "; ") + "; ".join(reasons)
               + f"; aborting the job (reported by rank {self.rank})")
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        from mpifc.comm.abort import abort

        abort(1)


_ACTIVE: Watchdog | None = None
_LIVE: "weakref.WeakSet[Watchdog]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # Python's atexit functions run before mpi4py finalises MPI: no watchdog thread may
    # still be inside an MPI call then (the debug-mode watchdogs live as long as their
    # communicators)
    for w in list(_LIVE):
        w._stop.set()
    for w in list(_LIVE):
        if w._thread is not threading.current_thread():
            w._thread.join(timeout=2.0)


def beat(step: int) -> None:
    """Progress of the running watchdog, if any (the trainer calls it after each step)."""
    w = _ACTIVE
    if w is not None:
        w.step = step
        w._last = _monotonic()


@contextlib.contextmanager
def running(timeout_s: float, comm=None):
    """Run a watchdog (``timeout_s`` > 0; 0 = none) for the body; collective over ``comm``.

    ``comm`` is an mpifc Communicator or an mpi4py communicator (default: the world)."""
    global _ACTIVE
    if not timeout_s:
        yield None
        return
    mpi = getattr(comm, "mpi", comm)
    w = Watchdog(timeout_s, mpi)
    _ACTIVE = w
    try:
        yield w
    finally:
        _ACTIVE = None
        w.stop()
