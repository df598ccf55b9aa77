"""Text datasets in the mpifc HDF5 format: ragged token ids, a vocabulary, labels.

Layout (``layout = "text"``, format version 1, described for users in README.md)::

    /                      attrs: format="mpifc-dataset", format_version=1, layout="text",
                                  source, class_names (K strings), num_classes,
                                  vocab_size (V), pad_id=0, unk_id=1, tokenizer (cjk mode),
                                  min_freq, max_vocab (0: none), normalisation="none"
    /vocab        (V,) UTF-8 strings: id -> token; vocab[0]="<pad>", vocab[1]="<unk>"
    /vocab_counts (V,) int64: train-split count of each token (0 for the reserved ids)
    /train/tokens  (T,) int32 token ids of every document, one after another
    /train/offsets (N+1,) int64: document i is tokens[offsets[i]:offsets[i+1]];
                   offsets[0] = 0, offsets[N] = T, non-decreasing (empty documents allowed)
    /train/y       (N,) int64 labels in [0, K)
    /test/...      the same

Shape letters: N documents, T tokens, V vocabulary size, K classes.
"""
from __future__ import annotations

import os

import h5py
import numpy as np

from mpifc.data.format import (CHUNK_BYTES, FORMAT_NAME, FORMAT_VERSION, REQUIRED_SPLITS,
                               Y_DTYPE, DatasetError, DatasetInfo, Normalisation, SplitInfo,
                               _as_str, chunk_rows)

LAYOUT = "text"
PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
TOKEN_DTYPE = np.dtype(np.int32)
OFFSET_DTYPE = np.dtype(np.int64)
#: what a text split reports as its sample shape (and what ``model.input`` says for text)
TEXT_SAMPLE = ("tokens",)


