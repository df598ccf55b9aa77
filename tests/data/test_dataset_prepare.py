"""Converters: digits (real, bundled), MNIST IDX, CIFAR-10 pickles, synthetic; bad inputs."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from mpifc.data.format import DatasetError, read_info, read_split
from mpifc.data.prepare import (CIFAR10_CLASSES, prepare_cifar10, prepare_digits, prepare_mnist,
                                prepare_synthetic, read_idx)


# ---------------------------------------------------------------------------- digits (real data)

def test_digits_real(tmp_path):
    p = prepare_digits(tmp_path / "digits.h5")
    assert p == str(tmp_path / "digits.h5")
    info = read_info(p)
    assert info.split("train").n == 1438 and info.split("test").n == 359
    assert info.sample_shape == (1, 8, 8) and info.split("train").dtype == np.uint8
    assert info.class_names == tuple("0123456789")
    xtr, ytr = read_split(p, "train")
    xte, yte = read_split(p, "test")
    assert xtr.max() == 16 and xtr.min() == 0                  # stored unscaled, 0..16
    assert set(np.unique(ytr)) == set(range(10)) and set(np.unique(yte)) == set(range(10))
    np.testing.assert_allclose(info.normalisation.mean, [xtr.mean()])
    # the split is a partition of sklearn's 1797 images, and deterministic
    from sklearn.datasets import load_digits
    d = load_digits()
    allx = np.concatenate([xtr, xte]).reshape(-1, 64)
    assert sorted(map(bytes, allx)) == sorted(map(bytes, d.images.astype(np.uint8).reshape(-1, 64)))
    p2 = prepare_digits(tmp_path / "again.h5")
    np.testing.assert_array_equal(read_split(p2, "test")[1], yte)


# ---------------------------------------------------------------------------- MNIST IDX

def idx_bytes(a: np.ndarray, type_byte=0x08) -> bytes:
    head = bytes([0, 0, type_byte, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_mnist(d, n_train=12, n_test=5, hw=(6, 7), gz=False, dotted=False, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n,) + hw, dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        sep = "." if dotted else "-"
        for kind, a, t in (("images", x, "idx3"), ("labels", y, "idx1")):
            name = f"{prefix}-{kind}{sep}{t}-ubyte" + (".gz" if gz else "")
            data = idx_bytes(a)
            (d / name).write_bytes(gzip.compress(data) if gz else data)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("gz, dotted", [(False, False), (True, False), (False, True)])
def test_mnist_from_idx(tmp_path, gz, dotted):
    ref = write_mnist(tmp_path / "src", gz=gz, dotted=dotted)
    p = prepare_mnist(tmp_path / "src", tmp_path / "mnist.h5", compression="gzip")
    info = read_info(p)
    assert info.sample_shape == (1, 6, 7) and info.split("test").compression == "gzip"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = read_split(p, split)
        np.testing.assert_array_equal(x[:, 0], ref[prefix][0])
        np.testing.assert_array_equal(y, ref[prefix][1])


def test_read_idx_types():
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.idx")
        with open(path, "wb") as fh:
            fh.write(idx_bytes(a, 0x0C))
        b = read_idx(path)
    assert b.dtype == np.int32 and b.dtype.isnative
    np.testing.assert_array_equal(b, a)


def _corrupt(path, fn):
    path.write_bytes(fn(path.read_bytes()))


@pytest.mark.parametrize("name, fn, msg", [
    ("train-images-idx3-ubyte", lambda b: b"\x08\x03" + b[2:], "bad IDX magic"),
    ("train-images-idx3-ubyte", lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX data type"),
    ("train-images-idx3-ubyte", lambda b: b[:-5], "truncated"),
    ("train-images-idx3-ubyte", lambda b: b[:9], "truncated IDX header"),
    ("train-labels-idx1-ubyte", lambda b: b + b"\x00", "trailing bytes"),
    ("t10k-labels-idx1-ubyte", lambda b: b[:7] + b"\x04" + b[8:-1], "5 images but .* 4 labels"),
    ("t10k-labels-idx1-ubyte", lambda b: b[:-1] + b"\x0a", "label 10 >= 10"),
    ("train-labels-idx1-ubyte", lambda b: b[:2] + b"\x0c" + b[3:8] + b"\0" * 48,
     "expected uint8 labels"),
])
def test_mnist_malformed(tmp_path, name, fn, msg):
    write_mnist(tmp_path)
    _corrupt(tmp_path / name, fn)
    with pytest.raises(DatasetError, match=msg) as e:
        prepare_mnist(tmp_path, tmp_path / "out.h5")
    assert name in str(e.value)
    assert not (tmp_path / "out.h5").exists()


def test_mnist_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        prepare_mnist(tmp_path / "none", tmp_path / "o.h5")
    write_mnist(tmp_path)
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        prepare_mnist(tmp_path, tmp_path / "o.h5")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="cannot read"):
        prepare_mnist(tmp_path, tmp_path / "o.h5")


# ---------------------------------------------------------------------------- CIFAR-10 pickles

def write_cifar(d, n=4, seed=0):
    """Batches shaped like the official ones (bytes keys, protocol 2), n rows each."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    ref = {"train": [], "test": []}
    names = ["data_batch_%d" % i for i in range(1, 6)] + ["test_batch"]
    for name in names:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        with open(d / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x,
                         b"filenames": [b"f"] * n}, fh, protocol=2)
        ref["test" if name == "test_batch" else "train"].append((x, y))
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                     b"num_cases_per_batch": n, b"num_vis": 3072}, fh, protocol=2)
    return {k: (np.concatenate([x for x, _ in v]), np.concatenate([y for _, y in v]))
            for k, v in ref.items()}


