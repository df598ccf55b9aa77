"""A run directory holds one run: what mpifc writes there, who owns it, starting over.

    <out>/.mpifc.lock               the owner while a job runs: {"host", "pid", "started"}
    <out>/metrics.jsonl             rank 0's records
    <out>/checkpoints/ckpt-*.h5     checkpoints (+ best.h5, and .ckpt-*.tmp-* saves in flight)
    <out>/trace/trace.*             per-rank JSON lines, merged Chrome trace, summary

:func:`claim` is what ``mpifc train`` does before anything is written: rank 0 takes
the lock and looks at the directory, every rank gets the same verdict (one bcast),
and a refusal is the same :class:`~mpifc.train.TrainingError` on every rank:

* a new run into a directory that already holds a run's outputs is refused with a
  line naming ``--resume`` (continue it) and ``--overwrite`` (delete its outputs);
* ``--overwrite`` deletes the outputs listed above and nothing else;
* a second job on the same directory is refused, naming the owner. A lock left by a
  dead process of this host is taken over (with a note); one from another host is
  never guessed about: the message says how to remove it.
"""
from __future__ import annotations

import glob
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field

from mpifc.checkpoint.atomic import pid_alive

LOCK_NAME = ".mpifc.lock"
_TRACE_RANK_RE = re.compile(r"^(?P<prefix>.+)\.rank(?P<rank>[0-9]+)\.jsonl$")


def _error(msg: str) -> Exception:
    from mpifc.train import TrainingError   # the trainer's error: every rank raises it

    return TrainingError(msg)


# ---------------------------------------------------------------- what a run wrote
def outputs(out: str) -> list[str]:
    """The files of ``out`` that mpifc train writes (and only those), sorted."""
    ck, tr = os.path.join(out, "checkpoints"), os.path.join(out, "trace")
    found = [os.path.join(out, "metrics.jsonl")]
    found += glob.glob(os.path.join(ck, "ckpt-*.h5")) + [os.path.join(ck, "best.h5")]
    found += glob.glob(os.path.join(ck, "ckpt-*.h5.damaged"))
    found += glob.glob(os.path.join(ck, ".ckpt-*.h5.tmp-*"))
    found += glob.glob(os.path.join(ck, ".best.h5.tmp-*"))
    found += glob.glob(os.path.join(tr, "trace.rank*.jsonl"))
    found += [os.path.join(tr, "trace.chrome.json"), os.path.join(tr, "trace.summary.txt")]
    return sorted(p for p in set(found) if os.path.isfile(p) or os.path.islink(p))


def summary(paths: list[str]) -> str:
    """'metrics.jsonl, 3 checkpoint(s), trace' for a list from :func:`outputs`."""
    names = [os.path.basename(p) for p in paths]
    parts = []
    if "metrics.jsonl" in names:
        parts.append("metrics.jsonl")
    n = sum(1 for s in names if s.startswith("ckpt-"))
    if n:
        parts.append(f"{n} checkpoint(s)")
    if any(s.startswith("trace.") for s in names):
        parts.append("trace")
    return ", ".join(parts) or f"{len(paths)} file(s)"


def clear(out: str) -> list[str]:
    """Delete the run outputs of ``out`` (only :func:`outputs`); empty subfolders go too."""
    gone = outputs(out)
    for p in gone:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
    for sub in ("checkpoints", "trace"):
        try:
            os.rmdir(os.path.join(out, sub))      # only when empty: a user's file stays
        except OSError:
            pass
    return gone


def remove_stale_traces(trace_dir: str, size: int, prefix: str = "trace") -> list[str]:
    """Delete ``<prefix>.rank<r>.jsonl`` for r >= ``size``: files of an earlier, larger job.

    Call on one rank before writing a trace of ``size`` ranks; those files are never
    written by this job, so there is no race with the writers.
    """
    gone = []
    for p in glob.glob(os.path.join(trace_dir, f"{prefix}.rank*.jsonl")):
        m = _TRACE_RANK_RE.match(os.path.basename(p))
        if m and m["prefix"] == prefix and int(m["rank"]) >= size:
            os.remove(p)
            gone.append(p)
    return gone


