"""Byte ranges of a corpus per rank: near-equal bytes, no line cut in two.

The files, in the order given, form one byte stream of ``total`` bytes. Rank r of P
is given the nominal range [r * total // P, (r + 1) * total // P) of it, then each
edge is moved to a line boundary: an edge at file offset x (0 < x < size) moves to just
after the first newline at or after x (the file's end if there is none). A file's start
and end are edges already. Ranks r and r + 1 compute their shared edge the same way
without talking to each other, so the pieces cover every byte exactly once and every
line (hence every token, see :mod:`mpifc.text.tokenize`) lies in one piece.

A rank may get nothing (more ranks than lines); a range never holds more than its
nominal bytes plus the tail of one line.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

#: bytes read at a time when looking for the newline that ends an edge's line
_SCAN = 1 << 16


class Piece(NamedTuple):
    """Bytes [start, stop) of ``files[index]``."""
    index: int
    start: int
    stop: int


def nominal_pieces(sizes: list[int], nranks: int, rank: int) -> list[Piece]:
    """Rank ``rank``'s share of the stream before edges move to line boundaries.

    Every file the range touches is listed, edges inside a file unadjusted; a file
    of 0 bytes is never listed (it holds no line)."""
    total = sum(sizes)
    lo, hi = rank * total // nranks, (rank + 1) * total // nranks
    out, base = [], 0
    for i, n in enumerate(sizes):
        s, e = max(lo, base), min(hi, base + n)
        if s < e:
            out.append(Piece(i, s - base, e - base))
        base += n
    return out


def line_edge(f, x: int, size: int) -> int:
    """Where an edge at offset ``x`` of the open binary file ``f`` lands (see module doc)."""
    if x <= 0:
        return 0
    if x >= size:
        return size
    f.seek(x)
    pos = x
    while True:
        buf = f.read(_SCAN)
        if not buf:
            return size
        k = buf.find(b"\n")
        if k >= 0:
            return pos + k + 1
        pos += len(buf)


def read_blocks(f, start: int, stop: int, block: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) blocks of [start, stop) of ``f``, each ending after a newline
    (but the last), about ``block`` bytes each (longer when one line is)."""
    f.seek(start)
    pos, carry, carry_at = start, b"", start
    while pos < stop:
        buf = f.read(min(block, stop - pos))
        if not buf:                      # the file shrank under us: stop where it ends
            break
        pos += len(buf)
        data = carry + buf if carry else buf
        if pos >= stop:
            yield carry_at, data
            return
        k = data.rfind(b"\n")
        if k < 0:                        # one line longer than a block: keep reading
            carry = data
            continue
        yield carry_at, data[:k + 1]
        carry, carry_at = data[k + 1:], carry_at + k + 1
    if carry:
        yield carry_at, carry