def test_cifar10_from_pickles(tmp_path):
    ref = write_cifar(tmp_path / "cifar-10-batches-py")
    p = prepare_cifar10(tmp_path, tmp_path / "c.h5")           # parent directory works too
    info = read_info(p)
    assert info.class_names == CIFAR10_CLASSES
    assert info.split("train").n == 20 and info.split("test").n == 4
    for split in ("train", "test"):
        x, y = read_split(p, split)
        assert x.shape[1:] == (3, 32, 32)
        np.testing.assert_array_equal(x.reshape(-1, 3072), ref[split][0])
        np.testing.assert_array_equal(x[:, 1], ref[split][0][:, 1024:2048].reshape(-1, 32, 32))
        np.testing.assert_array_equal(y, ref[split][1])
    np.testing.assert_allclose(info.normalisation.mean,
                               ref["train"][0].reshape(-1, 3, 1024).mean(axis=(0, 2)))


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())      # harmless stand-in for os.system


@pytest.mark.parametrize("name, payload, msg", [
    ("test_batch", lambda b: b[: len(b) // 2], "not a CIFAR python pickle"),
    ("data_batch_3", lambda b: pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                             b"labels": [0, 1]}), r"uint8 \(N, 3072\)"),
    ("data_batch_3", lambda b: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                             b"labels": [0]}), "'labels' must be 2"),
    ("data_batch_3", lambda b: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                             b"labels": [0, 10]}), "labels outside"),
    ("data_batch_1", lambda b: pickle.dumps({b"labels": [0]}), "missing key 'data'"),
    ("data_batch_1", lambda b: pickle.dumps([1, 2]), "expected a dict"),
    ("batches.meta", lambda b: pickle.dumps({b"label_names": [b"a"]}), "10 label names"),
    ("data_batch_2", lambda b: pickle.dumps({b"data": _Evil()}), "refusing to load global"),
])
def test_cifar10_malformed(tmp_path, name, payload, msg):
    write_cifar(tmp_path)
    _corrupt(tmp_path / name, payload)
    with pytest.raises(DatasetError, match=msg) as e:
        prepare_cifar10(tmp_path, tmp_path / "o.h5")
    assert name in str(e.value)
    assert not (tmp_path / "o.h5").exists()


def test_cifar10_missing_files(tmp_path):
    write_cifar(tmp_path)
    os.remove(tmp_path / "test_batch")
    with pytest.raises(DatasetError, match=r"missing CIFAR-10 files \['test_batch'\]"):
        prepare_cifar10(tmp_path, tmp_path / "o.h5")
    with pytest.raises(DatasetError, match="does not exist"):
        prepare_cifar10(tmp_path / "nope", tmp_path / "o.h5")


# ---------------------------------------------------------------------------- synthetic

def nearest_mean_accuracy(p):
    """Train a nearest-class-mean classifier on train, score it on test."""
    xtr, ytr = read_split(p, "train")
    xte, yte = read_split(p, "test")
    xtr, xte = xtr.reshape(len(xtr), -1).astype(float), xte.reshape(len(xte), -1).astype(float)
    means = np.stack([xtr[ytr == k].mean(0) for k in range(int(ytr.max()) + 1)])
    pred = np.argmin(((xte[:, None] - means[None]) ** 2).sum(-1), axis=1)
    return (pred == yte).mean()


@pytest.mark.parametrize("shape", [(2, 8, 8), (16,)])
def test_synthetic_learnable_and_deterministic(tmp_path, shape):
    p = prepare_synthetic(tmp_path / "s.h5", n_train=400, n_test=100, shape=shape,
                          num_classes=5, seed=3, noise=0.8)
    info = read_info(p)
    assert info.sample_shape == shape and info.num_classes == 5
    assert info.split("train").dtype == (np.uint8 if len(shape) == 3 else np.float32)
    assert nearest_mean_accuracy(p) > 0.9
    q = prepare_synthetic(tmp_path / "t.h5", n_train=400, n_test=100, shape=shape,
                          num_classes=5, seed=3, noise=0.8)
    for split in ("train", "test"):
        for a, b in zip(read_split(p, split), read_split(q, split)):
            np.testing.assert_array_equal(a, b)
    r = prepare_synthetic(tmp_path / "u.h5", n_train=400, n_test=100, shape=shape,
                          num_classes=5, seed=4, noise=0.8)
    assert not np.array_equal(read_split(p, "train")[0], read_split(r, "train")[0])


def test_synthetic_streams_in_blocks(tmp_path):
    # rows of 3*64*64 = 12 KiB: 85 rows a block, so 300 rows take 4 blocks
    p = prepare_synthetic(tmp_path / "big.h5", n_train=300, n_test=3, shape=(3, 64, 64), seed=1)
    x, y = read_split(p, "train")
    assert x.shape == (300, 3, 64, 64) and read_info(p).split("train").chunks[0] == 85
    assert len(np.unique(y)) == 10 and x.std() > 10


def test_synthetic_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        prepare_synthetic(tmp_path / "s.h5", shape=(3, 8))
    with pytest.raises(ValueError, match="num_classes"):
        prepare_synthetic(tmp_path / "s.h5", num_classes=1)
    with pytest.raises(ValueError, match="n_train"):
        prepare_synthetic(tmp_path / "s.h5", n_test=0)
