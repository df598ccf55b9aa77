"""Vocabulary: token -> id, built from a distributed count (:func:`count_corpus`).

Ids: 0 = ``<pad>``, 1 = ``<unk>``, then the tokens whose train count is at least
``min_freq``, most frequent first (ties by token, code point order), at most
``max_vocab`` ids in all (the reserved two included). Tokens left out map to ``<unk>``.

The count is the MapReduce of ``mpifc text count``: under mpiexec every rank counts its
share of the files and the owners of the hashed tokens pick their candidates; rank 0
receives the exact global top ``max_vocab - 2`` (or every kept token) by one gather.
"""
from __future__ import annotations

import numpy as np

from mpifc.text.tokenize import tokenize
from mpifc.text.wordcount import TextError, _key, count_corpus, gather_pairs, top_k

PAD, UNK = "<pad>", "<unk>"
RESERVED = (PAD, UNK)


def select(owned: dict, min_freq: int) -> dict:
    """This owner's tokens that are frequent enough (reserved spellings never count)."""
    return {t: c for t, c in owned.items() if c >= min_freq and t not in RESERVED}


def build_vocab(comm, paths, *, min_freq: int = 1, max_vocab: int | None = None,
                cjk: str = "chars", root: int = 0) -> tuple[list[str], np.ndarray]:
    """Count ``paths`` over ``comm`` and return (vocab, counts) on every rank. Collective.

    Returns
    -------
    vocab : list of V tokens, vocab[0] = "<pad>", vocab[1] = "<unk>"
    counts : (V,) int64, the count of each token (0 for the reserved ids)
    """
    if min_freq < 1:
        raise TextError(f"--min-freq must be >= 1, got {min_freq}")
    if max_vocab is not None and max_vocab < 3:
        raise TextError(f"--max-vocab must be >= 3 (two ids are reserved), got {max_vocab}")
    res = count_corpus(comm, paths, cjk=cjk, top=0)
    if res.tokens == 0:
        raise TextError("the corpus is empty: no tokens in the train documents")
    kept = select(res.counts, min_freq)
    if max_vocab is None:
        pairs = gather_pairs(comm, list(kept.items()), root)
        pairs = None if pairs is None else sorted(pairs, key=_key)
    else:
        pairs = top_k(comm, kept, max_vocab - len(RESERVED), root)
    pairs = comm.bcast_obj(pairs, root=root)
    vocab = list(RESERVED) + [t for t, _ in pairs]
    counts = np.array([0, 0] + [c for _, c in pairs], dtype=np.int64)
    return vocab, counts


def vocab_from_counter(counter, *, min_freq: int = 1, max_vocab: int | None = None):
    """The same vocabulary from an in-memory ``Counter`` (one process, no MPI)."""
    pairs = sorted(select(counter, min_freq).items(), key=_key)
    if max_vocab is not None:
        pairs = pairs[:max_vocab - len(RESERVED)]
    return list(RESERVED) + [t for t, _ in pairs], \
        np.array([0, 0] + [c for _, c in pairs], dtype=np.int64)


def encode(docs, vocab, cjk: str = "chars") -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``docs`` (strings, or lists of tokens) as (tokens (T,) int32, offsets (N+1,)).

    Unknown tokens become ``<unk>`` = 1."""
    ids = {t: i for i, t in enumerate(vocab)}
    flat, offsets = [], [0]
    for d in docs:
        toks = tokenize(d, cjk) if isinstance(d, str) else d
        flat.extend(ids.get(t, 1) for t in toks)
        offsets.append(len(flat))
    return np.asarray(flat, dtype=np.int32), np.asarray(offsets, dtype=np.int64)
