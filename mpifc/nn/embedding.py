"""Embedding lookups. V vocabulary, D embedding size, N bags/batch, L padded bag length, T tokens."""
from __future__ import annotations

import numpy as np

from mpifc.nn import functional as F
from mpifc.nn import init as I
from mpifc.nn._common import place, resolve_dtype, resolve_xp
from mpifc.nn.module import Module, Parameter


class Embedding(Module):
    """y = E[idx]; E : (V, D) initialised N(0, 1). idx : (...) ints -> y : (..., D).

    The input is integer ids, so backward returns None (there is no input gradient).
    """

    def __init__(self, num_embeddings, embedding_dim, *, init=None, rng=None, seed=None,
                 dtype=np.float32, xp=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        rng = I.make_rng(rng, seed)
        shape = (self.num_embeddings, self.embedding_dim)
        E = I.normal(shape, rng, dtype=self.dtype) if init is None else I.initialize(init, shape, rng, self.dtype)
        self.weight = Parameter(place(E, self.xp, self.dtype), "weight")
        self._params = [self.weight]
        self.input_grad = False

    def forward(self, idx):
        _check_ids(idx, self.num_embeddings)
        self._idx = idx
        return F.embedding_forward(idx, self.weight.data)

    def backward(self, dy):
        self.weight.add_grad(F.embedding_backward(dy, self._idx, self.num_embeddings))
        return None


class EmbeddingBag(Module):
    """Sum or mean of the token vectors of each bag (bag-of-words text models).

    ``forward(idx, offsets=None, mask=None)`` takes either

    * flat tokens ``idx`` (T,) with ``offsets`` (N,): bag i holds
      ``idx[offsets[i]:offsets[i+1]]`` (the last bag runs to T; offsets[0] == 0,
      non-decreasing; empty bags give zero vectors), or
    * padded ``idx`` (N, L) with an optional ``mask`` (N, L) (true = real token).
      With ``padding_idx`` set, tokens equal to it are masked out too, so a
      padded batch works inside a Sequential without a mask.

    mode "mean" divides by the number of real tokens (an empty bag gives zeros).

    Returns y : (N, D). backward returns None (integer input).
    """

    def __init__(self, num_embeddings, embedding_dim, mode="mean", padding_idx=None, *,
                 init=None, rng=None, seed=None, dtype=np.float32, xp=None):
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.mode = mode
        self.padding_idx = None if padding_idx is None else int(padding_idx)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        rng = I.make_rng(rng, seed)
        shape = (self.num_embeddings, self.embedding_dim)
        E = I.normal(shape, rng, dtype=self.dtype) if init is None else I.initialize(init, shape, rng, self.dtype)
        self.weight = Parameter(place(E, self.xp, self.dtype), "weight")
        self._params = [self.weight]
        self.input_grad = False

    def forward(self, idx, offsets=None, mask=None):
        _check_ids(idx, self.num_embeddings)
        if self.padding_idx is not None:
            if offsets is not None:
                raise ValueError("padding_idx applies to the padded (N, L) form, not offsets")
            pad = idx != self.padding_idx
            mask = pad if mask is None else (mask.astype(bool) & pad)
        y, self._cache = F.embedding_bag_forward(self.weight.data, idx, offsets, mask, self.mode)
        return y

    def backward(self, dy):
        self.weight.add_grad(F.embedding_bag_backward(dy, self._cache))
        self._cache = None
        return None


def _check_ids(idx, V):
    if idx.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {idx.dtype}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= V):
        raise ValueError(f"token ids must be in [0, {V}), got range [{int(idx.min())}, {int(idx.max())}]")
