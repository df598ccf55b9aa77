"""`count_corpus` at 1-4 ranks equals collections.Counter over the same tokenizer, exactly.

Run as ``mpiexec -n N python -m mpi4py -m pytest --with-mpi --only-mpi tests/text``.
"""
import heapq
import os

import numpy as np
import pytest

from mpifc.text.wordcount import TextError, count_corpus, owner
from textcorpus import CASES, reference, write_case


@pytest.fixture
def corpus(mpi_tmp_path, comm):
    def make(case):
        d = str(mpi_tmp_path / case)
        if comm.rank == 0:
            os.makedirs(d, exist_ok=True)
            paths = write_case(d, case)
        else:
            paths = None
        return comm.bcast_obj(paths)           # written before any rank reads
    return make


def whole_table(comm, res):
    """The union of every owner's share; each token must have exactly one owner."""
    parts = comm.allgather_obj(res.counts)
    for r, part in enumerate(parts):
        assert all(owner(t, comm.size) == r for t in part)
    table = {}
    for part in parts:
        table.update(part)
    assert len(table) == sum(map(len, parts))
    return table


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cjk", ["chars", "bigrams"])
@pytest.mark.parametrize("block,spill", [(8 << 20, 10 ** 6), (64, 5)])   # small: many blocks, many shuffles
def test_counts_equal_counter(comm, corpus, case, cjk, block, spill):
    paths = corpus(case)
    res = count_corpus(comm, paths, cjk=cjk, top=7, block_bytes=block, spill_tokens=spill)
    ref = reference(paths, cjk)
    table = whole_table(comm, res)
    assert table == dict(ref)                                   # every count
    assert res.tokens == sum(ref.values()) and res.distinct == len(ref)
    assert res.bytes == sum(os.path.getsize(p) for p in paths) and res.files == len(paths)
    if comm.rank == 0:
        assert res.top == heapq.nsmallest(7, ref.items(), key=lambda kv: (-kv[1], kv[0]))
    else:
        assert res.top is None
    if block == 64 and case != "tiny":
        assert res.shuffles > 1                     # the spill path ran
    print(f"OK, {case} {cjk} at {comm.size} ranks: {res.tokens} tokens, {res.distinct} distinct")


@pytest.mark.mpi(min_size=1)
def test_directory_and_trace(comm, corpus):
    from mpifc.comm import trace

    paths = corpus("empty")
    res = count_corpus(comm, [os.path.dirname(paths[0])], top=3)
    assert res.files == len(paths) and res.tokens == sum(reference(paths).values())
    ops = [e["op"] for e in trace.TRACER.events()]
    assert {"alltoall", "alltoallv", "allreduce", "gather"} <= set(ops)
    assert set(res.collective_seconds) <= {"allreduce", "alltoall", "alltoallv", "allgather",
                                           "gather", "bcast_obj", "allgather_obj"}


@pytest.mark.mpi(min_size=2)
def test_strict_error_on_one_rank_fails_every_rank(comm, mpi_tmp_path):
    # the invalid byte sits in the last rank's share: it alone finds it, all ranks raise
    p = str(mpi_tmp_path / "strict.txt")
    if comm.rank == 0:
        with open(p, "wb") as f:
            f.write(b"ok line\n" * 1000 + b"bad \xff here\n")
    comm.barrier()
    with pytest.raises(TextError) as e:
        count_corpus(comm, [p], strict=True, block_bytes=256)
    assert str(e.value) == f"rank {comm.size - 1}: {p}: invalid UTF-8 at byte 8004 " \
        "(--strict; without it such bytes read as U+FFFD)"
    res = count_corpus(comm, [p])                              # default: replaced, counted
    assert whole_table(comm, res) == {"ok": 1000, "line": 1000, "bad": 1, "here": 1}


@pytest.mark.mpi(min_size=1)
def test_bad_corpus_raises_on_every_rank(comm, mpi_tmp_path):
    empty = str(mpi_tmp_path / "empty.txt")
    if comm.rank == 0:
        open(empty, "wb").close()
    comm.barrier()
    with pytest.raises(TextError, match="no such file"):
        count_corpus(comm, [empty, str(mpi_tmp_path / "missing.txt")])
    with pytest.raises(TextError, match=r"the corpus is empty: 1 file\(s\), 0 bytes"):
        count_corpus(comm, [empty])
    with pytest.raises(TextError, match="--cjk must be one of"):
        count_corpus(comm, [empty], cjk="words")
    # the communicator still works: no rank was left inside a collective
    assert comm.allreduce(np.ones(1))[0] == comm.size
