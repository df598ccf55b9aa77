"""Converters to the mpifc HDF5 dataset format (behind ``mpifc data prepare NAME``).

Each ``prepare_*`` function writes one file and returns its path. Input files are
checked as they are parsed; a missing, truncated or malformed file raises
:class:`~mpifc.data.format.DatasetError` naming the file and what is wrong.
``encrypt_key`` (a :class:`mpifc.security.crypt.DataKey`) writes the file encrypted.

Shape letters: N samples, C channels, H/W height/width, D features, K classes.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle

import numpy as np

from mpifc.data.format import DatasetError, DatasetWriter, chunk_rows

MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

# ---------------------------------------------------------------------------- digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def prepare_digits(out, *, test_fraction: float = DIGITS_TEST_FRACTION,
                   seed: int = DIGITS_SPLIT_SEED, compression=None, encrypt_key=None) -> str:
    """scikit-learn's bundled copy of the UCI handwritten digits (1797 images, offline).

    Images are 8x8, one channel, values 0..16; they are stored unchanged as uint8
    (N, 1, 8, 8) and the per-channel mean/std of the train split is recorded as the
    normalisation. Split: a permutation from ``numpy.random.default_rng(seed)``; its
    first ``round(test_fraction * N)`` indices are the test set (359 of 1797 with
    the defaults), the rest, in the permuted order, the train set.

    Returns
    -------
    str, the output path
    """
    from sklearn.datasets import load_digits  # noqa: PLC0415 - heavy import, only here

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = d.images.astype(np.uint8).reshape(-1, 1, 8, 8)   # exact: values are integers 0..16
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    n_test = int(round(test_fraction * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    src = (f"scikit-learn {_sklearn_version()} load_digits (UCI optdigits test set, 8x8, "
           f"values 0..16); split: default_rng({seed}).permutation, first {n_test} = test")
    with DatasetWriter(out, class_names=MNIST_CLASSES, source=src,
                       compression=compression, encrypt_key=encrypt_key) as w:
        for name, idx in (("train", tr), ("test", te)):
            w.create_split(name, idx.size, (1, 8, 8), np.uint8)
            w.write(name, 0, x[idx], y[idx])
    return os.fspath(out)


def _sklearn_version() -> str:
    import sklearn  # noqa: PLC0415

    return sklearn.__version__


# ---------------------------------------------------------------------------- IDX (MNIST)

# IDX type byte -> big-endian dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path) -> bytes:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as e:   # bad gzip header or truncated gzip stream
        raise DatasetError(f"{path}: cannot read ({e})") from None


def read_idx(path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into an array of its native shape.

    Layout: magic = two zero bytes, a type byte, a byte with the number of dims;
    then each dim as a big-endian uint32; then the data, big-endian, row major.

    Raises
    ------
    DatasetError
        wrong magic, unknown type, truncated header or data, or trailing bytes.
    """
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise DatasetError(f"{path}: truncated IDX header ({len(buf)} bytes)")
    if buf[0] != 0 or buf[1] != 0:
        raise DatasetError(f"{path}: bad IDX magic {buf[:4].hex()} (must start with 0000)")
    typ, ndim = buf[2], buf[3]
    if typ not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX data type 0x{typ:02x}")
    if ndim < 1:
        raise DatasetError(f"{path}: IDX file with 0 dimensions")
    head = 4 + 4 * ndim
    if len(buf) < head:
        raise DatasetError(f"{path}: truncated IDX header (needs {head} bytes, has {len(buf)})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dt = np.dtype(_IDX_DTYPES[typ])
    need = head + int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if len(buf) != need:
        what = "truncated" if len(buf) < need else "has trailing bytes"
        raise DatasetError(f"{path}: IDX data {what}: dims {dims} of {dt.str} need {need} bytes, "
                           f"file has {len(buf)}")
    return np.frombuffer(buf, dtype=dt, offset=head).reshape(dims).astype(dt.newbyteorder("="))


def _find(src_dir, stems) -> str:
    """First existing file among ``stems`` with or without ``.gz`` in ``src_dir``."""
    for stem in stems:
        for name in (stem, stem + ".gz"):
            p = os.path.join(src_dir, name)
            if os.path.isfile(p):
                return p
    raise DatasetError(f"{src_dir}: none of {[s + '[.gz]' for s in stems]} found")


def prepare_mnist(src_dir, out, *, class_names=MNIST_CLASSES, compression=None,
                  source: str = "MNIST (IDX files)", encrypt_key=None) -> str:
    """MNIST (or Fashion-MNIST, same files) from the four standard IDX files.

    ``src_dir`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``
    (``train-images.idx3-ubyte`` spelling accepted too). Images are stored as uint8
    (N, 1, H, W); normalisation is the train split's mean/std.

    Returns
    -------
    str, the output path
    """
    src_dir = os.fspath(src_dir)
    if not os.path.isdir(src_dir):
        raise DatasetError(f"{src_dir}: MNIST source directory does not exist")
    splits = {}
    for name, prefix in (("train", "train"), ("test", "t10k")):
        ip = _find(src_dir, (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"))
        lp = _find(src_dir, (f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"))
        x, y = read_idx(ip), read_idx(lp)
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DatasetError(f"{ip}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.dtype != np.uint8:
            raise DatasetError(f"{lp}: expected uint8 labels (N,), got {y.dtype} {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise DatasetError(f"{ip} has {x.shape[0]} images but {lp} has {y.shape[0]} labels")
        if y.size and y.max() >= len(class_names):
            raise DatasetError(f"{lp}: label {int(y.max())} >= {len(class_names)} classes")
        splits[name] = (x[:, None], y.astype(np.int64))
    if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
        raise DatasetError(f"{src_dir}: train images {splits['train'][0].shape[2:]} and test "
                           f"images {splits['test'][0].shape[2:]} differ in size")
    with DatasetWriter(out, class_names=class_names, source=f"{source} from {src_dir}",
                       compression=compression, encrypt_key=encrypt_key) as w:
        for name, (x, y) in splits.items():
            w.create_split(name, x.shape[0], x.shape[1:], np.uint8)
            w.write(name, 0, x, y)
    return os.fspath(out)


# ---------------------------------------------------------------------------- CIFAR-10 pickles

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain containers and NumPy arrays only.

    ``pickle`` runs whatever callables a file names; a downloaded batch file is
    untrusted input, so only the NumPy reconstructors an array pickle needs are allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_pickle(path) -> dict:
    buf = _read_bytes(path)
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(buf), encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError (truncated), ValueError, ...
        raise DatasetError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(obj).__name__}")
    # Python 2 pickles (the official files) have bytes keys
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar_batch(path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: ``data`` (N, 3072) uint8, ``labels`` (N,).

    Returns
    -------
    x : (N, 3, 32, 32) uint8 (rows are R, G, B planes of 32x32, row major)
    y : (N,) int64
    """
    d = _load_pickle(path)
    for key in ("data", "labels"):
        if key not in d:
            raise DatasetError(f"{path}: missing key {key!r} (has {sorted(map(str, d))})")
    x = np.asarray(d["data"])
    y = np.asarray(d["labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 (N, 3072), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: 'labels' must be {x.shape[0]} integers, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(f"{path}: labels outside [0, {num_classes})")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def prepare_cifar10(src_dir, out, *, compression=None, encrypt_key=None) -> str:
    """CIFAR-10 from the python-pickle batches (``cifar-10-batches-py``).

    ``src_dir`` is the extracted ``cifar-10-batches-py`` directory (or its parent) with
    ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``. Images are
    stored as uint8 (N, 3, 32, 32); class names come from ``batches.meta``;
    normalisation is the per-channel mean/std of the train split.

    Returns
    -------
    str, the output path
    """
    src_dir = os.fspath(src_dir)
    if os.path.isdir(os.path.join(src_dir, "cifar-10-batches-py")):
        src_dir = os.path.join(src_dir, "cifar-10-batches-py")
    if not os.path.isdir(src_dir):
        raise DatasetError(f"{src_dir}: CIFAR-10 source directory does not exist")
    train_files = [os.path.join(src_dir, f"data_batch_{i}") for i in range(1, 6)]
    test_files = [os.path.join(src_dir, "test_batch")]
    meta_path = os.path.join(src_dir, "batches.meta")
    missing = [p for p in train_files + test_files + [meta_path] if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{src_dir}: missing CIFAR-10 files {[os.path.basename(p) for p in missing]}")
    meta = _load_pickle(meta_path)
    if "label_names" not in meta:
        raise DatasetError(f"{meta_path}: missing key 'label_names'")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    if len(names) != 10:
        raise DatasetError(f"{meta_path}: expected 10 label names, got {len(names)}")
    # one split in memory at a time (CIFAR-10 train: 150 MB of uint8)
    with DatasetWriter(out, class_names=names, source=f"CIFAR-10 python batches from {src_dir}",
                       compression=compression, encrypt_key=encrypt_key) as w:
        for split, files in (("train", train_files), ("test", test_files)):
            parts = [read_cifar_batch(p) for p in files]
            w.create_split(split, sum(x.shape[0] for x, _ in parts), (3, 32, 32), np.uint8)
            start = 0
            for x, y in parts:
                w.write(split, start, x, y)
                start += x.shape[0]
            del parts
    return os.fspath(out)


# ---------------------------------------------------------------------------- synthetic

def prepare_synthetic(out, *, n_train: int = 10000, n_test: int = 2000, shape=(3, 32, 32),
                      num_classes: int = 10, seed: int = 0, noise: float = 0.5,
                      compression=None, encrypt_key=None) -> str:
    """Learnable synthetic data of any size, for benchmarks: class prototypes + noise.

    Each class k has a prototype ``p_k`` drawn from ``default_rng(seed)``; a sample of
    class k is ``p_k + noise * e`` with e standard normal. Images (``shape`` = (C, H, W))
    use smooth prototypes (a random low-resolution pattern upsampled, so convolutions
    have spatial structure to find), mapped to uint8 via ``128 + 48 * v`` clipped;
    features (``shape`` = (D,)) are stored as float32. Rows are generated and written in
    ~1 MiB blocks, each block from its own seeded generator, so memory stays bounded
    and the file depends only on the arguments.

    Parameters
    ----------
    shape : (C, H, W) for uint8 images or (D,) for float32 features
    noise : standard deviation of the noise relative to the prototypes' (1.0)

    Returns
    -------
    str, the output path
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) or (D,) with positive sizes, got {shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    images = len(shape) == 3
    rng = np.random.default_rng(seed)
    if images:
        c, h, wd = shape
        lo_h, lo_w = max(1, h // 4), max(1, wd // 4)
        coarse = rng.standard_normal((num_classes, c, lo_h, lo_w))
        # nearest-neighbour upsampling to (H, W): blocky, smooth patterns per class
        rows = np.minimum(np.arange(h) * lo_h // h, lo_h - 1)
        cols = np.minimum(np.arange(wd) * lo_w // wd, lo_w - 1)
        protos = coarse[:, :, rows][:, :, :, cols].astype(np.float32)
    else:
        protos = rng.standard_normal((num_classes,) + shape).astype(np.float32)
    dtype = np.uint8 if images else np.float32
    block = chunk_rows(shape, dtype, max(n_train, n_test))
    src = (f"synthetic prototypes+noise: shape={shape} classes={num_classes} seed={seed} "
           f"noise={noise}")
    names = [f"class{k}" for k in range(num_classes)]
    with DatasetWriter(out, class_names=names, source=src, compression=compression,
                       encrypt_key=encrypt_key) as w:
        for s_idx, (split, n) in enumerate((("train", n_train), ("test", n_test))):
            w.create_split(split, n, shape, dtype)
            for b, start in enumerate(range(0, n, block)):
                g = np.random.default_rng([seed, s_idx + 1, b])
                m = min(block, n - start)
                y = g.integers(0, num_classes, size=m)
                # float32 noise: half the time and memory of float64, plenty for benchmarks
                v = protos[y] + np.float32(noise) * g.standard_normal((m,) + shape, dtype=np.float32)
                x = np.clip(np.rint(128.0 + 48.0 * v), 0, 255) if images else v
                w.write(split, start, x.astype(dtype), y)
    return os.fspath(out)


CONVERTERS = {
    "digits": prepare_digits,
    "mnist": prepare_mnist,
    "cifar10": prepare_cifar10,
    "synthetic": prepare_synthetic,
}
