"""Files from elsewhere cannot reach other files, allocate what they do not hold, or pick
where `mpifc eval` writes (issue 17 item 3)."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from sign_helpers import trained

from mpifc.checkpoint import CheckpointError, digest, load, save
from mpifc.comm import Grid, world
from mpifc.data import DatasetError, prepare
from mpifc.data.format import open_dataset


def _ckpt(tmp_path):
    m, opt = trained(3)
    return save(tmp_path / "c", m, opt, Grid(world()), step=1), m, opt


def _redigest(f):
    total, per = digest.compute(f)
    for p, d in per.items():
        f[p].attrs[digest.DATASET_ATTR] = d
    f.attrs[digest.DIGEST_ATTR] = total


def _load_error(path, m, opt) -> str:
    with pytest.raises(CheckpointError) as e:
        load(path, m, opt, Grid(world()))
    return str(e.value)


def test_external_storage_in_a_checkpoint_is_refused(tmp_path):
    """A tensor whose bytes live in another file, digest recomputed: was loaded before."""
    path, m, opt = _ckpt(tmp_path)
    elsewhere = tmp_path / "elsewhere.bin"
    with h5py.File(path, "r+") as f:
        w = f["params/fc1.weight"][...]
        attrs = dict(f["params/fc1.weight"].attrs)
        (w + 1).tofile(elsewhere)
        del f["params/fc1.weight"]
        ds = f.create_dataset("params/fc1.weight", shape=w.shape, dtype=w.dtype,
                              external=[(str(elsewhere), 0, w.nbytes)])
        for k, v in attrs.items():
            ds.attrs[k] = v
        f.attrs[digest.DIGEST_ATTR] = _old_compute(f)   # recomputed: the digest says OK
    msg = _load_error(path, m, opt)
    assert "external file" in msg and "elsewhere.bin" in msg, msg


def _old_compute(f):
    """The digest over the file's contents as before the check (what an attacker computes)."""
    import hashlib
    objects = [("/", f)]
    f.visititems(lambda n, o: objects.append(("/" + n, o)))
    objects.sort(key=lambda t: t[0])
    h = hashlib.sha256()
    for p, obj in objects:
        if isinstance(obj, h5py.Dataset):
            digest._field(h, b"D" + p.encode())
            digest._field(h, bytes.fromhex(digest.dataset_digest(obj)))
        for name in sorted(obj.attrs.keys()):
            if (p, name) in digest._SKIP or (isinstance(obj, h5py.Dataset)
                                             and name == digest.DATASET_ATTR):
                continue
            digest._field(h, b"A" + p.encode() + b"\x00" + name.encode())
            digest._field(h, digest._attr_bytes(obj.attrs[name]))
    return "sha256:" + h.hexdigest()