def write_text_dataset(path, splits: dict, *, vocab, vocab_counts=None, class_names,
                       source: str, attrs: dict | None = None, compression=None) -> str:
    """Write a text dataset atomically (temporary name, then rename); returns ``path``.

    Parameters
    ----------
    splits : {name: (tokens (T,) int, offsets (N+1,) int, y (N,) int)}; train and test needed
    vocab : sequence of V str, vocab[0] == "<pad>", vocab[1] == "<unk>"
    vocab_counts : (V,) int or None
    attrs : extra root attributes (tokenizer, min_freq, ...)
    """
    path = os.fspath(path)
    vocab = [str(t) for t in vocab]
    if len(vocab) < 2 or vocab[PAD_ID] != PAD or vocab[UNK_ID] != UNK:
        raise DatasetError(f"{path}: vocabulary must start with {PAD!r}, {UNK!r}")
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise DatasetError(f"{path}: class_names must not be empty")
    missing = [s for s in REQUIRED_SPLITS if s not in splits]
    if missing:
        raise DatasetError(f"{path}: splits {missing} missing")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    opts = dict(compression=compression, compression_opts=4 if compression == "gzip" else None)
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            for name, (tokens, offsets, y) in splits.items():
                tokens = np.asarray(tokens, dtype=np.int64)
                offsets = np.asarray(offsets, dtype=OFFSET_DTYPE)
                y = np.asarray(y, dtype=Y_DTYPE)
                _check_split(path, name, tokens, offsets, y, len(vocab), len(class_names))
                g = f.create_group(name)
                for key, arr, dt in (("tokens", tokens, TOKEN_DTYPE),
                                     ("offsets", offsets, OFFSET_DTYPE), ("y", y, Y_DTYPE)):
                    n = max(arr.shape[0], 1)
                    g.create_dataset(key, data=arr.astype(dt), chunks=(chunk_rows((), dt, n),)
                                     if arr.shape[0] else None, **(opts if arr.shape[0] else {}))
            f.create_dataset("vocab", data=np.array(vocab, dtype=h5py.string_dtype()))
            counts = np.zeros(len(vocab), np.int64) if vocab_counts is None else vocab_counts
            f.create_dataset("vocab_counts", data=np.asarray(counts, dtype=np.int64))
            a = f.attrs
            a["format"] = FORMAT_NAME
            a["format_version"] = FORMAT_VERSION
            a["layout"] = LAYOUT
            a["source"] = str(source)
            a["class_names"] = np.array(class_names, dtype=h5py.string_dtype())
            a["num_classes"] = len(class_names)
            a["vocab_size"] = len(vocab)
            a["pad_id"] = PAD_ID
            a["unk_id"] = UNK_ID
            a["normalisation"] = "none"
            for k, v in (attrs or {}).items():
                a[k] = v
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _check_split(path, name, tokens, offsets, y, vocab_size, num_classes) -> None:
    n = y.shape[0]
    if n < 1:
        raise DatasetError(f"{path}: split {name!r} has no documents")
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != tokens.shape[0] \
            or np.any(np.diff(offsets) < 0):
        raise DatasetError(f"{path}: split {name!r}: offsets must be (N+1,) non-decreasing from "
                           f"0 to {tokens.shape[0]}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DatasetError(f"{path}: split {name!r}: token ids outside [0, {vocab_size})")
    if y.min() < 0 or y.max() >= num_classes:
        raise DatasetError(f"{path}: split {name!r}: labels outside [0, {num_classes})")


def first_bad_doc(offsets: np.ndarray, bad_positions: np.ndarray) -> int:
    """The document holding the first of ``bad_positions`` (token positions)."""
    return int(np.searchsorted(offsets, int(bad_positions.min()), side="right") - 1)


def validate_text(f: h5py.File, path: str, check_labels: bool = True) -> DatasetInfo:
    """Check an open text dataset (attrs, /vocab, each split's tokens/offsets/y).

    Token ids are checked in [0, vocab_size) here only when ``check_labels`` (a full
    read); the loader checks what it serves. Raises DatasetError naming the file, the
    split and the first bad document."""
    def fail(msg):
        raise DatasetError(f"{path}: {msg}")

    a = f.attrs
    for k in ("class_names", "vocab_size"):
        if k not in a:
            fail(f"missing attribute {k!r}")
    class_names = tuple(_as_str(c) for c in np.atleast_1d(a["class_names"]))
    if not class_names:
        fail("attribute 'class_names' is empty")
    vocab_size = int(a["vocab_size"])
    if vocab_size < 2:
        fail(f"vocab_size {vocab_size} < 2 (it holds at least <pad> and <unk>)")
    if "vocab" in f and f["vocab"].shape != (vocab_size,):
        fail(f"'/vocab' has shape {f['vocab'].shape}, attribute vocab_size is {vocab_size}")
    splits = {}
    names = list(REQUIRED_SPLITS) + [k for k in f.keys()
                                     if k not in REQUIRED_SPLITS and isinstance(f[k], h5py.Group)]
    for name in names:
        if name not in f or not isinstance(f[name], h5py.Group):
            fail(f"missing group '/{name}'")
        g = f[name]
        for d in ("tokens", "offsets", "y"):
            if d not in g or not isinstance(g[d], h5py.Dataset):
                fail(f"missing dataset '/{name}/{d}'")
        tok, off, y = g["tokens"], g["offsets"], g["y"]
        if tok.ndim != 1 or tok.dtype.kind not in "iu":
            fail(f"'/{name}/tokens' must be 1-D integer ids, got {tok.shape} {tok.dtype}")
        if off.dtype != OFFSET_DTYPE or y.dtype != Y_DTYPE:
            fail(f"'/{name}/offsets' and '/{name}/y' must be int64")
        n = y.shape[0] if y.ndim == 1 else -1
        if n < 1:
            fail(f"split '/{name}' is empty or '/{name}/y' is not 1-D")
        if off.shape != (n + 1,):
            fail(f"'/{name}/offsets' has shape {off.shape}; expected ({n + 1},) for {n} labels")
        o = off[...]
        if o[0] != 0 or o[-1] != tok.shape[0] or np.any(np.diff(o) < 0):
            fail(f"'/{name}/offsets' must rise from 0 to {tok.shape[0]} (the token count)")
        if check_labels:
            yy = y[...]
            if yy.min() < 0 or yy.max() >= len(class_names):
                bad = int(np.flatnonzero((yy < 0) | (yy >= len(class_names)))[0])
                fail(f"'/{name}/y'[{bad}] = {int(yy[bad])} is outside [0, {len(class_names)})")
            step = max(1, 8 * CHUNK_BYTES // 4)
            for s in range(0, tok.shape[0], step):
                blk = tok[s:s + step]
                if blk.min() < 0 or blk.max() >= vocab_size:
                    pos = s + np.flatnonzero((blk < 0) | (blk >= vocab_size))
                    fail(f"split '{name}': document {first_bad_doc(o, pos)} has token id "
                         f"{int(tok[int(pos[0])])} outside [0, {vocab_size})")
        splits[name] = SplitInfo(name, int(n), TEXT_SAMPLE, tok.dtype, tok.chunks,
                                 tok.compression, tokens=int(tok.shape[0]))
    return DatasetInfo(path=path, version=int(a["format_version"]),
                       source=_as_str(a.get("source", "")), class_names=class_names,
                       normalisation=Normalisation(), splits=splits, layout=LAYOUT,
                       vocab_size=vocab_size)


def read_vocab(path) -> list[str]:
    """The vocabulary of a text dataset, id -> token."""
    with h5py.File(os.fspath(path), "r") as f:
        return [_as_str(t) for t in f["vocab"][...]]


def read_text_split(path, name: str = "train"):
    """A whole split: (tokens (T,) int32, offsets (N+1,) int64, y (N,) int64)."""
    from mpifc.data.format import open_dataset

    f, info = open_dataset(path)
    with f:
        info.split(name)
        g = f[name]
        return g["tokens"][...], g["offsets"][...], g["y"][...]


def describe_text(info: DatasetInfo, path: str) -> list[str]:
    """Lines for ``mpifc inspect``: vocabulary and per-split documents/tokens."""
    with h5py.File(path, "r") as f:
        vocab = [_as_str(t) for t in f["vocab"][:12]]
        a = dict(f.attrs)
    lines = [f"  text: vocabulary {info.vocab_size} tokens (<pad>=0, <unk>=1; min_freq "
             f"{int(a.get('min_freq', 1))}, max_vocab {int(a.get('max_vocab', 0)) or 'none'}, "
             f"tokenizer cjk={_as_str(a.get('tokenizer', 'chars'))}): "
             + " ".join(vocab) + (" ..." if info.vocab_size > 12 else "")]
    for name, s in info.splits.items():
        comp = f", {s.compression}" if s.compression else ""
        lines.append(f"  {name}: {s.n} documents, {s.tokens} tokens "
                     f"({s.tokens / max(s.n, 1):.1f} per document), ids {np.dtype(s.dtype).name}"
                     f"{comp}")
    return lines
