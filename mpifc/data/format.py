"""The mpifc HDF5 dataset format: a streaming writer and a validating reader.

Layout (format version 1, described for users in ``docs/datasets.md``)::

    /                      attrs: format="mpifc-dataset", format_version=1, source,
                                  class_names (N_cls strings), num_classes, layout,
                                  normalisation ("mean_std" | "scale" | "none") + its params
    /train/x   (N, C, H, W) uint8   or  (N, D) float32     chunks: ~1 MiB of whole rows
    /train/y   (N,) int64 in [0, num_classes)
    /test/x, /test/y       same sample shape and dtype as train

Shape letters: N samples, C channels, H/W image height/width, D features.

Files are written to a temporary name and renamed into place, so a reader never
sees a half-written dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from mpifc.errors import UserError
from mpifc.security import crypt   # encryption at rest: light import, cryptography lazily

FORMAT_NAME = "mpifc-dataset"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20          # target chunk size: whole rows along N, about 1 MiB
REQUIRED_SPLITS = ("train", "test")
X_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
Y_DTYPE = np.dtype(np.int64)
COMPRESSIONS = (None, "gzip", "lzf")


class DatasetError(UserError, ValueError, all_ranks=True):
    """A dataset file, or a converter's input file, is missing or malformed."""


# ---------------------------------------------------------------------------- normalisation

@dataclass(frozen=True)
class Normalisation:
    """How stored values become model inputs: ``x_f = (x - mean[c]) / std[c]``.

    ``kind`` is ``"mean_std"`` (per channel for images, per feature for features, or one
    value for all), ``"scale"`` (``x_f = x * scale + offset``) or ``"none"``. Both forms
    are kept as (mean, std) internally; ``scale``/``offset`` are exposed for the file.

    Attributes
    ----------
    kind : str
    mean, std : ndarray of float64, shape (C,) or (D,) or (1,)
    """

    kind: str = "none"
    mean: np.ndarray = field(default_factory=lambda: np.zeros(1))
    std: np.ndarray = field(default_factory=lambda: np.ones(1))
    # device copies of (mean, 1/std) by (backend, dtype, shape): copied once, not per batch
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def mean_std(cls, mean, std) -> "Normalisation":
        mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
        std = np.atleast_1d(np.asarray(std, dtype=np.float64))
        if mean.shape != std.shape or mean.ndim != 1:
            raise DatasetError(f"normalisation mean {mean.shape} and std {std.shape} must be "
                               "1-D of equal length")
        if not np.all(np.isfinite(mean)) or not np.all(std > 0):
            raise DatasetError("normalisation needs finite mean and std > 0")
        return cls("mean_std", mean, std)

    @classmethod
    def scale(cls, scale: float, offset: float = 0.0) -> "Normalisation":
        if not (np.isfinite(scale) and scale > 0 and np.isfinite(offset)):
            raise DatasetError(f"normalisation scale must be finite and > 0, got {scale}")
        # x * s + o == (x - (-o/s)) / (1/s)
        return cls("scale", np.array([-offset / scale]), np.array([1.0 / scale]))

    @property
    def scale_offset(self) -> tuple[float, float]:
        """(scale, offset) of the ``"scale"`` form."""
        return float(1.0 / self.std[0]), float(-self.mean[0] / self.std[0])

    def check_channels(self, x_shape) -> None:
        """Raise unless mean/std fit axis 1 of samples shaped ``x_shape`` (N, C, ...)."""
        c = x_shape[1] if len(x_shape) > 1 else 1
        if self.mean.shape[0] not in (1, c):
            raise DatasetError(f"normalisation has {self.mean.shape[0]} channels but the data "
                               f"has {c} along axis 1")

    def apply(self, x, dtype=np.float32, xp=np):
        """Return ``(x - mean) / std`` as ``dtype`` on backend ``xp``.

        Parameters
        ----------
        x : array (N, C, H, W) or (N, D), any numeric dtype, already on ``xp``
        """
        out = x.astype(dtype, copy=True)
        if self.kind == "none":
            return out
        bshape = (1, -1) + (1,) * (x.ndim - 2) if self.mean.shape[0] > 1 else (1,) * x.ndim
        key = (xp.__name__, np.dtype(dtype).str, bshape)
        got = self._on_device.get(key) if xp is not np else None
        if got is None:
            got = (xp.asarray(self.mean.reshape(bshape), dtype=dtype),
                   xp.asarray((1.0 / self.std).reshape(bshape), dtype=dtype))
            if xp is not np:
                self._on_device[key] = got
        mean, inv_std = got
        out -= mean
        out *= inv_std
        return out

    def describe(self) -> str:
        """One readable line: ``mean_std, mean [0.49, 0.48, 0.45], std [0.25, 0.24, 0.26]``."""
        def vals(a):
            a = np.asarray(a, dtype=np.float64).ravel()
            shown = ", ".join(f"{v:.4g}" for v in a[:8])
            return f"[{shown}{f', ... ({a.size} values)' if a.size > 8 else ''}]"

        if self.kind == "mean_std":
            return f"mean_std, mean {vals(self.mean)}, std {vals(self.std)}"
        if self.kind == "scale":
            s, o = self.scale_offset
            return f"scale, x * {s:.6g} + {o:.6g}"
        return "none (stored values as they are)"

    def to_attrs(self) -> dict:
        attrs = {"normalisation": self.kind}
        if self.kind == "mean_std":
            attrs["norm_mean"] = self.mean
            attrs["norm_std"] = self.std
        elif self.kind == "scale":
            s, o = self.scale_offset
            attrs["norm_scale"] = s
            attrs["norm_offset"] = o
        return attrs

    @classmethod
    def from_attrs(cls, attrs, where: str) -> "Normalisation":
        kind = _as_str(attrs.get("normalisation", "none"))
        need = {"none": (), "mean_std": ("norm_mean", "norm_std"), "scale": ("norm_scale",)}
        if kind not in need:
            raise DatasetError(f"{where}: unknown normalisation {kind!r}; expected 'mean_std', "
                               "'scale' or 'none'")
        for k in need[kind]:
            if k not in attrs:
                raise DatasetError(f"{where}: normalisation {kind!r} lacks attribute {k!r}")
        try:
            if kind == "mean_std":
                return cls.mean_std(attrs["norm_mean"], attrs["norm_std"])
            if kind == "scale":
                return cls.scale(float(attrs["norm_scale"]), float(attrs.get("norm_offset", 0.0)))
            return cls()
        except DatasetError as e:
            raise DatasetError(f"{where}: {e}") from None


