"""Atomic publication of a checkpoint file and pruning of old ones.

A checkpoint becomes visible under its final name only once it is complete:

1. the writer fills ``.<name>.tmp-<pid>`` in the SAME directory (so the rename
   below never crosses file systems);
2. HDF5 flushes and closes it, then ``fsync`` puts its bytes on disk;
3. ``os.replace`` renames it to ``<name>`` (atomic on POSIX: readers see the old
   file or the new one, never a mix);
4. ``fsync`` of the directory makes the rename itself durable.

A save killed before step 3 leaves only a temporary file, which listing ignores
and the next save in that directory removes; the previous checkpoint is untouched.
"""
from __future__ import annotations

import os

from mpifc.checkpoint.format import list_checkpoints, stale_temporaries


def temporary_path(final: str) -> str:
    """``<dir>/.<name>.tmp-<pid>`` next to ``final``."""
    d, name = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}")


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


def prune(directory: str, keep_last: int | None, keep: str | None = None) -> list[str]:
    """Delete all but the ``keep_last`` highest-step checkpoints and stale temporaries.

    ``keep`` (the file just written) is never deleted. ``keep_last`` None or 0 keeps
    every checkpoint. Returns the removed paths.
    """
    removed = []
    for tmp in stale_temporaries(directory):
        if not tmp.endswith(f".tmp-{os.getpid()}"):
            removed.append(tmp)
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
