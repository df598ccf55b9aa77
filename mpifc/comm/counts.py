"""Balanced shard sizes, the one place uneven splits are decided.

Every sharded tensor, data slice and v-collective in mpifc uses these counts, so
the rank that owns row ``i`` is the same everywhere.
"""
from __future__ import annotations


def balanced_counts(n: int, parts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split ``n`` items into ``parts`` contiguous blocks that differ by at most one.

    The first ``n % parts`` blocks get the extra item. A block may be empty
    (n < parts): its rank still takes part in every collective.

    Returns
    -------
    counts, displs : tuple of int, length ``parts``
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    q, r = divmod(int(n), int(parts))
    counts = tuple(q + (1 if i < r else 0) for i in range(parts))
    displs, acc = [], 0
    for c in counts:
        displs.append(acc)
        acc += c
    return counts, tuple(displs)


def displacements(counts) -> tuple[int, ...]:
    """Exclusive prefix sum of ``counts``."""
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += int(c)
    return tuple(out)