@pytest.mark.parametrize("kind", ["external", "soft"])
def test_links_in_a_checkpoint_are_refused(tmp_path, kind):
    path, m, opt = _ckpt(tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(path, "r+") as f:
        w = f["params/fc1.weight"][...]
        with h5py.File(other, "w") as g:
            g["w"] = w
        del f["params/fc1.weight"]
        f["stash/w"] = w
        f["params/fc1.weight"] = (h5py.ExternalLink(str(other), "/w") if kind == "external"
                                  else h5py.SoftLink("/stash/w"))
    msg = _load_error(path, m, opt)
    assert f"{kind} link" in msg and "/params/fc1.weight" in msg, msg


def test_declared_but_absent_tensor_is_refused_before_reading(tmp_path):
    """A 4 TiB dataset declared in a small file: refused, nothing allocated or read."""
    path, m, opt = _ckpt(tmp_path)
    with h5py.File(path, "r+") as f:
        f.create_dataset("params/huge", shape=(1, 2 ** 40), dtype=np.float32)
    msg = _load_error(path, m, opt)
    assert "declares" in msg and "/params/huge" in msg, msg


@pytest.mark.parametrize("dtype", ["S1000000000", "|O", "<U2000000000000"])
def test_crafted_array_attribute_dtype_is_refused(tmp_path, dtype):
    """An rng attribute asking for a 1 GB string array (or objects): refused, not allocated."""
    path, m, opt = _ckpt(tmp_path)
    with h5py.File(path, "r+") as f:
        f["rng"].attrs["rank_00000"] = ('{"model": {"__ndarray__": [1], '
                                        f'"dtype": "{dtype}"}}}}')
        _redigest(f)
    msg = _load_error(path, m, opt)
    assert "refused (numbers only)" in msg, msg


def _dataset(tmp_path, name="d.h5", shape=(1, 8, 8)):
    return prepare.prepare_synthetic(tmp_path / name, n_train=64, n_test=32, shape=shape,
                                     num_classes=4, seed=0)


def test_dataset_with_external_storage_or_link_is_refused(tmp_path):
    p = _dataset(tmp_path)
    with h5py.File(p, "r+") as f:
        y = f["train/y"][...]
        y.tofile(tmp_path / "labels.bin")
        del f["train/y"]
        f.create_dataset("train/y", shape=y.shape, dtype=y.dtype,
                         external=[(str(tmp_path / "labels.bin"), 0, y.nbytes)])
    with pytest.raises(DatasetError, match="external file"):
        open_dataset(p)
    q = _dataset(tmp_path, "e.h5")
    with h5py.File(q, "r+") as f:
        del f["test/y"]
        f["test/y"] = h5py.ExternalLink(p, "/test/y")
    with pytest.raises(DatasetError, match="external link"):
        open_dataset(q)
    v = _dataset(tmp_path, "v.h5")
    with h5py.File(v, "r+") as f:
        n = f["test/y"].shape[0]
        del f["test/y"]
        layout = h5py.VirtualLayout(shape=(n,), dtype=np.int64)
        layout[:] = h5py.VirtualSource(p, "test/y", shape=(n,))
        f.create_virtual_dataset("test/y", layout)
    with pytest.raises(DatasetError, match="virtual dataset"):
        open_dataset(v)


def test_dataset_declaring_rows_it_does_not_hold_is_refused(tmp_path):
    """30 GB of images declared, none stored: refused before a loader could cache them."""
    p = _dataset(tmp_path)
    n = 10 ** 7
    with h5py.File(p, "r+") as f:
        del f["train/x"], f["train/y"]
        f.create_dataset("train/x", shape=(n, 1, 8, 8), dtype=np.uint8, chunks=(4096, 1, 8, 8))
        f.create_dataset("train/y", shape=(n,), dtype=np.int64, chunks=(65536,))
    with pytest.raises(DatasetError, match="declares .* the file stores 0"):
        open_dataset(p)


def test_sample_shape_must_match_model_input(tmp_path):
    from mpifc.config import load_config
    from mpifc.train import Trainer, TrainingError

    p = _dataset(tmp_path, shape=(3, 8, 8))
    cfg = load_config("digits-cnn", [f"data.dataset={p}", "train.trace=false"])
    with pytest.raises(TrainingError, match=r"samples are \(3, 8, 8\) but model.input is "
                                            r"\(1, 8, 8\)"):
        Trainer(cfg, quiet=True, out=str(tmp_path / "run"))


def test_eval_never_writes_where_the_stored_config_points(tmp_path):
    """`mpifc eval` of someone else's checkpoint: their data.dir is neither created nor written."""
    theirs, mine = tmp_path / "theirs", tmp_path / "mine"
    theirs.mkdir()
    mine.mkdir()
    evil = tmp_path / "their-data-dir"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_"))}
    run = [sys.executable, "-m", "mpifc"]
    p = subprocess.run(run + ["train", "digits-mlp", "--set", "train.epochs=1", "--set",
                              "train.max_steps=2", "--set", "train.trace=false", "--set",
                              f"data.dir={evil}", "--out", str(theirs / "run"), "--quiet"],
                       capture_output=True, text=True, timeout=240, cwd=theirs, env=env)
    assert p.returncode == 0, p.stderr
    import shutil
    shutil.rmtree(evil)
    ckpt = str(theirs / "run" / "checkpoints")
    p = subprocess.run(run + ["eval", ckpt, "--out", str(mine / "ev")], capture_output=True,
                       text=True, timeout=240, cwd=mine, env=env)
    assert p.returncode == 0, p.stderr
    assert not evil.exists()
    assert (mine / "runs" / "data" / "digits.h5").exists()
