"""Vocabulary-parallel EmbeddingBag. V vocabulary, D embedding size, N bags, T tokens,
P ranks in the tensor group, V_r this rank's rows of the table (uneven: balanced counts).

Every rank of the tensor group holds the same (tokens, offsets) and the rows
[V_off, V_off + V_r) of the table. It sums the tokens it owns (the others add zero),
one allreduce over the group completes the bags, and the weight gradient needs no
message: each rank's rows get the gradient of its own tokens only.
"""
from __future__ import annotations

import numpy as np

from mpifc.backend import get_array_module, to_device
from mpifc.nn import init as I
from mpifc.nn._common import resolve_dtype, resolve_xp
from mpifc.nn.embedding import _check_ids, drop_padding
from mpifc.parallel.base import ParallelModule
from mpifc.parallel.init import input_split, sharded_parameter


class VocabParallelEmbeddingBag(ParallelModule):
    """Sum or mean of the token vectors of each bag, the table E : (V, D) split on its rows.

    Contract row:

    ================================== ====================================== ==============================
    layer                              forward                                backward
    ================================== ====================================== ==============================
    vocab-parallel EmbeddingBag (E     local sum of the tokens this rank      none (weight-gradient rows
    split on its vocabulary rows)      owns; allreduce of the (N, D) bag sums stay local; no input gradient)
    ================================== ====================================== ==============================

    Equal to :class:`mpifc.nn.EmbeddingBag` (flat form) up to the order of the sums:
    tokens outside this rank's rows contribute zero; mode "mean" divides by the whole
    bag's real-token count, which every rank knows (it holds all tokens).

    Parameters
    ----------
    num_embeddings, embedding_dim : V, D
    group : Communicator that splits the vocabulary (the tensor group)
    mode : "sum" or "mean"
    padding_idx : tokens equal to it are dropped (no contribution, not counted in the mean)
    name : phase prefix in the trace ("<name>.forward")
    init, rng, seed, dtype, xp : as :class:`mpifc.nn.EmbeddingBag`; only the group root
        draws the full table from ``rng`` (the serial layer's draws), then scatter(v)s rows

    Shapes
    ------
    x : (tokens (T,), offsets (N,)) int, replicated over the group -> y : (N, D) replicated
    """

    def __init__(self, num_embeddings, embedding_dim, group, mode="mean", padding_idx=None, *,
                 name="emb", init=None, rng=None, seed=None, dtype=np.float32, xp=None):
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.group, self.name, self.mode = group, name, mode
        self.padding_idx = None if padding_idx is None else int(padding_idx)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        self.counts, self.V_r, self.V_off = input_split(name, self.num_embeddings, group,
                                                        what="num_embeddings")
        rng = I.make_rng(rng, seed) if group.rank == 0 else None
        shape = (self.num_embeddings, self.embedding_dim)

        def full():        # exactly the serial EmbeddingBag's draws
            return (I.normal(shape, rng, dtype=self.dtype) if init is None
                    else I.initialize(init, shape, rng, self.dtype))

        self.weight = sharded_parameter(group, "weight", full, shape, 0, self.counts,
                                        self.dtype, self.xp)
        self._params = [self.weight]
        self.input_grad = False
        self._cache = None
        self._y_shape = None

    def forward(self, x, offsets=None):
        """x : (tokens, offsets) (or tokens with ``offsets``) -> y : (N, D), the same on every rank."""
        tokens = x
        if isinstance(x, tuple):
            tokens, offsets = x
        if offsets is None or tokens.ndim != 1 or offsets.ndim != 1:
            self._refuse("input", getattr(tokens, "shape", ()),
                         "a (tokens (T,), offsets (N,)) pair of 1-d integer arrays")
        tokens, offsets = to_device(tokens, self.xp), to_device(offsets, self.xp)   # ids on E's backend
        _check_ids(tokens, self.num_embeddings)
        if offsets.dtype.kind not in "iu":
            raise TypeError(f"{self._where()}: offsets must be integers, got dtype {offsets.dtype}")
        if self.padding_idx is not None:
            tokens, offsets = drop_padding(tokens, offsets, self.padding_idx)
        xp = get_array_module(self.weight.data)
        T, N, D = int(tokens.shape[0]), int(offsets.shape[0]), self.embedding_dim
        ends = xp.concatenate([offsets[1:], xp.asarray([T], dtype=offsets.dtype)])
        counts = (ends - offsets).astype(np.int64)
        if N and (bool((counts < 0).any()) or int(offsets[0]) != 0):
            raise ValueError(f"{self._where()}: offsets must start at 0 and be non-decreasing")
        bag = xp.searchsorted(offsets, xp.arange(T), side="right") - 1       # (T,) bag of each token
        # the tokens this rank owns, as local rows of its table block
        mine = (tokens >= self.V_off) & (tokens < self.V_off + self.V_r)
        rows, bag = tokens[mine] - self.V_off, bag[mine]
        w = None
        if self.mode == "mean":       # the whole bag's count: every rank holds all tokens
            w = (1.0 / xp.maximum(counts, 1)).astype(self.dtype)[bag]
        y = xp.zeros((N, D), dtype=self.dtype)
        vec = self.weight.data[rows]
        xp.add.at(y, bag, vec if w is None else vec * w[:, None])
        with self.phase("forward"):
            self.group.allreduce(y, out=y)
        self._cache = (rows, bag, w)
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        """dy : (N, D) replicated -> None; this rank's rows of dE, no message."""
        self._check_grad(dy, self._y_shape)
        rows, bag, w = self._cache
        self._cache = None
        xp = get_array_module(dy)
        dE = xp.zeros((self.V_r, self.embedding_dim), dtype=dy.dtype)
        g = dy[bag]
        xp.add.at(dE, rows, g if w is None else g * w[:, None])
        self.weight.add_grad(dE)
        return None

    # --- description ---
    def output_shape(self, input_shape):
        """input_shape : (N,) or (N, L) (L tokens per bag) -> (N, D)."""
        return (int(input_shape[0]), self.embedding_dim)

    def collectives(self, input_shape):
        return [self._c("forward", "allreduce", self.group, int(input_shape[0]) * self.embedding_dim)]

    def flops(self, input_shape):
        """input_shape (N, L): L tokens per bag on average (1 if absent); this rank owns
        V_r / V of them (uniform ids). Forward: scale and add, 2 per owned token element;
        backward the same into dE."""
        return embedding_bag_flops(input_shape, self.embedding_dim, self.V_r / self.num_embeddings)

    def __repr__(self):
        return (f"VocabParallelEmbeddingBag({self.num_embeddings}, {self.embedding_dim}, "
                f"mode={self.mode!r}, shard {self.V_r}/{self.group.size} ranks)")


def embedding_bag_flops(input_shape, D, share=1.0) -> tuple[int, int]:
    """(forward, backward) of an EmbeddingBag on ``input_shape`` (N, L) bags of L tokens
    (L = 1 when absent), a ``share`` of the tokens in this rank's rows: 2 * tokens * D each."""
    N = int(input_shape[0])
    L = float(input_shape[1]) if len(input_shape) > 1 else 1.0
    f = int(round(2 * N * L * share * D))
    return f, f
