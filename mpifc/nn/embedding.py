"""Embedding lookups. V vocabulary, D embedding size, N bags/batch, L padded bag length, T tokens."""
from __future__ import annotations

import numpy as np

from mpifc.backend import get_array_module, is_device_array, to_device
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
      non-decreasing; empty bags give zero vectors). The pair may also come as one
      tuple ``forward((idx, offsets))``: the batch ``x`` of a text model
      (:mod:`mpifc.models`), or
    * padded ``idx`` (N, L) with an optional ``mask`` (N, L) (true = real token).

    With ``padding_idx`` set, tokens equal to it are real in neither form: the flat
    form drops them (:func:`drop_padding`), the padded form masks them out (so a
    padded batch works inside a Sequential without a mask). They contribute
    nothing, their table row gets no gradient, and they do not count in the mean.

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
        if isinstance(idx, tuple):
            idx, offsets = idx
        _check_ids(idx, self.num_embeddings)           # host ids: checked before the copy
        idx = to_device(idx, self.xp)                  # ids on the table's backend
        offsets = None if offsets is None else to_device(offsets, self.xp)
        if self.padding_idx is not None and offsets is not None:
            idx, offsets = drop_padding(idx, offsets, self.padding_idx)
        elif self.padding_idx is not None:
            pad = idx != self.padding_idx
            mask = pad if mask is None else (mask.astype(bool) & pad)
        y, self._cache = F.embedding_bag_forward(self.weight.data, idx, offsets, mask, self.mode)
        return y

    def backward(self, dy):
        self.weight.add_grad(F.embedding_bag_backward(dy, self._cache))
        self._cache = None
        return None

    # --- description (see mpifc.parallel.describe): input_shape (N,) or (N, L) tokens per bag
    def output_shape(self, input_shape):
        return (int(input_shape[0]), self.embedding_dim)

    def collectives(self, input_shape):
        return []

    def flops(self, input_shape):
        N = int(input_shape[0])
        L = float(input_shape[1]) if len(input_shape) > 1 else 1.0
        f = int(round(2 * N * L * self.embedding_dim))
        return f, f


def drop_padding(idx, offsets, padding_idx):
    """(tokens, offsets) without the tokens equal to ``padding_idx``, bags kept.

    idx : (T,), offsets : (N,) -> idx' : (T',), offsets' : (N,): bag i of the result
    holds bag i's tokens that are not padding (a bag of padding only becomes empty).
    """
    xp = get_array_module(idx)
    keep = idx != padding_idx
    # kept tokens before position t, for t = 0..T: the new start of a bag starting at t
    before = xp.concatenate([xp.zeros(1, dtype=np.int64), xp.cumsum(keep, dtype=np.int64)])
    return idx[keep], before[offsets]


def _check_ids(idx, V):
    if idx.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {idx.dtype}")
    # the range on host ids only: on a device it is two scalar reads per step (the
    # loader checks token ids on the host, before the copy)
    if idx.size and not is_device_array(idx) and (int(idx.min()) < 0 or int(idx.max()) >= V):
        raise ValueError(f"token ids must be in [0, {V}), got range [{int(idx.min())}, {int(idx.max())}]")
