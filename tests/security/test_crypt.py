"""Encryption at rest, on one process: keys, encrypted arrays, tampering, datasets, CLI."""
import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest

pytest.importorskip("cryptography")

from mpifc.data import DatasetError, read_info, read_split, write_dataset  # noqa: E402
from mpifc.security import crypt  # noqa: E402
from mpifc.security.keys_data import generate_data_key  # noqa: E402


@pytest.fixture
def key(tmp_path):
    generate_data_key(tmp_path / "k")
    return crypt.read_key_file(tmp_path / "k")


@pytest.fixture
def other_key(tmp_path):
    generate_data_key(tmp_path / "k2")
    return crypt.read_key_file(tmp_path / "k2")


def _images(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8), rng.integers(0, 10, n)


def _write(path, key, chunk_bytes=4096, n=200):
    x, y = _images(n)
    write_dataset(path, (x, y), (x[:50], y[:50]), class_names=list("abcdefghij"), source="t",
                  chunk_bytes=chunk_bytes, encrypt_key=key)
    return x, y


# ---------------------------------------------------------------------------- keys

def test_generated_key_file_is_private_and_round_trips(tmp_path):
    kid = generate_data_key(tmp_path / "k")
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o600
    k = crypt.read_key_file(tmp_path / "k")
    assert k.key_id == kid and len(kid) == 16
    text = (tmp_path / "k").read_text().strip()
    assert len(text) == 64 and kid not in text            # the id is not a piece of the key
    with pytest.raises(crypt.CryptError, match="already exists"):
        generate_data_key(tmp_path / "k")


def test_raw_key_file_and_env_give_the_same_key(tmp_path, monkeypatch):
    raw = os.urandom(32)
    p = tmp_path / "raw"
    p.write_bytes(raw)
    os.chmod(p, 0o600)
    monkeypatch.setenv("MPIFC_TEST_KEY", raw.hex())
    assert crypt.read_key_file(p).key_id == crypt.read_key_env("MPIFC_TEST_KEY").key_id \
        == crypt.key_id(raw)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_group_or_world_readable_key_file_is_refused(tmp_path, mode):
    generate_data_key(tmp_path / "k")
    os.chmod(tmp_path / "k", mode)
    with pytest.raises(crypt.CryptError, match=r"accessible by group/others .*chmod 600"):
        crypt.read_key_file(tmp_path / "k")


