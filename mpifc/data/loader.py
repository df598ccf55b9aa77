"""Distributed loading of an mpifc HDF5 dataset over the data-parallel ranks.

One epoch is a permutation of the N samples drawn from ``(seed, epoch)``; it is cut
into global batches of B samples, and global batch ``s`` is split over the P
data-parallel ranks with ``balanced_counts`` (contiguous blocks, sizes differ by at
most one). Every rank runs the same ``steps_per_epoch``:

* ``drop_last=False``: ``ceil(N / B)`` steps; the last global batch has
  ``N - (steps - 1) * B`` samples and is split the same way, so a rank may get 0 rows
  (it still joins every collective). Every sample is seen exactly once per epoch.
* ``drop_last=True``: ``N // B`` full steps; the remaining ``N % B`` samples of the
  permutation are skipped this epoch (another permutation next epoch).

Two ways to get a rank's rows:

* ``mode="slice"``: every rank opens the shared file read-only and reads only its
  rows of each global batch (no communication).
* ``mode="scatter"``: only the root opens the file; it reads the whole global batch
  and scatters (Scatterv) the stored rows, uint8 for images, so the wire carries 4x
  less than float32.

Text datasets (``layout = "text"``, :mod:`mpifc.data.textformat`): a rank's rows are
``x = (tokens (T_r,) int64, offsets (b,) int64)`` -- the flat ids of its documents in
batch order and where each starts (``offsets[0] = 0``; the last runs to ``T_r``; empty
documents allowed), the input :class:`mpifc.nn.EmbeddingBag` takes. In scatter mode the
root broadcasts (tokens, status) per rank, then Scatterv of the tokens, of
the document lengths and of the labels; a bad batch on the root (a token id outside
``[0, vocab_size)``, a label outside the classes) is sent as a status and raised, with
the root's message, on every rank.

A loader may serve a subset of the split (``rows``: the training rows left by a
validation split, :mod:`mpifc.data.validation`) and augment image batches
(``augment``, :mod:`mpifc.data.augment`): the random choices are keyed by (seed,
epoch, row in the split), so they too are the same for any P, mode or resume point.

The loader is built on the data-parallel communicator (``grid.dp_comm``): its rank
and size pick the slice, so tensor-parallel ranks of one data group, which share a
dp rank, get the same batch. The sequence of global batches does not depend on P,
so a run resumed from ``(epoch, step)`` on another dp size sees the same samples.

Shape letters: N samples, B global batch, P dp ranks, b rows on this rank,
C/H/W image channels/height/width, D features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mpifc import backend
from mpifc.comm import balanced_counts
from mpifc.data.format import DatasetError, Normalisation, open_dataset
from mpifc.data.textformat import TEXT_SAMPLE
from mpifc.security import crypt

MODES = ("slice", "scatter")
#: text without cache: read the covering token range in one hyperslab when it is at most
#: 4x the tokens needed plus this many; else one read per document
DENSE_SLACK_TOKENS = 1 << 18


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Sample order of one epoch: ``default_rng([seed, epoch]).permutation(n)``.

    Returns
    -------
    (n,) int64, a permutation of ``range(n)`` (the identity when ``shuffle`` is False)
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int64)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples each dp rank gets at each step: pure index logic, no I/O.

    Parameters
    ----------
    n : samples in the split
    batch_size : B, global batch (summed over dp ranks)
    dp_size : P, data-parallel ranks
    """

    n: int
    batch_size: int
    dp_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"dataset split is empty (n={self.n})")
        if self.batch_size < 1 or self.dp_size < 1:
            raise ValueError(f"batch_size and dp_size must be >= 1, got {self.batch_size}, "
                             f"{self.dp_size}")
        if self.drop_last and self.batch_size > self.n:
            raise ValueError(f"drop_last with batch_size {self.batch_size} > {self.n} samples "
                             "leaves no step")

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")

    def global_size(self, step: int) -> int:
        """Samples in global batch ``step`` (B, or fewer for the last one)."""
        self._check_step(step)
        return min(self.batch_size, self.n - step * self.batch_size)

    def counts(self, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Rows per dp rank and their offsets in global batch ``step``."""
        return balanced_counts(self.global_size(step), self.dp_size)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.n, self.seed, epoch, self.shuffle)

    def global_indices(self, epoch: int, step: int, order=None) -> np.ndarray:
        """Sample indices of global batch ``step``, (global_size,) int64, in batch order."""
        order = self.order(epoch) if order is None else order
        start = step * self.batch_size
        return order[start:start + self.global_size(step)]

    def local_indices(self, epoch: int, step: int, dp_rank: int, order=None) -> np.ndarray:
        """This rank's slice of global batch ``step``, (b,) int64."""
        counts, displs = self.counts(step)
        g = self.global_indices(epoch, step, order)
        return g[displs[dp_rank]:displs[dp_rank] + counts[dp_rank]]


class Batch(NamedTuple):
    """One rank's part of a global batch.

    x : (b, C, H, W) or (b, D), normalised ``dtype`` (or stored dtype) on the backend;
        text: (tokens (T_r,) int64, offsets (b,) int64) on the backend
    y : (b,) int64 labels on the backend
    epoch, step : position of this batch
    global_size : samples in the whole global batch (divide summed losses by this)
    """

    x: object
    y: object
    epoch: int
    step: int
    global_size: int


def check_rows(x: np.ndarray, y: np.ndarray, idx, num_classes: int, where: str) -> None:
    """Raise DatasetError unless float ``x`` is finite and ``y`` lies in [0, num_classes).

    ``idx`` maps row i to its sample index in the file (None: row i is sample i); the
    error names the first bad sample. The common case costs one sum over x (NaN/Inf
    propagate into it; ~5 GB/s on one core, about 0.15 ms for 64 rows of 3x32x32
    floats) and a min/max over y; the row search runs only when the sum is not finite
    (an overflowing sum of finite values costs that search and raises nothing).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        suspect = x.dtype.kind == "f" and x.size and not np.isfinite(x.sum())
    if suspect:
        ok = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
        if not ok.all():
            rows = np.flatnonzero(~ok)
            samples = rows if idx is None else np.asarray(idx)[rows]
            first = int(samples.min())
            raise DatasetError(f"{where}: sample {first} has NaN or Inf in x ({rows.size} bad "
                               "sample(s) in this read); fix or re-create the dataset")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        rows = np.flatnonzero((y < 0) | (y >= num_classes))
        samples = rows if idx is None else np.asarray(idx)[rows]
        i = int(np.argmin(samples))
        raise DatasetError(f"{where}: sample {int(samples[i])} has label {int(y[rows[i]])}, "
                           f"outside [0, {num_classes})")


def check_tokens(tokens: np.ndarray, offsets: np.ndarray, idx, vocab_size: int,
                 where: str) -> None:
    """Raise DatasetError unless every token id lies in [0, vocab_size).

    ``offsets`` (b,) are the document starts in ``tokens``; ``idx`` maps document i to its
    index in the split (None: i itself). The error names the first bad document."""
    if tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo >= 0 and hi < vocab_size:
        return
    pos = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    rows = np.unique(np.searchsorted(offsets, pos, side="right") - 1)
    samples = rows if idx is None else np.asarray(idx)[rows]
    i = int(np.argmin(samples))
    first = pos[np.searchsorted(offsets, pos, side="right") - 1 == rows[i]][0]
    raise DatasetError(f"{where}: document {int(samples[i])} has token id {int(tokens[first])}, "
                       f"outside [0, {vocab_size}) (vocab_size of the file)")


def gather_docs(tokens: np.ndarray, offsets: np.ndarray, idx: np.ndarray, base: int = 0):
    """Documents ``idx`` of a ragged split, in the order of ``idx``.

    tokens : the split's ids from token ``base`` on; offsets : (N+1,) document bounds
    Returns (tokens (T_b,) int64, starts (b,) int64)."""
    lo, hi = offsets[idx], offsets[idx + 1]
    lens = hi - lo
    starts = np.zeros(idx.size, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    total = int(lens.sum())
    pos = np.repeat(lo - base - starts, lens) + np.arange(total, dtype=np.int64)
    return tokens[pos].astype(np.int64), starts


def _read_docs(g, idx: np.ndarray):
    """Documents ``idx`` of text split group ``g`` read from the file: (tokens, starts)."""
    if idx.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    off = g["offsets"]
    ilo, ihi = int(idx.min()), int(idx.max()) + 2
    o = off[ilo:ihi]                 # bounds of the covering range of documents
    local = idx - ilo
    lo, hi = o[local], o[local + 1]
    need = int((hi - lo).sum())
    tlo, thi = int(lo.min()), int(hi.max())
    if thi - tlo <= 4 * need + DENSE_SLACK_TOKENS:      # dense enough: one hyperslab
        return gather_docs(g["tokens"][tlo:thi], o, local, base=tlo)
    parts = [g["tokens"][int(a):int(b)] for a, b in zip(lo, hi)]
    starts = np.zeros(idx.size, dtype=np.int64)
    np.cumsum((hi - lo)[:-1], out=starts[1:])
    return np.concatenate(parts).astype(np.int64), starts


def _read_rows(ds, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (any order, no repeats) of an h5py dataset, in the order of ``idx``.

    h5py fancy selection needs increasing indices: read sorted, then put back in
    batch order. A dense selection reads the covering range in one hyperslab instead.
    """
    if idx.size == 0:
        return np.empty((0,) + ds.shape[1:], dtype=ds.dtype)
    perm = np.argsort(idx, kind="stable")
    sidx = idx[perm]
    lo, hi = int(sidx[0]), int(sidx[-1]) + 1
    if hi - lo <= 2 * sidx.size:
        rows = ds[lo:hi][sidx - lo]
    else:
        rows = ds[sidx]
    out = np.empty_like(rows)
    out[perm] = rows
    return out


class DistributedLoader:
    """Iterate over one split in global batches, this dp rank getting its rows.

    Parameters
    ----------
    path : mpifc HDF5 dataset (shared, read-only; in scatter mode only root needs it)
    comm : data-parallel communicator (``mpifc.comm`` API: rank, size, scatter,
        allgather_obj); pass ``grid.dp_comm``, never the world, under tensor parallelism
    split : ``"train"``, ``"test"`` or another split in the file
    batch_size : B, the global batch summed over dp ranks
    seed, shuffle, drop_last : see :class:`BatchPlan`
    mode : ``"slice"`` (each rank reads its rows) or ``"scatter"`` (root reads, Scatterv)
    root : reading rank in scatter mode
    dtype : float type of normalised ``x`` (float32 default, float64 on request)
    normalise : apply the file's normalisation; False returns stored values as ``dtype``
    xp : backend module (numpy or cupy) the batches are placed on; default numpy
    cache : keep the split in memory on the reading rank(s) after the first read
    validate : check what is served: float features finite, labels in [0, classes).
        Cached float data is checked once, at construction (all ranks agree on the
        verdict); otherwise every read batch is checked on the rank that reads it.
    key : :class:`mpifc.security.crypt.DataKey` of an encrypted file (``data.key_file`` /
        ``data.key_env``); required for one, refused for a clear file. Each reading rank
        decrypts only the chunks holding its rows, and every batch read is agreed on by
        all ranks, so a chunk that fails authentication on one rank fails every rank
    rows : serve only these rows of the split (distinct indices, e.g. the training rows
        left by :func:`mpifc.data.validation.split_rows`), or a callable giving them
        from the split's size; the plan, the epoch order and the batches run over
        them, and augmentation and error messages use the rows' indices in the
        split. Default: the whole split.
    augment : :class:`mpifc.data.augment.Augment` applied to each image batch (stored
        values, before normalisation), keyed by (seed, epoch, row in the split): the
        same augmented global batch under any dp size, mode or resume point. Training
        loaders only; evaluation never passes one.
    prefetch : on a device (``xp`` cupy, not text), read and copy batch k + 1 through
        pinned host buffers on a copy stream while batch k computes
        (:mod:`mpifc.data.prefetch`); None (default): on whenever it applies. The
        batches are the same either way.

    Every rank constructs the loader (collective: a rank that cannot open the file
    makes all ranks raise the same :class:`DatasetError`).
    """

    def __init__(self, path, comm, *, split: str = "train", batch_size: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, mode: str = "slice",
                 root: int = 0, dtype=np.float32, normalise: bool = True, xp=None,
                 cache: bool = False, validate: bool = True, key=None, rows=None,
                 augment=None, prefetch: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.comm = comm
        self.split = split
        self.mode = mode
        self.root = int(root)
        self.dtype = np.dtype(dtype)
        self.normalise = bool(normalise)
        self.xp = np if xp is None else xp
        self.cache = bool(cache)
        self.validate = bool(validate)
        self.path = str(path)
        self._f = None
        self._mem = None
        self._key, self._arrays, self._cache_agreed = key, None, False
        # issue 18 (data): a subset of the split's rows (validation_split) and augmentation
        self.rows = None if rows is None or callable(rows) else np.asarray(rows, dtype=np.int64)
        self.augment = augment if augment is not None and augment.active else None
        reads = mode == "slice" or comm.rank == self.root
        settings = (int(batch_size), int(seed), bool(shuffle), bool(drop_last), mode, self.root,
                    self._rows_tag(), None if self.augment is None else
                    (self.augment.ops, self.augment.pad, self.augment.seed))
        # open and validate here, then agree on the result on every rank, so a
        # missing or bad file on one rank is an error everywhere, not a hang
        mine = {"settings": settings, "error": None, "meta": None}
        if reads:
            try:
                self._f, info = open_dataset(path, key=key)
                crypt.check_key(self._f, key, path, "data.key_file or data.key_env",
                                accept_clear=False)
                s = info.split(split)
                mine["meta"] = (s.n, s.sample_shape, s.dtype.str, info.num_classes,
                                info.normalisation.kind, info.normalisation.mean.tolist(),
                                info.normalisation.std.tolist(), info.layout,
                                info.vocab_size)
                self.text, self.vocab_size = info.layout == "text", info.vocab_size
                if self.cache and self.validate and (s.dtype.kind == "f" or self.text):
                    # features are read whole anyway: check them once, here, where
                    # every rank learns the verdict (uint8 images cannot be non-finite)
                    self._fill_cache()
                    if self.text:
                        tok, off, y = self._mem
                        check_tokens(tok, off[:-1], None, self.vocab_size, self._where)
                        check_rows(tok, y, None, info.num_classes, self._where)
                    else:
                        check_rows(*self._mem, None, info.num_classes, self._where)
            except (DatasetError, OSError, crypt.CryptError) as e:
                mine["error"] = str(e)
        everyone = comm.allgather_obj(mine)
        errors = [f"rank {r}: {d['error']}" for r, d in enumerate(everyone) if d["error"]]
        if errors:
            self.close()
            raise DatasetError("cannot load dataset on every rank: " + "; ".join(errors))
        if len({d["settings"] for d in everyone}) != 1:
            self.close()
            raise ValueError("loader settings (batch_size, seed, shuffle, drop_last, mode, root, "
                             "rows, augment) "
                             f"differ between ranks: {[d['settings'] for d in everyone]}")
        metas = [d["meta"] for d in everyone if d["meta"] is not None]
        if any(m != metas[0] for m in metas):
            self.close()
            raise DatasetError(f"ranks see different files at {path!r}: {metas}")
        n, sample_shape, sdtype, self.num_classes, kind, mean, std, layout, vocab = metas[0]
        self.text, self.vocab_size = layout == "text", vocab
        self.sample_shape = tuple(sample_shape)
        self.stored_dtype = np.dtype(sdtype)
        self.normalisation = Normalisation(kind, np.asarray(mean), np.asarray(std))
        if callable(rows):          # rows of a split of n, known now that every rank agrees
            try:
                self.rows = np.asarray(rows(n), dtype=np.int64)
            except Exception:
                self.close()
                raise
        if self.rows is not None:
            bad = self.rows[(self.rows < 0) | (self.rows >= n)]
            if bad.size or np.unique(self.rows).size != self.rows.size:
                self.close()
                raise ValueError(f"rows must be distinct indices in [0, {n}) of split "
                                 f"{split!r}, got {bad[:3].tolist() or 'repeats'}")
            n = int(self.rows.size)
        if self.augment is not None and len(self.sample_shape) != 3:
            self.close()
            raise DatasetError(f"{path}: augmentation ({', '.join(self.augment.ops)}) needs "
                               f"image samples (C, H, W), split {split!r} holds "
                               + ("text" if self.text else f"{self.sample_shape}"))
        self.plan = BatchPlan(n, int(batch_size), comm.size, int(seed), bool(shuffle),
                              bool(drop_last))
        self._epoch, self._step = 0, 0
        self._order_epoch, self._order = None, None
        # issue 15: on a device, read and copy the next batch while this one computes
        wants = self.xp is not np and not self.text
        if prefetch and not wants:
            self.close()
            raise ValueError("prefetch needs batches on a device (xp = cupy) of image or "
                             "feature data")
        self.prefetch = wants if prefetch is None else bool(prefetch)
        self._prefetcher = None

    # ------------------------------------------------------------------ position
    @property
    def n(self) -> int:
        return self.plan.n

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, step) of the next batch ``__iter__`` yields."""
        return self._epoch, self._step

    def set_position(self, epoch: int, step: int = 0) -> None:
        """Continue from global batch ``step`` of ``epoch`` (e.g. after a checkpoint)."""
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"position ({epoch}, {step}) outside epoch >= 0, step in "
                             f"[0, {self.steps_per_epoch}]")
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self._epoch, self._step = int(epoch), int(step)

    def state_dict(self) -> dict:
        """Data position plus what makes it meaningful; store it in a checkpoint.

        The dp size is not part of it: the same global batches follow on any P."""
        p = self.plan
        return {"epoch": self._epoch, "step": self._step, "n": p.n, "batch_size": p.batch_size,
                "seed": p.seed, "shuffle": p.shuffle, "drop_last": p.drop_last,
                "split": self.split, "rows": self._rows_tag()}

    def _rows_tag(self):
        """None (the whole split) or "COUNT:CRC32" of :attr:`rows`: which subset this is."""
        if self.rows is None:
            return None
        import zlib

        return f"{self.rows.size}:{zlib.crc32(self.rows.astype('<i8').tobytes()):08x}"

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; raise if it came from another data stream."""
        p = self.plan
        mine = {"n": p.n, "batch_size": p.batch_size, "seed": p.seed, "shuffle": p.shuffle,
                "drop_last": p.drop_last, "split": self.split, "rows": self._rows_tag()}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            # DatasetError (a ValueError): one line on every rank, e.g. a resume that
            # changed train.batch_size or data.validation_split
            raise DatasetError(f"data position was saved for another stream (saved, now): "
                               f"{diff}; resume with the run's train.batch_size, seed and "
                               "data.validation_split, or start over with --overwrite")
        self.set_position(int(state["epoch"]), int(state["step"]))

    # ------------------------------------------------------------------ batches
    def sample_rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows of the file's split for plan indices ``idx`` (the same without ``rows``)."""
        return idx if self.rows is None else self.rows[idx]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.plan.order(epoch), epoch
        return self._order

    @property
    def _where(self) -> str:
        return f"{self.path}, split '{self.split}'"

    def _open_arrays(self):
        """The split's x and y: h5py datasets, or EncryptedArrays over them."""
        if self._arrays is None:
            g = self._f[self.split]
            self._arrays = tuple(crypt.open_array(g[d], self._key) for d in ("x", "y"))
        return self._arrays

    def _fill_cache(self) -> None:
        if self._mem is None:
            if self.text:
                g = self._f[self.split]
                self._mem = (g["tokens"][...], g["offsets"][...], g["y"][...])
            else:
                xs, ys = self._open_arrays()
                self._mem = (xs[...], ys[...])

    def _read_text(self, idx: np.ndarray):
        """Documents ``idx``: (tokens (T,) int64, starts (b,) int64, y (b,) int64)."""
        if self.cache:
            self._fill_cache()
            tok, off, y = self._mem
            return (*gather_docs(tok, off, idx), y[idx])
        g = self._f[self.split]
        tokens, starts = _read_docs(g, idx)
        y = _read_rows(g["y"], idx)
        if self.validate:
            check_tokens(tokens, starts, idx, self.vocab_size, self._where)
            check_rows(tokens, y, idx, self.num_classes, self._where)
        return tokens, starts, y

    def _scatter_text(self, idx, counts, displs):
        """Root reads global batch ``idx`` and scatters each rank's documents (collective)."""
        comm, me, p = self.comm, self.comm.rank, self.comm.size
        head = np.zeros((p, 2), dtype=np.int64)          # per rank: tokens, status
        tok = lens = ys = None
        err = None
        if me == self.root:
            try:
                tok, starts, ys = self._read_text(idx)
                lens = np.diff(np.append(starts, tok.size))
                ends = np.cumsum(lens)
                for r in range(p):
                    a, b = displs[r], displs[r] + counts[r]
                    head[r, 0] = (ends[b - 1] if b else 0) - (ends[a - 1] if a else 0)
            except DatasetError as e:
                err = str(e)
                head[:, 1] = 1
        head = comm.bcast(head, root=self.root)     # every rank needs all the counts
        if head[0, 1]:               # the root failed: every rank raises its message
            raise DatasetError(comm.bcast_obj(err, root=self.root))
        tokens = np.empty(int(head[me, 0]), dtype=np.int64)
        comm.scatter(tok, tokens, counts=head[:, 0].tolist(), root=self.root)
        mylens = np.empty(counts[me], dtype=np.int64)
        comm.scatter(lens, mylens, counts=list(counts), root=self.root)
        y = np.empty(counts[me], dtype=np.int64)
        comm.scatter(ys, y, counts=list(counts), root=self.root)
        starts = np.zeros(counts[me], dtype=np.int64)
        np.cumsum(mylens[:-1], out=starts[1:])
        return tokens, starts, y

    def _read(self, idx: np.ndarray):
        if self.cache:
            self._fill_cache()
            return self._mem[0][idx], self._mem[1][idx]
        xs, ys = self._open_arrays()
        if isinstance(xs, crypt.EncryptedArray):     # decrypts just the chunks holding idx
            x, y = xs.read_rows(idx), ys.read_rows(idx)
        else:
            x, y = _read_rows(xs, idx), _read_rows(ys, idx)
        if self.validate:
            check_rows(x, y, idx, self.num_classes, self._where)
        return x, y

    def _read_agreed(self, idx):
        """:meth:`_read` (``idx`` None: nothing to read), then agree over the dp ranks.

        Encrypted files only: a chunk failing authentication raises the same
        :class:`DatasetError` on every rank instead of leaving the others in the
        next collective. Costs one 8-byte allreduce per batch, and with ``cache`` only
        for the first batch (the one that reads the split; nothing can fail after it).
        """
        rows, err = None, None
        try:
            rows = self._read(idx) if idx is not None else None
        except crypt.CryptError as e:
            err = str(e)
        if self._key is None or self._cache_agreed:
            if err:
                raise DatasetError(err)
            return rows
        bad = self.comm.allreduce(np.array([1.0 if err else 0.0]), op="max")
        self._cache_agreed = self.cache and not bad[0]      # the same on every rank
        if bad[0]:
            errs = self.comm.allgather_obj(err)
            first = next(f"rank {r}: {m}" for r, m in enumerate(errs) if m)
            raise DatasetError(f"cannot read {self.split} rows: {first}")
        return rows

    def get_batch(self, epoch: int, step: int) -> Batch:
        """This rank's rows of global batch ``step`` of ``epoch``.

        Collective in scatter mode: every dp rank calls it with the same arguments.
        Does not move :attr:`position`.
        """
        plan = self.plan
        order = self._epoch_order(epoch)
        counts, displs = plan.counts(step)
        me = self.comm.rank
        mine = self._local_rows(epoch, step)
        if self.text:
            if self.mode == "slice":
                tokens, starts, y = self._read_text(mine)
            else:
                tokens, starts, y = self._scatter_text(
                    self.sample_rows(plan.global_indices(epoch, step, order))
                    if me == self.root else None, counts, displs)
            x = (backend.to_device(tokens, self.xp), backend.to_device(starts, self.xp))
            return Batch(x, backend.to_device(y, self.xp), epoch, step, plan.global_size(step))
        x, y = self._host_rows(epoch, step, mine)
        return self._place(backend.to_device(x, self.xp), backend.to_device(y, self.xp),
                           epoch, step, mine)

    def _local_rows(self, epoch: int, step: int) -> np.ndarray:
        """This rank's rows of the split in batch ``step`` of ``epoch``."""
        return self.sample_rows(self.plan.local_indices(epoch, step, self.comm.rank,
                                                        self._epoch_order(epoch)))

    def _host_rows(self, epoch: int, step: int, mine: np.ndarray):
        """(x, y) of this rank's rows of batch ``step`` on the host, as stored (not text).

        Collective in scatter mode."""
        plan = self.plan
        counts, _ = plan.counts(step)
        me = self.comm.rank
        if self.mode == "slice":
            x, y = self._read_agreed(mine)
        else:
            order = self._epoch_order(epoch)
            # rows in batch order: rank r's block starts at displs[r]
            got = self._read_agreed(self.sample_rows(plan.global_indices(epoch, step, order))
                                    if me == self.root else None)
            xs, ys = got if got is not None else (None, None)
            x = np.empty((counts[me],) + self.sample_shape, dtype=self.stored_dtype)
            y = np.empty((counts[me],), dtype=np.int64)
            self.comm.scatter(xs, x, counts=list(counts), root=self.root)
            self.comm.scatter(ys, y, counts=list(counts), root=self.root)
        return x, y

    def _place(self, x, y, epoch: int, step: int, mine: np.ndarray) -> Batch:
        """The batch from its stored rows already on the backend: augment, normalise."""
        # the stored (small, often uint8) rows were moved first; normalise on the backend
        if self.augment is not None:      # keyed by (seed, epoch, file row): any P, any mode
            x = self.augment(x, epoch, mine)
        if self.normalise:
            x = self.normalisation.apply(x, self.dtype, self.xp)
        else:
            x = x.astype(self.dtype)
        return Batch(x, y, epoch, step, self.plan.global_size(step))

    def __iter__(self):
        """Yield the rest of the current epoch from :attr:`position`, advancing it.

        The position is moved before each batch is handed out, so a checkpoint taken
        while processing it records the next batch; after the last batch it is
        ``(epoch + 1, 0)``.
        """
        epoch, steps = self._epoch, self.steps_per_epoch
        if self.prefetch:             # on a device: mpifc.data.prefetch
            if self._prefetcher is None:
                from mpifc.data.prefetch import Prefetcher

                self._prefetcher = Prefetcher(self)
            pending = self._prefetcher.issue(epoch, self._step) if self._step < steps else None
            for step in range(self._step, steps):
                batch, ready = pending
                backend.wait_event(ready)        # the compute stream waits for its copy
                # the next batch's read and copy go ahead while this one computes
                pending = self._prefetcher.issue(epoch, step + 1) if step + 1 < steps else None
                self.set_position(epoch, step + 1)
                yield batch
            return
        for step in range(self._step, steps):
            batch = self.get_batch(epoch, step)
            self.set_position(epoch, step + 1)
            yield batch

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._mem = self._arrays = None
        self._cache_agreed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# --- gradient accumulation (train.accumulate): micro-batches of one rank's batch ---
def micro_batches(batch: Batch, k: int) -> list[Batch]:
    """``batch`` (this rank's rows of a global batch) cut into ``k`` micro-batches.

    Contiguous row blocks of ``balanced_counts(b, k)`` rows (sizes differ by at most
    one; a block may be empty when b < k, and every rank still runs all k, so the
    collectives of each micro-batch match). Each keeps the global batch's
    ``global_size``: scaling a micro-batch's mean loss by rows / global_size makes
    the k gradients add up to the mean over the global batch. ``k`` = 1: [batch].
    """
    if k == 1:
        return [batch]
    counts, displs = balanced_counts(int(batch.y.shape[0]), int(k))
    return [batch._replace(x=_rows(batch.x, d, d + c), y=batch.y[d:d + c])
            for c, d in zip(counts, displs)]


def _rows(x, start: int, stop: int):
    """Rows [start, stop) of a batch's x: an array, or a text batch (tokens, offsets)."""
    if not isinstance(x, tuple):
        return x[start:stop]
    tokens, offsets = x
    n = int(offsets.shape[0])
    lo = int(offsets[start]) if start < n else int(tokens.shape[0])
    hi = int(offsets[stop]) if stop < n else int(tokens.shape[0])
    return tokens[lo:hi], offsets[start:stop] - lo