# ---------------------------------------------------------------- the lock
def _read_lock(path: str) -> dict:
    try:
        with open(path) as f:
            got = json.load(f)
        return got if isinstance(got, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire_lock(out: str) -> tuple[str, str | None]:
    """Create ``<out>/.mpifc.lock`` with O_EXCL; returns (lock path, note or None).

    Raises TrainingError (this process only) when another live job holds it.
    """
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    note = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(path)
            host, pid = owner.get("host"), owner.get("pid")
            if not isinstance(pid, int) or not host:
                raise _error(f"run directory {out} is locked by {path}, which names no owner; "
                             f"if no job is using the directory, delete {path}") from None
            if host != me["host"]:
                raise _error(f"run directory {out} is in use by pid {pid} on host {host} "
                             f"(since {owner.get('started', '?')}); if that job is gone, "
                             f"delete {path}") from None
            if pid_alive(pid):
                raise _error(f"run directory {out} is in use by pid {pid} on this host "
                             f"({host}, since {owner.get('started', '?')}); wait for it, or "
                             "use another --out") from None
            note = (f"note: took over the lock of {out} left by pid {pid} on {host}, "
                    "which is no longer running")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.write("\n")
        return path, note
    raise _error(f"run directory {out}: could not take the lock {path}; another job keeps "
                 "taking it")


def release_lock(path: str) -> None:
    """Delete the lock if this process still owns it."""
    owner = _read_lock(path)
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------- claiming a run directory
@dataclass
class Claim:
    """A run directory owned by this job until :meth:`release` (every rank holds one)."""

    out: str
    lock: str | None = None          # the lock path, on rank 0 only
    notes: list = field(default_factory=list)

    def release(self) -> None:
        if self.lock:
            release_lock(self.lock)
            self.lock = None


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory + os.sep)


def _look(out: str, resume, overwrite: bool) -> tuple[str | None, list[str]]:
    """Rank 0's verdict on ``out``: (error or None, notes). Runs with the lock held."""
    have = outputs(out)
    notes = []
    resume_from = resume if isinstance(resume, str) else None
    if overwrite and resume and (resume_from is None or _inside(resume_from, out)):
        return (f"--overwrite would delete the checkpoint --resume continues from in {out}; "
                "give one of them"), notes
    if overwrite:
        if have:
            clear(out)
            notes.append(f"--overwrite: deleted the previous run's outputs in {out} "
                         f"({summary(have)})")
        return None, notes
    if not have:
        return None, notes
    if not resume:
        return (f"run directory {out} already holds a run ({summary(have)}); continue it with "
                "--resume, or delete its outputs and start over with --overwrite"), notes
    if resume_from is not None and not _inside(resume_from, out):
        return (f"--resume {resume_from} into {out}, which holds another run ({summary(have)}): "
                "give an empty --out, or --overwrite to delete that run first"), notes
    if resume_from is None and not any(os.path.basename(p).startswith("ckpt-")
                                       and p.endswith(".h5") for p in have):
        return (f"run directory {out} holds a run ({summary(have)}) but no checkpoint to "
                "--resume from; start over with --overwrite"), notes
    return None, notes


def claim(comm, out: str, *, resume=None, overwrite: bool = False) -> Claim:
    """Take ``out`` for this job on every rank of ``comm`` (collective: one bcast).

    Parameters
    ----------
    out : run directory
    resume : True (continue this directory's run), a checkpoint path, or None (a new run)
    overwrite : delete this directory's run outputs first

    Raises TrainingError with the same message on every rank when the directory is
    in use by another job, or holds a run that this one would mix with.
    """
    verdict = None
    lock = None
    if comm.rank == 0:
        try:
            lock, note = acquire_lock(out)
            err, notes = _look(out, resume, overwrite)
            verdict = (err, ([note] if note else []) + notes)
        except Exception as exc:  # noqa: BLE001 - shared below so no rank waits
            verdict = (str(exc) if type(exc).__name__ == "TrainingError"
                       else f"run directory {out}: {type(exc).__name__}: {exc}", [])
        if verdict[0] is not None and lock is not None:
            release_lock(lock)
            lock = None
    err, notes = comm.bcast_obj(verdict, root=0)
    if err is not None:
        raise _error(err)
    return Claim(out, lock, notes)


# ---------------------------------------------------------------- paths stored by older runs
def stored_data_paths(cfg: dict, checkpoint: str) -> dict:
    """``cfg`` (a checkpoint's config) with relative data paths made absolute.

    Runs since this version store absolute paths. Older checkpoints hold them as
    given (``runs/data``), relative to the directory the run was started in; that
    directory is recovered from the checkpoint's place when the run used a relative
    ``train.out`` (``<start>/runs/<name>/checkpoints/ckpt-*.h5``); else the cwd.
    """
    d = cfg["data"]
    path_like = d["dataset"].endswith((".h5", ".hdf5")) or os.sep in d["dataset"]
    if os.path.isabs(d["dir"]) and (not path_like or os.path.isabs(d["dataset"])):
        return cfg
    out = os.path.normpath(cfg["train"]["out"].format(name=cfg["name"]))
    run = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    base = os.getcwd()
    if not os.path.isabs(out) and run.endswith(os.sep + out):
        base = run[:-len(out) - 1] or os.sep
    fixed = {"dir": os.path.join(base, d["dir"])}
    if path_like:
        fixed["dataset"] = os.path.join(base, d["dataset"])
    return {**cfg, "data": {**d, **fixed}}
