"""Halo exchange along one axis and its adjoint, the halo add.

Ranks of a group own consecutive blocks of an axis (image height for spatial
parallelism). Before a convolution each rank needs a few rows of its neighbours:

    halo_exchange:  [lo rows of rank r-1] + my rows + [hi rows of rank r+1]
    halo_add:       the adjoint; gradients of the borrowed rows are sent back and
                    added to the rows of their owners

Halo sizes may differ per rank (strided convolutions over uneven blocks): ``lo[r]``
is what rank r receives from r-1, so rank r-1 sends its last ``lo[r]`` rows. The
first rank's ``lo`` and the last rank's ``hi`` face the image border and are
filled with zeros (padding is the caller's choice, see the spatial conv).
Each direction is one ``sendrecv``, so a halo exchange is two calls per rank.
"""
from __future__ import annotations

from mpifc.backend import get_array_module


def _per_rank(v, size):
    if isinstance(v, int):
        return [v] * size
    v = list(v)
    if len(v) != size:
        raise ValueError(f"halo sizes: {len(v)} entries for {size} ranks")
    return v


def _take(x, axis, start, stop):
    sl = [slice(None)] * x.ndim
    sl[axis] = slice(start, stop)
    return get_array_module(x).ascontiguousarray(x[tuple(sl)])


def _neighbours(comm):
    r, P = comm.rank, comm.size
    return (r - 1 if r > 0 else None), (r + 1 if r + 1 < P else None)


def halo_exchange(comm, x, lo, hi, axis: int = 0):
    """Return ``x`` extended along ``axis`` by ``lo[r]`` rows from above and ``hi[r]`` from below.

    Parameters
    ----------
    comm : Communicator     the group that splits ``axis``
    x : array               this rank's block; ``x.shape[axis]`` rows
    lo, hi : int or list    halo rows received from the previous / next rank
    """
    xp = get_array_module(x)
    lo, hi = _per_rank(lo, comm.size), _per_rank(hi, comm.size)
    r, P = comm.rank, comm.size
    up, down = _neighbours(comm)
    n = x.shape[axis]
    send_down = hi_next = lo[r + 1] if down is not None else 0   # rows the next rank wants
    send_up = hi[r - 1] if up is not None else 0                 # rows the previous rank wants
    if send_down > n or send_up > n:
        raise ValueError(f"halo exchange on {comm.name}: rank {r} owns {n} rows along axis {axis} "
                         f"but a neighbour needs {max(send_down, send_up)}; use fewer ranks "
                         "or a larger image")
    my_lo = lo[r] if up is not None else 0
    my_hi = hi[r] if down is not None else 0
    shape = list(x.shape)
    shape[axis] = lo[r] + n + hi[r]
    out = xp.zeros(shape, dtype=x.dtype)
    sl = [slice(None)] * x.ndim
    sl[axis] = slice(lo[r], lo[r] + n)
    out[tuple(sl)] = x
    tail = list(x.shape)
    # downward: my last rows go to the next rank's top halo
    tail[axis] = my_lo
    top = xp.zeros(tail, dtype=x.dtype)
    comm.sendrecv(_take(x, axis, n - hi_next, n) if down is not None else None, down,
                  top if up is not None else None, up)
    # upward: my first rows go to the previous rank's bottom halo
    tail[axis] = my_hi
    bot = xp.zeros(tail, dtype=x.dtype)
    comm.sendrecv(_take(x, axis, 0, send_up) if up is not None else None, up,
                  bot if down is not None else None, down)
    if my_lo:
        sl[axis] = slice(lo[r] - my_lo, lo[r])
        out[tuple(sl)] = top
    if my_hi:
        sl[axis] = slice(lo[r] + n, lo[r] + n + my_hi)
        out[tuple(sl)] = bot
    return out


def halo_add(comm, g, lo, hi, axis: int = 0):
    """Adjoint of ``halo_exchange``: fold halo gradients back onto their owners.

    ``g`` has ``lo[r] + n + hi[r]`` rows along ``axis``; returns the ``n``-row gradient
    of this rank's block."""
    xp = get_array_module(g)
    lo, hi = _per_rank(lo, comm.size), _per_rank(hi, comm.size)
    r = comm.rank
    up, down = _neighbours(comm)
    n = g.shape[axis] - lo[r] - hi[r]
    dx = _take(g, axis, lo[r], lo[r] + n).copy()
    recv_from_down = lo[r + 1] if down is not None else 0
    recv_from_up = hi[r - 1] if up is not None else 0
    tail = list(g.shape)
    # my top halo's gradient goes back up to the previous rank (it owns those rows)
    tail[axis] = recv_from_down
    from_below = xp.zeros(tail, dtype=g.dtype)
    comm.sendrecv(_take(g, axis, 0, lo[r]) if up is not None else None, up,
                  from_below if down is not None else None, down)
    tail[axis] = recv_from_up
    from_above = xp.zeros(tail, dtype=g.dtype)
    comm.sendrecv(_take(g, axis, lo[r] + n, lo[r] + n + hi[r]) if down is not None else None, down,
                  from_above if up is not None else None, up)
    sl = [slice(None)] * g.ndim
    if recv_from_down:
        sl[axis] = slice(n - recv_from_down, n)
        dx[tuple(sl)] += from_below
    if recv_from_up:
        sl[axis] = slice(0, recv_from_up)
        dx[tuple(sl)] += from_above
    return dx
