"""Byte ranges per rank: every byte read once, no line cut, near-equal shares."""
import io

import pytest

from mpifc.text.split import line_edge, nominal_pieces, read_blocks
from textcorpus import CASES, case_files


def rank_bytes(files, nranks, rank, block):
    """What rank ``rank`` reads, per file: {index: bytes}."""
    sizes = [len(d) for d in files]
    out = {}
    for index, lo, hi in nominal_pieces(sizes, nranks, rank):
        f = io.BytesIO(files[index])
        start, stop = line_edge(f, lo, sizes[index]), line_edge(f, hi, sizes[index])
        blocks = list(read_blocks(f, start, stop, block))
        assert all(b.endswith(b"\n") for _, b in blocks[:-1])          # cut only after a newline
        assert [o for o, _ in blocks] == [start + sum(len(b) for _, b in blocks[:i])
                                          for i in range(len(blocks))]
        out[index] = b"".join(b for _, b in blocks)
        assert start in (0, sizes[index]) or files[index][start - 1:start] == b"\n"  # a line start
        assert stop == sizes[index] or files[index][stop - 1:stop] == b"\n"
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("nranks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("block", [1, 16, 1 << 20])
def test_pieces_cover_every_byte_once(case, nranks, block):
    files = case_files(case)
    got = {i: b"" for i in range(len(files))}
    for r in range(nranks):
        for i, data in rank_bytes(files, nranks, r, block).items():
            got[i] += data                        # rank order is file order
    assert [got[i] for i in range(len(files))] == files


def test_nominal_shares_are_near_equal_and_skip_empty_files():
    sizes = [10, 0, 5, 0, 16]
    shares = [sum(p.stop - p.start for p in nominal_pieces(sizes, 4, r)) for r in range(4)]
    assert shares == [7, 8, 8, 8] and sum(shares) == 31
    assert all(p.index not in (1, 3) for r in range(4) for p in nominal_pieces(sizes, 4, r))
    assert nominal_pieces([3], 4, 0) == [] and nominal_pieces([3], 4, 3) == [(0, 2, 3)]


def test_edge_moves_after_the_next_newline():
    data = b"ab\ncd\n\nef"
    f = io.BytesIO(data)
    assert [line_edge(f, x, len(data)) for x in range(len(data) + 1)] == \
        [0, 3, 3, 6, 6, 6, 7, 9, 9, 9]
