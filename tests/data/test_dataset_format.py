"""HDF5 dataset format: round trips, attributes, chunking, compression, validation errors."""
import h5py
import numpy as np
import pytest

from mpifc.data.format import (CHUNK_BYTES, FORMAT_VERSION, DatasetError, DatasetWriter,
                               Normalisation, chunk_rows, open_dataset, read_info, read_split,
                               write_dataset)

NAMES = ["a", "b", "c"]


def images(n, shape=(3, 4, 5), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n,) + shape, dtype=np.uint8), rng.integers(0, 3, n)


def features(n, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 3, n)


def test_image_round_trip_and_attributes(tmp_path):
    tr, te = images(50), images(11, seed=1)
    p = write_dataset(tmp_path / "d.h5", tr, te, class_names=NAMES, source="unit test")
    info = read_info(p)
    assert info.version == FORMAT_VERSION
    assert info.class_names == tuple(NAMES) and info.num_classes == 3
    assert info.source == "unit test"
    assert info.sample_shape == (3, 4, 5)
    assert info.split("train").n == 50 and info.split("test").n == 11
    for name, (x, y) in (("train", tr), ("test", te)):
        xr, yr = read_split(p, name)
        np.testing.assert_array_equal(xr, x)
        np.testing.assert_array_equal(yr, y)
        assert xr.dtype == np.uint8 and yr.dtype == np.int64
    # "auto" normalisation: per-channel mean/std of the train split only
    x = tr[0].astype(np.float64)
    np.testing.assert_allclose(info.normalisation.mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(info.normalisation.std, x.std(axis=(0, 2, 3)), rtol=1e-9)
    with h5py.File(p, "r") as f:   # what h5dump / HDFView show
        assert f.attrs["format"] == "mpifc-dataset"
        assert f.attrs["layout"] == "NCHW"
        assert list(f.attrs["class_names"]) == NAMES


def test_feature_round_trip_with_scale_normalisation(tmp_path):
    tr, te = features(40), features(9, seed=2)
    norm = Normalisation.scale(0.5, offset=-1.0)
    p = write_dataset(tmp_path / "f.h5", tr, te, class_names=NAMES, source="s", normalisation=norm)
    info = read_info(p)
    assert info.normalisation.kind == "scale"
    assert info.normalisation.scale_offset == pytest.approx((0.5, -1.0))
    xr, _ = read_split(p, "train")
    np.testing.assert_array_equal(xr, tr[0])
    out = info.normalisation.apply(xr, np.float64)
    np.testing.assert_allclose(out, tr[0].astype(np.float64) * 0.5 - 1.0, rtol=1e-12)
    with h5py.File(p, "r") as f:
        assert f.attrs["layout"] == "ND"


def test_normalisation_apply_per_channel():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    norm = Normalisation.mean_std([1.0, 2.0, 3.0], [2.0, 4.0, 8.0])
    out = norm.apply(x, np.float32)
    ref = (x - np.array([1, 2, 3.0])[None, :, None, None]) / np.array([2, 4, 8.0])[None, :, None, None]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert Normalisation().apply(x, np.float64).dtype == np.float64
    with pytest.raises(DatasetError, match="std > 0"):
        Normalisation.mean_std([0.0], [0.0])


def test_chunks_near_one_mib(tmp_path):
    # 3*32*32 = 3072 bytes a row: 341 rows = 1.0 MiB; y: 131072 int64 a chunk, capped at N
    n = 2000
    x = np.zeros((n, 3, 32, 32), np.uint8)
    p = write_dataset(tmp_path / "c.h5", (x, np.zeros(n, int)), (x[:5], np.zeros(5, int)),
                      class_names=NAMES, source="s", normalisation=None)
    info = read_info(p)
    rows = info.split("train").chunks[0]
    assert info.split("train").chunks[1:] == (3, 32, 32)        # whole rows along N
    assert 0.5 * CHUNK_BYTES <= rows * 3072 <= 1.5 * CHUNK_BYTES, rows
    assert info.split("test").chunks[0] == 5                    # small split: one chunk
    with h5py.File(p, "r") as f:
        assert f["train/y"].chunks == (n,)
    assert chunk_rows((10_000_000,), np.float32, 7) == 1        # huge rows: one row a chunk
    assert chunk_rows((), np.int64, 10**7) == CHUNK_BYTES // 8


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compression(tmp_path, compression):
    tr = (np.zeros((300, 1, 16, 16), np.uint8), np.zeros(300, int))   # compresses well
    p = write_dataset(tmp_path / "z.h5", tr, tr, class_names=NAMES, source="s",
                      compression=compression, normalisation=None)
    info = read_info(p)
    assert info.split("train").compression == compression
    np.testing.assert_array_equal(read_split(p, "train")[0], tr[0])
    with h5py.File(p, "r") as f:
        assert f["train/x"].id.get_storage_size() < f["train/x"].nbytes / 10
    with pytest.raises(DatasetError, match="compression"):
        write_dataset(tmp_path / "bad.h5", tr, tr, class_names=NAMES, source="s", compression="zstd")


def test_streaming_writer_and_extra_split(tmp_path):
    x, y = images(30)
    with DatasetWriter(tmp_path / "w.h5", class_names=NAMES, source="s") as w:
        for name in ("train", "test", "val"):
            w.create_split(name, 30, x.shape[1:], np.uint8)
            for s in range(0, 30, 7):                                   # blocks, any order
                w.write(name, s, x[s:s + 7], y[s:s + 7])
    info = read_info(tmp_path / "w.h5")
    assert set(info.splits) == {"train", "test", "val"}
    np.testing.assert_array_equal(read_split(tmp_path / "w.h5", "val")[0], x)
    np.testing.assert_allclose(info.normalisation.mean, x.astype(float).mean(axis=(0, 2, 3)))


def test_writer_errors_leave_no_file(tmp_path):
    x, y = images(10)
    out = tmp_path / "e.h5"
    cases = [
        (lambda w: (w.create_split("train", 10, x.shape[1:], np.uint8),
                    w.write("train", 0, x, y + 5)), "labels in"),
        (lambda w: (w.create_split("train", 10, x.shape[1:], np.uint8),
                    w.write("train", 0, x, y[:9])), "y has shape"),
        (lambda w: w.create_split("train", 10, x.shape[1:], np.float64), "dtype"),
        (lambda w: w.create_split("train", 10, (3, 4), np.uint8), "samples must be"),
        (lambda w: (w.create_split("train", 10, (2,), np.uint8)), "samples must be|uint8"),
        (lambda w: (w.create_split("train", 10, x.shape[1:], np.uint8),
                    w.write("train", 0, x.astype(float) + 0.5, y)), "integer values"),
        (lambda w: (w.create_split("train", 10, x.shape[1:], np.uint8),
                    w.create_split("test", 10, (3, 4, 4), np.uint8)), "differ from"),
        (lambda w: w.create_split("train", 10, x.shape[1:], np.uint8), "never created"),
        (lambda w: (w.create_split("train", 10, x.shape[1:], np.uint8),
                    w.create_split("test", 10, x.shape[1:], np.uint8),
                    w.write("train", 0, x, y), w.write("test", 0, x[:9], y[:9])), "never written"),
    ]
    for act, msg in cases:
        with pytest.raises(DatasetError, match=msg):
            with DatasetWriter(out, class_names=NAMES, source="s") as w:
                act(w)
        assert list(tmp_path.iterdir()) == [], msg    # no file, no temporary left behind


def _valid(tmp_path):
    tr, te = images(20), images(6, seed=3)
    return write_dataset(tmp_path / "v.h5", tr, te, class_names=NAMES, source="s")


@pytest.mark.parametrize("mutate, msg", [
    (lambda f: f.__delitem__("test"), "missing group '/test'"),
    (lambda f: f["train"].__delitem__("y"), "missing dataset '/train/y'"),
    (lambda f: (f["train"].__delitem__("x"),
                f["train"].create_dataset("x", data=np.zeros((20, 3, 4, 5)))), "dtype float64"),
    (lambda f: (f["train"].__delitem__("y"),
                f["train"].create_dataset("y", data=np.zeros(20, np.int32))), "dtype int32"),
    (lambda f: (f["train"].__delitem__("y"),
                f["train"].create_dataset("y", data=np.zeros(19, np.int64))), "20 rows"),
    (lambda f: f["test/y"].__setitem__(4, 3), r"'/test/y'\[4\] = 3 is outside \[0, 3\)"),
    (lambda f: f["train/y"].__setitem__(0, -1), "outside"),
    (lambda f: (f["test"].__delitem__("x"),
                f["test"].create_dataset("x", data=np.zeros((6, 3, 4, 4), np.uint8))), "differ from"),
    (lambda f: f.attrs.__setitem__("format_version", 99), "version 99"),
    (lambda f: f.attrs.__setitem__("format", "other"), "not an mpifc dataset"),
    (lambda f: f.attrs.__delitem__("class_names"), "class_names"),
    (lambda f: f.attrs.__delitem__("norm_std"), "norm_std"),
    (lambda f: f.attrs.__setitem__("norm_mean", np.zeros(2)), "mean .* and std"),
])
def test_reader_rejects_malformed(tmp_path, mutate, msg):
    p = _valid(tmp_path)
    with h5py.File(p, "a") as f:
        mutate(f)
    with pytest.raises(DatasetError, match=msg) as e:
        read_info(p)
    assert str(p) in str(e.value)            # the message names the file


def test_reader_missing_and_non_hdf5(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset file"):
        open_dataset(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DatasetError, match="not a readable HDF5 file"):
        open_dataset(tmp_path / "junk.h5")
    with pytest.raises(DatasetError, match="no split 'val'"):
        read_split(_valid(tmp_path), "val")