def test_bad_key_sources_are_one_clear_line(tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.write_text("not a key\n")
    os.chmod(bad, 0o600)
    with pytest.raises(crypt.CryptError, match="32 raw bytes or 64 hex digits"):
        crypt.read_key_file(bad)
    with pytest.raises(crypt.CryptError, match="cannot be read"):
        crypt.read_key_file(tmp_path / "missing")
    monkeypatch.delenv("MPIFC_NO_SUCH_KEY", raising=False)
    with pytest.raises(crypt.CryptError, match="MPIFC_NO_SUCH_KEY is not set"):
        crypt.read_key_env("MPIFC_NO_SUCH_KEY")
    with pytest.raises(crypt.CryptError, match="only one of data.key_file and data.key_env"):
        crypt.resolve_key(str(bad), "X", "data.key")
    assert crypt.resolve_key("", "", "data.key") is None


def test_a_key_is_never_shown_or_pickled(key, tmp_path):
    text = (tmp_path / "k").read_text().strip()
    assert text not in repr(key) and key.key_id in repr(key)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(key)


def test_missing_cryptography_says_how_to_install(key, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(crypt.CryptError, match=r"pip install mpifc\[security\]"):
        key.aead()


# ---------------------------------------------------------------------------- arrays

@pytest.mark.parametrize("shape,dtype", [((37, 5, 3), np.float32), ((10,), np.int64),
                                         ((1,), np.float64), ((), np.float32), ((0, 4), np.float32)])
def test_encrypted_array_indexes_like_numpy(tmp_path, key, shape, dtype):
    full = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        arr = crypt.create_array(f, "/g/a", shape, dtype, key, chunk_bytes=64)
        if shape and shape[0] > 3:                 # rows in odd blocks, out of order
            arr[3:] = full[3:]
            arr[0:3] = full[:3]
        else:
            arr[...] = full
        assert arr.unwritten_chunks == []
    with h5py.File(tmp_path / "a.h5", "r") as f:
        arr = crypt.open_array(f["/g/a"], key)
        assert arr.shape == shape and arr.dtype == dtype
        np.testing.assert_array_equal(arr[...], full)
        if len(shape) == 3:
            idx = np.array([30, 2, 2, 17, 36])
            for sel in (7, slice(4, 29), slice(None, None, 3), idx, (slice(2, 9), 1, slice(0, 2)),
                        (idx, slice(None), 2), (Ellipsis, 1)):
                np.testing.assert_array_equal(arr[sel], full[sel])


def test_only_the_chunks_holding_the_rows_are_decrypted(tmp_path, key, monkeypatch):
    full = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        crypt.create_array(f, "a", full.shape, full.dtype, key, chunk_bytes=160)[...] = full
    seen = []
    orig = crypt.EncryptedArray._decrypt
    monkeypatch.setattr(crypt.EncryptedArray, "_decrypt", lambda self, k: seen.append(k)
                        or orig(self, k))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        arr = crypt.open_array(f["a"], key)
        assert arr.rows == 10
        np.testing.assert_array_equal(arr.read_rows(np.array([55, 12, 57, 19])), full[[55, 12, 57, 19]])
    assert sorted(seen) == [1, 5]


def test_cryptography_without_the_into_methods_gives_the_same_files(tmp_path, key):
    """cryptography < 45 has no encrypt_into/decrypt_into: the copying path reads and writes alike."""
    class Plain:                                 # AESGCM with only encrypt/decrypt
        def __init__(self, aead):
            self.encrypt, self.decrypt = aead.encrypt, aead.decrypt

    full = np.random.default_rng(4).standard_normal((50, 6)).astype(np.float32)
    for writer_plain in (False, True):
        with h5py.File(tmp_path / "a.h5", "w") as f:
            arr = crypt.create_array(f, "a", full.shape, full.dtype, key, chunk_bytes=200)
            if writer_plain:
                arr._aead = Plain(arr._aead)
            arr[...] = full
        with h5py.File(tmp_path / "a.h5", "r") as f:
            arr = crypt.open_array(f["a"], key)
            if not writer_plain:
                arr._aead = Plain(arr._aead)
            np.testing.assert_array_equal(arr[...], full)
            np.testing.assert_array_equal(arr[[3, 40, 9]], full[[3, 40, 9]])


def _tamper_cases():
    def flip(f):
        ds = f["a"]
        blob = ds[2]
        blob[40] ^= 1
        ds[2] = blob

    def swap(f):
        ds = f["a"]
        b1, b2 = ds[1], ds[2]
        ds[1], ds[2] = b2, b1

    def move(f):                                  # same-shaped array, chunk moved across
        f["a"][2] = f["b"][2]

    def reshape(f):
        f["a"].attrs[crypt.A_SHAPE] = np.array([60, 2], dtype=np.int64)

    def retype(f):
        f["a"].attrs[crypt.A_DTYPE] = "<i4"

    def objects(f):
        f["a"].attrs[crypt.A_DTYPE] = "|O"

    return {"flipped bit": flip, "swapped chunks": swap, "chunk from another dataset": move,
            "edited shape attribute": reshape, "edited dtype attribute": retype,
            "object dtype attribute": objects}


@pytest.mark.parametrize("case", sorted(_tamper_cases()))
def test_tampering_fails_authentication(tmp_path, key, case):
    full = np.random.default_rng(2).standard_normal((30, 4)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        for name in ("a", "b"):
            crypt.create_array(f, name, full.shape, full.dtype, key, chunk_bytes=160)[...] = full
    with h5py.File(tmp_path / "a.h5", "r+") as f:
        _tamper_cases()[case](f)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        with pytest.raises(crypt.CryptError, match="fails authentication|does not fit|hold numbers"):
            crypt.open_array(f["a"], key)[...]


def test_array_copied_into_another_file_fails_authentication(tmp_path, key):
    full = np.ones((8, 3), dtype=np.float32)
    for name in ("one.h5", "two.h5"):
        with h5py.File(tmp_path / name, "w") as f:
            crypt.create_array(f, "a", full.shape, full.dtype, key)[...] = full * len(name)
    with h5py.File(tmp_path / "one.h5", "r") as src, h5py.File(tmp_path / "two.h5", "r+") as dst:
        dst["a"][...] = src["a"][...]             # same key, same path, another file id
    with h5py.File(tmp_path / "two.h5", "r") as f:
        with pytest.raises(crypt.CryptError, match="chunk 0 fails authentication"):
            crypt.open_array(f["a"], key)[...]


# ---------------------------------------------------------------------------- datasets

def test_encrypted_dataset_reads_back_and_keeps_structure_in_the_clear(tmp_path, key):
    x, y = _write(tmp_path / "d.h5", key)
    info = read_info(tmp_path / "d.h5")                  # no key: described, labels unchecked
    assert info.encryption == f"AES-256-GCM, key id {key.key_id}"
    assert info.split("train").n == 200 and info.sample_shape == (3, 8, 8)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        ds = f["train/x"]
        assert ds.dtype == np.uint8 and ds.ndim == 2 and ds.shape[1] > 28
        assert crypt.logical_shape(ds) == (200, 3, 8, 8)
    got_x, got_y = read_split(tmp_path / "d.h5", "train", key=key)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    raw = (tmp_path / "d.h5").read_bytes()
    assert x[:20].tobytes()[:64] not in raw               # rows are not stored in the clear
    assert (tmp_path / "k").read_text().strip().encode() not in raw


def test_wrong_or_missing_key_is_refused_by_name(tmp_path, key, other_key):
    _write(tmp_path / "d.h5", key)
    with pytest.raises(DatasetError, match=f"wrong key: .*key id {key.key_id}.*key id "
                                           f"{other_key.key_id}"):
        read_split(tmp_path / "d.h5", key=other_key)
    with pytest.raises(DatasetError, match="is encrypted .*set key"):
        read_split(tmp_path / "d.h5")


def test_altered_label_chunk_is_refused_when_the_file_is_opened(tmp_path, key):
    _write(tmp_path / "d.h5", key, chunk_bytes=256)
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        blob = f["test/y"][0]
        blob[20] ^= 0x80
        f["test/y"][0] = blob
    with pytest.raises(DatasetError, match=r"test/y: chunk 0 fails authentication"):
        read_info(tmp_path / "d.h5", key=key)


def test_compression_with_encryption_is_refused(tmp_path, key):
    x, y = _images(20)
    with pytest.raises(DatasetError, match="compression and encryption do not combine"):
        write_dataset(tmp_path / "d.h5", (x, y), (x, y), class_names=["a"] * 10, source="t",
                      compression="gzip", encrypt_key=key)


# ---------------------------------------------------------------------------- CLI

def _mpifc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mpifc", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_generates_a_key_and_prepares_an_encrypted_dataset(tmp_path):
    p = _mpifc("keys", "generate-data-key", "dk", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    kid = crypt.read_key_file(tmp_path / "dk").key_id
    assert kid in p.stdout and (tmp_path / "dk").read_text().strip() not in p.stdout
    p = _mpifc("keys", "generate-data-key", "dk", cwd=tmp_path)
    assert p.returncode != 0 and p.stderr.strip().count("\n") == 0 and "already exists" in p.stderr
    p = _mpifc("data", "prepare", "synthetic", "--shape", "4", "--n-train", "64", "--n-test", "16",
               "--out", "d.h5", "--encrypt-key-file", "dk", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"encryption: AES-256-GCM, key id {kid}" in p.stdout
    os.chmod(tmp_path / "dk", 0o644)
    p = _mpifc("data", "prepare", "synthetic", "--shape", "4", "--out", "e.h5",
               "--encrypt-key-file", "dk", cwd=tmp_path)
    assert p.returncode != 0 and "chmod 600" in p.stderr and "Traceback" not in p.stderr


def test_cli_train_and_eval_of_an_encrypted_run(tmp_path):
    """`mpifc train` / `mpifc eval` with the key settings; the key never appears in any output."""
    from mpifc.data import prepare
    from mpifc.security.crypt import read_key_file

    generate_data_key(tmp_path / "k")
    prepare.prepare_digits(tmp_path / "enc.h5", encrypt_key=read_key_file(tmp_path / "k"))
    keys = ["--set", "data.dataset=enc.h5", "--set", "data.key_file=k",
            "--set", "train.encrypt_key_file=k"]

    def mpifc(*args):
        return subprocess.run([sys.executable, "-m", "mpifc", *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=300)

    p = mpifc("train", "digits-mlp", "--out", "run", "--quiet", "--set", "train.max_steps=3",
              "--set", "train.trace=false", *keys)
    assert p.returncode == 0, p.stderr
    p = mpifc("eval", "run/checkpoints")
    assert p.returncode == 0, p.stderr
    assert "test_acc" in p.stdout
    p = mpifc("eval", "run/checkpoints", "--set", "train.encrypt_key_file=")
    assert p.returncode != 0
    assert "is encrypted (AES-256-GCM" in p.stderr and "train.encrypt_key_file" in p.stderr
    secret = (tmp_path / "k").read_text().strip()
    for root, _, names in os.walk(tmp_path / "run"):
        for n in names:
            with open(os.path.join(root, n), "rb") as fh:
                data = fh.read()
            assert secret.encode() not in data and bytes.fromhex(secret) not in data, n
