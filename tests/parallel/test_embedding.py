"""Vocabulary-parallel EmbeddingBag against the serial one, at every job size.

Every rank builds the same (tokens, offsets) from a seed; the serial
:class:`mpifc.nn.EmbeddingBag` (same seed) runs locally as the reference. The
vocabulary is 11 rows, uneven over 2 (6/5), 3 (4/4/3) and 4 (3/3/3/2) ranks; the
bags include empty ones, padding-only ones and tokens from every shard. A step's
trace must be exactly the layer's ``collectives()``: one allreduce in forward,
nothing in backward.
"""
import numpy as np
import pytest

from mpifc import nn
from mpifc.comm import trace
from mpifc.parallel.describe import match_trace
from mpifc.parallel.embedding import VocabParallelEmbeddingBag
from parallel_helpers import block, check

V, D = 11, 5
DTYPES = [np.float64, np.float32]


def _bags(seed=3, n=9):
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 7, n)
    lens[2] = 0                       # an empty bag
    bags = [list(rng.integers(0, V, int(k))) for k in lens]
    bags[4] = [0, 0]                  # padding only
    bags[-1] = bags[-1] + [V - 1, 0]  # the last row of the last shard, and padding at the end
    tokens = np.array([t for b in bags for t in b], dtype=np.int64)
    offsets = np.cumsum([0] + [len(b) for b in bags[:-1]]).astype(np.int64)
    return tokens, offsets


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_vocab_parallel_matches_serial(comm, dtype, mode, padding_idx):
    tokens, offsets = _bags()
    N = len(offsets)
    g = np.random.default_rng(4).standard_normal((N, D)).astype(dtype)
    ref = nn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx, seed=11, dtype=dtype)
    y_ref = ref.forward((tokens, offsets))
    ref.backward(g)
    layer = VocabParallelEmbeddingBag(V, D, comm, mode=mode, padding_idx=padding_idx, seed=11,
                                      dtype=dtype, name="emb1")
    trace.reset()
    y = layer.forward((tokens, offsets))
    assert layer.backward(g) is None
    events = trace.events()
    missing, extra = match_trace(layer.collectives((N,)), events)
    bad = []
    check("y", y, y_ref, dtype, bad)
    check("dE", layer.weight.grad, block(ref.weight.grad, 0, layer.counts, comm.rank), dtype, bad)
    check("E init", layer.weight.data, block(ref.weight.data, 0, layer.counts, comm.rank), dtype, bad)
    sh = layer.weight.sharding
    assert sh.global_shape == (V, D) and sh.axis == 0 and sum(sh.counts) == V
    assert max(sh.counts) - min(sh.counts) <= 1 and sh.counts[comm.rank] == layer.V_r
    assert not bad, bad
    assert not missing and not extra, (missing, extra)
    assert [(e["phase"], e["op"]) for e in events] == [("emb1.forward", "allreduce")]


@pytest.mark.mpi(min_size=1)
def test_empty_batch_joins_the_allreduce(comm):
    """A data-parallel rank with no rows: (0,) tokens, (0,) offsets -> (0, D); same message."""
    layer = VocabParallelEmbeddingBag(V, D, comm, mode="mean", seed=1, dtype=np.float64)
    trace.reset()
    y = layer.forward((np.zeros(0, np.int64), np.zeros(0, np.int64)))
    layer.backward(np.zeros((0, D)))
    assert y.shape == (0, D) and not layer.weight.grad.any()
    missing, extra = match_trace(layer.collectives((0,)), trace.events())
    assert not missing and not extra, (missing, extra)


@pytest.mark.mpi(min_size=1)
def test_bad_token_refused_before_any_message(comm):
    layer = VocabParallelEmbeddingBag(V, D, comm, seed=1, dtype=np.float64)
    trace.reset()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 11\)"):
        layer.forward((np.array([1, V]), np.array([0])))
    assert trace.events() == []