class RunningStats:
    """Per-channel mean/std accumulated over row blocks (float64 sums), for ``"auto"``."""

    def __init__(self):
        self.n = 0
        self.s = None
        self.ss = None

    def update(self, x: np.ndarray) -> None:
        """Add rows ``x`` (N, C, ...) ; statistics are per index of axis 1."""
        if x.shape[0] == 0:
            return
        axes = (0,) + tuple(range(2, x.ndim))
        xf = x.astype(np.float64)
        s, ss = xf.sum(axis=axes), np.square(xf).sum(axis=axes)
        self.n += x.size // x.shape[1]
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss

    def normalisation(self) -> Normalisation:
        if self.n == 0:
            raise DatasetError("cannot compute normalisation from an empty train split")
        mean = self.s / self.n
        var = np.maximum(self.ss / self.n - mean * mean, 0.0)
        std = np.sqrt(var)
        std[std < 1e-12] = 1.0      # constant channel/feature: leave it unscaled
        return Normalisation.mean_std(mean, std)


# ---------------------------------------------------------------------------- writer

def chunk_rows(sample_shape, dtype, n: int, target_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so one chunk holds about ``target_bytes`` (at least 1, at most n)."""
    row = int(np.prod(sample_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(max(1, min(n, round(target_bytes / max(row, 1)))))


class DatasetWriter:
    """Write a dataset split by split, rows in blocks (memory stays bounded).

    Use as a context manager; the file appears at ``path`` only after a clean exit::

        with DatasetWriter(out, class_names=names, source="...") as w:
            w.create_split("train", n, (1, 8, 8), np.uint8)
            w.write("train", 0, x_block, y_block)
            ...
        # normalisation="auto": per-channel mean/std of everything written to train

    Parameters
    ----------
    path : output file (overwritten on success)
    class_names : sequence of str; labels must lie in ``[0, len(class_names))``
    source : free text, where the data came from
    normalisation : Normalisation, ``"auto"`` (mean/std per channel of train) or None
    compression : None, ``"gzip"`` or ``"lzf"``
    compression_opts : gzip level 0..9 (default 4)
    encrypt_key : a :class:`mpifc.security.crypt.DataKey`: x and y are stored AES-256-GCM
        encrypted in chunks of about ``chunk_bytes`` (no compression then)
    """

    def __init__(self, path, *, class_names, source: str, normalisation="auto",
                 compression=None, compression_opts=None, chunk_bytes: int = CHUNK_BYTES,
                 encrypt_key=None):
        if compression not in COMPRESSIONS:
            raise DatasetError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if compression and encrypt_key is not None:
            raise DatasetError("compression and encryption do not combine (encrypted bytes do "
                               "not compress); drop --compression")
        self.encrypt_key = encrypt_key
        self._enc: dict = {}          # (split, "x" | "y") -> EncryptedArray when encrypting
        if compression == "gzip" and compression_opts is None:
            compression_opts = 4
        self.path = os.fspath(path)
        self.class_names = [str(c) for c in class_names]
        if not self.class_names:
            raise DatasetError("class_names must not be empty")
        self.source = str(source)
        self.normalisation = normalisation
        self.compression = compression
        self.compression_opts = compression_opts if compression == "gzip" else None
        self.chunk_bytes = int(chunk_bytes)
        self._stats = RunningStats() if normalisation == "auto" else None
        self._tmp = f"{self.path}.tmp{os.getpid()}"
        self._f = None
        self._written: dict[str, np.ndarray] = {}   # split -> bool mask of rows written

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f = h5py.File(self._tmp, "w", track_order=True)
        return self

    def create_split(self, name: str, n: int, sample_shape, dtype) -> None:
        """Create ``/name/x`` (n, *sample_shape) of ``dtype`` and ``/name/y`` (n,) int64."""
        dtype = np.dtype(dtype)
        sample_shape = tuple(int(d) for d in sample_shape)
        if dtype not in X_DTYPES:
            raise DatasetError(f"split {name!r}: x dtype must be uint8 images or float32 "
                               f"features, got {dtype}")
        if len(sample_shape) not in (1, 3):
            raise DatasetError(f"split {name!r}: samples must be (C, H, W) images or (D,) "
                               f"features, got shape {sample_shape}")
        if dtype == np.uint8 and len(sample_shape) != 3:
            raise DatasetError(f"split {name!r}: uint8 is for (C, H, W) images; store (D,) "
                               "features as float32")
        if n < 1 or min(sample_shape) < 1:
            raise DatasetError(f"split {name!r}: needs at least one sample of nonzero size, "
                               f"got n={n}, sample shape {sample_shape}")
        for other in self._written:
            ox = self._ds(other, "x")
            if ox.shape[1:] != sample_shape or ox.dtype != dtype:
                raise DatasetError(f"split {name!r}: samples {sample_shape} {dtype} differ from "
                                   f"split {other!r}: {ox.shape[1:]} {ox.dtype}")
        g = self._f.create_group(name)
        if self.encrypt_key is not None:      # --- encryption at rest (mpifc.security.crypt)
            for d, shape, dt in (("x", (n,) + sample_shape, dtype), ("y", (n,), Y_DTYPE)):
                self._enc[name, d] = crypt.create_array(g, d, shape, dt, self.encrypt_key,
                                                        self.chunk_bytes)
            self._written[name] = np.zeros(n, dtype=bool)
            return                            # --- end encryption at rest
        opts = dict(compression=self.compression, compression_opts=self.compression_opts)
        g.create_dataset("x", shape=(n,) + sample_shape, dtype=dtype,
                         chunks=(chunk_rows(sample_shape, dtype, n, self.chunk_bytes),) + sample_shape,
                         **opts)
        g.create_dataset("y", shape=(n,), dtype=Y_DTYPE,
                         chunks=(chunk_rows((), Y_DTYPE, n, self.chunk_bytes),), **opts)
        self._written[name] = np.zeros(n, dtype=bool)

    def _ds(self, name: str, d: str):
        """The array ``/name/d`` being written (an EncryptedArray when encrypting)."""
        return self._enc[name, d] if (name, d) in self._enc else self._f[name][d]

    def write(self, name: str, start: int, x, y) -> None:
        """Write rows ``[start, start + len(x))`` of split ``name``.

        x : (n, *sample_shape), cast to the split's dtype (must be lossless for uint8)
        y : (n,) integer labels in ``[0, num_classes)``
        """
        g = {d: self._ds(name, d) for d in ("x", "y")}
        x = np.asarray(x)
        y = np.asarray(y)
        n = x.shape[0]
        if y.shape != (n,):
            raise DatasetError(f"split {name!r}: x has {n} rows but y has shape {y.shape}")
        if x.shape[1:] != g["x"].shape[1:]:
            raise DatasetError(f"split {name!r}: rows of shape {x.shape[1:]}, expected "
                               f"{g['x'].shape[1:]}")
        if start < 0 or start + n > g["x"].shape[0]:
            raise DatasetError(f"split {name!r}: rows [{start}, {start + n}) outside "
                               f"[0, {g['x'].shape[0]})")
        if n and (y.min() < 0 or y.max() >= len(self.class_names)):
            raise DatasetError(f"split {name!r}: labels in [{y.min()}, {y.max()}] outside "
                               f"[0, {len(self.class_names)})")
        if g["x"].dtype == np.uint8 and x.dtype != np.uint8:
            if n and (x.min() < 0 or x.max() > 255 or not np.all(x == np.round(x))):
                raise DatasetError(f"split {name!r}: uint8 images need integer values 0..255")
        x = x.astype(g["x"].dtype, copy=False)
        g["x"][start:start + n] = x
        g["y"][start:start + n] = y.astype(Y_DTYPE, copy=False)
        self._written[name][start:start + n] = True
        if self._stats is not None and name == "train":
            self._stats.update(x)

    def _finish(self) -> None:
        missing = [s for s in REQUIRED_SPLITS if s not in self._written]
        if missing:
            raise DatasetError(f"{self.path}: splits {missing} were never created")
        for name, mask in self._written.items():
            if not mask.all():
                raise DatasetError(f"{self.path}: split {name!r} has {int((~mask).sum())} "
                                   "rows never written")
        norm = self.normalisation
        if norm == "auto":
            norm = self._stats.normalisation()
        elif norm is None:
            norm = Normalisation()
        elif not isinstance(norm, Normalisation):
            raise DatasetError(f"normalisation must be a Normalisation, 'auto' or None, got {norm!r}")
        norm.check_channels(self._ds("train", "x").shape)
        a = self._f.attrs
        a["format"] = FORMAT_NAME
        a["format_version"] = FORMAT_VERSION
        a["source"] = self.source
        a["class_names"] = np.array(self.class_names, dtype=h5py.string_dtype())
        a["num_classes"] = len(self.class_names)
        a["layout"] = "NCHW" if self._ds("train", "x").ndim == 4 else "ND"
        for k, v in norm.to_attrs().items():
            a[k] = v

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._finish()
            self._f.close()
        except BaseException:
            self._f.close()
            os.unlink(self._tmp)
            raise
        if exc_type is not None:
            os.unlink(self._tmp)
            return False
        # flush to disk before the rename so a crash never leaves a truncated file in place
        with open(self._tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, self.path)
        return False


def write_dataset(path, train, test, *, class_names, source: str, normalisation="auto",
                  compression=None, compression_opts=None, chunk_bytes: int = CHUNK_BYTES,
                  extra_splits=None, encrypt_key=None) -> str:
    """Write in-memory arrays as an mpifc dataset; returns ``path``.

    Parameters
    ----------
    train, test : (x, y) with x (N, C, H, W) uint8 or (N, D) float32 and y (N,) int
    extra_splits : optional {name: (x, y)}, e.g. ``{"val": (xv, yv)}``
    Other parameters as for :class:`DatasetWriter`.
    """
    splits = {"train": train, "test": test, **(extra_splits or {})}
    with DatasetWriter(path, class_names=class_names, source=source, normalisation=normalisation,
                       compression=compression, compression_opts=compression_opts,
                       chunk_bytes=chunk_bytes, encrypt_key=encrypt_key) as w:
        for name, (x, y) in splits.items():
            x = np.asarray(x)
            dtype = np.uint8 if x.dtype == np.uint8 else np.float32
            w.create_split(name, x.shape[0], x.shape[1:], dtype)
            w.write(name, 0, x, y)
    return os.fspath(path)


# ---------------------------------------------------------------------------- reader

@dataclass(frozen=True)
class SplitInfo:
    """Shape and dtype of one split: ``x`` (n, *sample_shape) of ``dtype``."""

    name: str
    n: int
    sample_shape: tuple
    dtype: np.dtype
    chunks: tuple | None
    compression: str | None
    tokens: int | None = None      # text splits: total token count (x is ragged)


@dataclass(frozen=True)
class DatasetInfo:
    """Everything a reader needs besides the rows themselves."""

    path: str
    version: int
    source: str
    class_names: tuple
    normalisation: Normalisation
    splits: dict
    encryption: str = ""        # "AES-256-GCM, key id ..." for an encrypted file
    layout: str = "dense"          # "text": ragged token ids, see mpifc/data/textformat.py
    vocab_size: int | None = None  # text only

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_shape(self) -> tuple:
        return self.splits["train"].sample_shape

    def split(self, name: str) -> SplitInfo:
        try:
            return self.splits[name]
        except KeyError:
            raise DatasetError(f"{self.path}: no split {name!r}; it has {sorted(self.splits)}") from None


def _as_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _fail(path, msg):
    raise DatasetError(f"{path}: {msg}")


def validate(f: h5py.File, path: str, check_labels: bool = True, key=None) -> DatasetInfo:
    """Check an open file against the format and return its :class:`DatasetInfo`.

    Raises :class:`DatasetError` naming the file and the first problem found: wrong
    format tag or version, missing ``train``/``test`` group or ``x``/``y`` dataset,
    wrong dtype or rank, x/y row counts that differ, samples that differ between
    splits, labels outside ``[0, num_classes)`` (read in blocks when ``check_labels``).
    An encrypted file is described from its clear metadata; its labels are checked only
    when ``key`` (a DataKey) is given, and a wrong key is refused first.
    """
    from mpifc.security.inputs import problems     # security: links out, absent bytes
    bad = problems(f)
    if bad:
        _fail(path, "refused: " + "; ".join(bad) + " (only self-contained mpifc files are read)")
    a = f.attrs
    if _as_str(a.get("format", "")) != FORMAT_NAME:
        _fail(path, f"not an mpifc dataset (attribute format={a.get('format')!r}, expected "
                    f"{FORMAT_NAME!r})")
    version = int(a.get("format_version", -1))
    if version != FORMAT_VERSION:
        _fail(path, f"format version {version} is not supported (this mpifc reads {FORMAT_VERSION})")
    if _as_str(a.get("layout", "")) == "text":
        from mpifc.data.textformat import validate_text
        return validate_text(f, path, check_labels=check_labels)
    if "class_names" not in a:
        _fail(path, "missing attribute 'class_names'")
    class_names = tuple(_as_str(c) for c in np.atleast_1d(a["class_names"]))
    if not class_names:
        _fail(path, "attribute 'class_names' is empty")
    norm = Normalisation.from_attrs(a, path)
    encryption = crypt.describe_file(f)       # --- encryption at rest
    if encryption and key is not None:
        crypt.check_key(f, key, path, "data.key_file or data.key_env", accept_clear=True)
    check_labels = check_labels and (not encryption or key is not None)
    splits = {}
    names = list(REQUIRED_SPLITS) + [k for k in f.keys() if k not in REQUIRED_SPLITS]
    for name in names:
        if name not in f:
            _fail(path, f"missing group '/{name}'")
        g = f[name]
        if not isinstance(g, h5py.Group):
            _fail(path, f"'/{name}' is not a group")
        for d in ("x", "y"):
            if d not in g or not isinstance(g[d], h5py.Dataset):
                _fail(path, f"missing dataset '/{name}/{d}'")
        x, y = (crypt.EncryptedArray(g[d], key) if crypt.is_encrypted(g[d]) else g[d]
                for d in ("x", "y"))
        if x.dtype not in X_DTYPES:
            _fail(path, f"'/{name}/x' has dtype {x.dtype}; expected uint8 or float32")
        if x.ndim not in (2, 4):
            _fail(path, f"'/{name}/x' has shape {x.shape}; expected (N, C, H, W) or (N, D)")
        if x.dtype == np.uint8 and x.ndim != 4:
            _fail(path, f"'/{name}/x' is uint8 but not (N, C, H, W): {x.shape}")
        if y.dtype != Y_DTYPE:
            _fail(path, f"'/{name}/y' has dtype {y.dtype}; expected int64")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            _fail(path, f"'/{name}/x' has {x.shape[0]} rows but '/{name}/y' has shape {y.shape}")
        if x.shape[0] == 0:
            _fail(path, f"split '/{name}' is empty")
        if splits:
            first = splits["train"]
            if x.shape[1:] != first.sample_shape or x.dtype != first.dtype:
                _fail(path, f"'/{name}/x' samples {x.shape[1:]} {x.dtype} differ from "
                            f"'/train/x' {first.sample_shape} {first.dtype}")
        if check_labels:
            step = chunk_rows((), Y_DTYPE, y.shape[0], 8 * CHUNK_BYTES)
            for s in range(0, y.shape[0], step):
                blk = y[s:s + step]
                lo, hi = int(blk.min()), int(blk.max())
                if lo < 0 or hi >= len(class_names):
                    bad = s + int(np.flatnonzero((blk < 0) | (blk >= len(class_names)))[0])
                    _fail(path, f"'/{name}/y'[{bad}] = {int(y[bad])} is outside [0, "
                                f"{len(class_names)}) (num_classes from class_names)")
        splits[name] = SplitInfo(name, int(x.shape[0]), tuple(x.shape[1:]), x.dtype, x.chunks,
                                 x.compression)
    try:
        norm.check_channels((1,) + splits["train"].sample_shape)
    except DatasetError as e:
        _fail(path, str(e))
    return DatasetInfo(path=path, version=version, source=_as_str(a.get("source", "")),
                       class_names=class_names, normalisation=norm, splits=splits,
                       encryption=encryption)


def open_dataset(path, check_labels: bool = True, key=None) -> tuple[h5py.File, DatasetInfo]:
    """Open ``path`` read-only and validate it; returns (open h5py.File, DatasetInfo).

    The caller closes the file. Raises :class:`DatasetError` for a missing or
    unreadable file and for anything :func:`validate` rejects (``key``: see there).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such dataset file (create one with "
                           "`mpifc data prepare digits`)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        return f, validate(f, path, check_labels=check_labels, key=key)
    except crypt.CryptError as e:
        f.close()
        raise DatasetError(str(e) if path in str(e) else f"{path}: {e}") from None
    except BaseException:
        f.close()
        raise


def read_info(path, check_labels: bool = True, key=None) -> DatasetInfo:
    """Validate ``path`` and return its :class:`DatasetInfo` (the file is closed again)."""
    f, info = open_dataset(path, check_labels=check_labels, key=key)
    f.close()
    return info


def read_split(path, name: str = "train", key=None) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole split into memory: (x (N, ...) stored dtype, y (N,) int64).

    ``key``: the DataKey of an encrypted file (required for one). Text datasets
    (clear only): x is (tokens (T,) int32, offsets (N+1,) int64)."""
    f, info = open_dataset(path, key=key)
    with f:
        info.split(name)
        if info.layout == "text":
            g = f[name]
            return (g["tokens"][...], g["offsets"][...]), g["y"][...]
        try:
            crypt.check_key(f, key, path, "key", accept_clear=True)
            return tuple(crypt.open_array(f[name][d], key)[...] for d in ("x", "y"))
        except crypt.CryptError as e:
            raise DatasetError(str(e)) from None
