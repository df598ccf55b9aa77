"""Atomic publication of a checkpoint file and pruning of old ones.

A checkpoint becomes visible under its final name only once it is complete:

1. the writer fills ``.<name>.tmp-<pid>@<host>`` in the SAME directory (so the
   rename below never crosses file systems);
2. HDF5 flushes and closes it, then ``fsync`` puts its bytes on disk;
3. ``os.replace`` renames it to ``<name>`` (atomic on POSIX: readers see the old
   file or the new one, never a mix);
4. ``fsync`` of the directory makes the rename itself durable.

A save killed before step 3 leaves only a temporary file, which listing ignores.
Pruning deletes it only when it is provably stale: written by a process of THIS
host that is no longer running. A temporary of a live process (another job that
writes the same directory) or of another host is never touched.
"""
from __future__ import annotations

import os
import shutil
import socket

from mpifc.checkpoint.format import list_checkpoints, stale_temporaries, temporary_owner


def temporary_path(final: str) -> str:
    """``<dir>/.<name>.tmp-<pid>@<host>`` next to ``final``."""
    d, name = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}@{socket.gethostname()}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(tmp: str) -> bool:
    """Whether temporary ``tmp`` was left by a dead process of this host."""
    pid, host = temporary_owner(tmp)
    if pid is None or (host is not None and host != socket.gethostname()):
        return False
    return pid != os.getpid() and not pid_alive(pid)


def fsync_path(path: str) -> None:
    """fsync a file or directory by path (no-op where directories cannot be opened)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if os.path.isdir(path):      # e.g. Windows: no directory handles
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, final: str) -> None:
    """fsync ``tmp``, rename it to ``final`` atomically, fsync the directory."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


def publish_link(src: str, dst: str) -> None:
    """Make ``dst`` (e.g. ``best.h5``) the same file as checkpoint ``src``, atomically.

    A hard link (no extra space; it outlives the pruning of ``src``), or a copy where
    the file system has no hard links. Readers see the old ``dst`` or the new one.
    """
    tmp = temporary_path(dst)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    publish(tmp, dst)


def prune(directory: str, keep_last: int | None, keep: str | None = None) -> list[str]:
    """Delete all but the ``keep_last`` highest-step checkpoints and stale temporaries.

    ``keep`` (the file just written) is never deleted, nor is any file not named
    ``ckpt-NNNNNN.h5`` (``best.h5``), nor a temporary that is not provably stale
    (:func:`is_stale`). ``keep_last`` None or 0 keeps every checkpoint. Returns the
    removed paths.
    """
    removed = [tmp for tmp in stale_temporaries(directory) if is_stale(tmp)]
    if keep_last:
        found = [p for _, p in list_checkpoints(directory)]
        removed += [p for p in found[:-int(keep_last)]
                    if keep is None or os.path.abspath(p) != os.path.abspath(keep)]
    for p in removed:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
    if removed:
        fsync_path(directory)
    return removed
