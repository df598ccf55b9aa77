"""Run a blocked kernel's samples on every core this rank owns (host arrays only).

A rank given n BLAS threads (mpifc.threads: the cores it owns) runs a GEMM on n
cores, but a NumPy element-wise pass on one. The blocked kernels (conv, BatchNorm)
split their samples into n contiguous shares and run each share on its own thread,
BLAS limited to one thread meanwhile: the GEMMs of a share are small (one block of
images), and ufuncs and matmul release the GIL, so the shares run side by side.
With one BLAS thread (ranks that share a node) nothing changes: the caller's thread
runs everything.

``ENABLED = False`` turns the splitting off (bench/layers.py compares both).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

ENABLED = True
# a share below this many bytes of input is not worth a thread hand-off (about 70-100
# us on the 2-core test machine, GIL and wake-up): the convolution, whose GEMMs do
# much work per input byte (split from 512 KiB of x: 1.78 -> 1.10 ms forward) ...
MIN_SHARE_BYTES = 1 << 18
# ... and the passes that do a few operations per byte (BatchNorm, ReLU, max-pool, the
# SGD update): two shares of a 512 KiB BatchNorm input took 374 us against 237 for one,
# of a 512 KiB ReLU input 112 against 39; from 2 MiB on two shares are as fast or faster
PASS_MIN_SHARE_BYTES = 1 << 20
# bytes of input per call of an element-wise pass (:func:`for_each_block`): small
# enough that a block's passes meet in L2, large enough that the wait for the GIL
# between two threads' calls (tens of microseconds on a VM) stays small beside one
# call; at 128-256 KiB per call two threads ran no faster than one here
BLOCK_BYTES = 1 << 20

# outer: the rank's BLAS threads while a run() holds them at one (None outside)
_state = {"blas": None, "pool": None, "size": 0, "outer": None}


def _blas_controllers():
    if _state["blas"] is None:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - once

        _state["blas"] = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
    return _state["blas"]


def forget_blas() -> None:
    """Find the BLAS libraries again at the next use (one was loaded since: oneMKL)."""
    _state["blas"] = None


def joined(n: int) -> None:
    """After loading a library that may bring a BLAS of its own: give every BLAS now
    loaded the rank's ``n`` threads (:func:`rank_width` from before the load), or one
    until the :func:`run` in progress ends and gives them ``n``.

    A BLAS loaded late starts with every core, not the rank's limit: importing Numba
    loads SciPy's OpenBLAS (for its linear algebra), and in a rank limited to one
    thread that BLAS made :func:`width` 2, so the rank split its convolutions over
    two threads on a core it shares with the next rank.
    """
    forget_blas()
    now = 1 if _state["outer"] is not None else n
    for c in _blas_controllers():
        if c.get_num_threads() != now:
            c.set_num_threads(now)


def rank_width() -> int:
    """The rank's BLAS threads, also from inside a :func:`run` share (where BLAS has
    one thread): what a library loaded there must be given."""
    outer = _state["outer"]
    return width() if outer is None else outer


def width() -> int:
    """Threads the BLAS pool has now (the cores this rank was given); 1 when none is loaded."""
    return max((c.get_num_threads() for c in _blas_controllers()), default=1)


def shares(n_items: int, item_bytes: int, xp, min_share_bytes: int | None = None) -> list[tuple[int, int]]:
    """Contiguous (i0, i1) shares of ``n_items``: one per thread of :func:`width`, or one
    (each share at least ``min_share_bytes``, default :data:`MIN_SHARE_BYTES`)."""
    w = width() if ENABLED and xp is np else 1
    least = MIN_SHARE_BYTES if min_share_bytes is None else min_share_bytes
    w = max(1, min(w, n_items, (n_items * item_bytes) // max(least, 1)))
    cuts = [n_items * i // w for i in range(w + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def for_each_block(fn, n_items: int, item_bytes: int, xp) -> None:
    """``fn(i0, i1)`` over blocks of about :data:`BLOCK_BYTES` of ``n_items`` samples,
    the blocks of each of :func:`shares` on its own thread; one block on a GPU.

    For element-wise passes that write disjoint rows of their outputs: a block's
    passes run back to back while its rows are in cache.
    """
    if xp is not np:
        fn(0, n_items)
        return
    per = max(1, BLOCK_BYTES // max(int(item_bytes), 1))

    def share(s0, s1):
        for i in range(s0, s1, per):
            fn(i, min(i + per, s1))
    run(share, shares(n_items, item_bytes, xp, PASS_MIN_SHARE_BYTES))


def _one_thread(libs, fn, i0, i1):
    """``fn(i0, i1)`` on a pool thread, its BLAS at one thread. oneMKL's count is per
    thread (GNU OpenMP): set on the caller's thread only, a share's oneMKL GEMM here ran
    on every core, beside the other share's."""
    for c in libs:
        if c.get_num_threads() != 1:
            c.set_num_threads(1)
    return fn(i0, i1)


def run(fn, parts: list[tuple[int, int]]) -> list:
    """``[fn(i0, i1) for (i0, i1) in parts]``, the parts on separate threads when several.

    The calling thread runs the first part; BLAS runs one thread per part meanwhile.
    """
    if len(parts) == 1:
        return [fn(*parts[0])]
    libs = _blas_controllers()
    before = [c.get_num_threads() for c in libs]
    if _state["size"] < len(parts) - 1:
        if _state["pool"] is not None:
            _state["pool"].shutdown()
        _state["pool"] = ThreadPoolExecutor(len(parts) - 1, thread_name_prefix="mpifc-block")
        _state["size"] = len(parts) - 1
    for c in libs:
        c.set_num_threads(1)
    _state["outer"] = max(before, default=1)
    try:
        futures = [_state["pool"].submit(_one_thread, libs, fn, *p) for p in parts[1:]]
        first = fn(*parts[0])
        return [first] + [f.result() for f in futures]
    finally:
        outer, _state["outer"] = _state["outer"], None
        if _state["blas"] is libs:
            for c, n in zip(libs, before):
                c.set_num_threads(n)
        else:               # a library joined during the run (joined()): all get the rank's
            for c in _blas_controllers():
                c.set_num_threads(outer)
