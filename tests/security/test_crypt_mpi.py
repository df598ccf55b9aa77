"""Encryption at rest on several ranks: loader, agreed failures, checkpoints (pytest-mpi)."""
import os

import h5py
import numpy as np
import pytest

pytest.importorskip("cryptography")

from mpifc.data import DatasetError, write_dataset  # noqa: E402
from mpifc.security import crypt  # noqa: E402
from mpifc.security.keys_data import generate_data_key  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=1)


def _shared(comm, mpi_tmp_path):
    return str(comm.bcast_obj(str(mpi_tmp_path)))


def _keys(comm, tmp):
    """Two keys written by rank 0 to the shared directory, read on every rank."""
    if comm.rank == 0:
        for name in ("k", "k2"):
            generate_data_key(os.path.join(tmp, name))
    comm.barrier()
    return crypt.read_key_file(os.path.join(tmp, "k")), crypt.read_key_file(os.path.join(tmp, "k2"))


def _datasets(comm, tmp, key, rows_per_chunk=8):
    """A clear and an encrypted copy of one 120-row image set; chunks of ``rows_per_chunk`` rows."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (120, 2, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 5, 120)
    kw = dict(class_names=list("abcde"), source="t", chunk_bytes=rows_per_chunk * 32)
    if comm.rank == 0:
        write_dataset(f"{tmp}/clear.h5", (x, y), (x[:30], y[:30]), **kw)
        write_dataset(f"{tmp}/enc.h5", (x, y), (x[:30], y[:30]), encrypt_key=key, **kw)
    comm.barrier()
    return f"{tmp}/clear.h5", f"{tmp}/enc.h5"


@pytest.mark.parametrize("mode", ["slice", "scatter"])
@pytest.mark.parametrize("cache", [False, True])
def test_encrypted_loader_gives_the_clear_batches(comm, mpi_tmp_path, mode, cache):
    from mpifc.data import DistributedLoader

    tmp = _shared(comm, mpi_tmp_path)
    key, _ = _keys(comm, tmp)
    clear, enc = _datasets(comm, tmp, key)
    a = DistributedLoader(clear, comm, batch_size=22, seed=5, mode=mode, cache=cache)
    b = DistributedLoader(enc, comm, batch_size=22, seed=5, mode=mode, cache=cache, key=key)
    for epoch in (0, 1):
        a.set_position(epoch, 0)
        b.set_position(epoch, 0)
        for ba, bb in zip(a, b):
            assert ba.x.dtype == bb.x.dtype
            np.testing.assert_array_equal(ba.x, bb.x)
            np.testing.assert_array_equal(ba.y, bb.y)
    a.close()
    b.close()


def test_wrong_missing_or_unneeded_key_fails_every_rank(comm, mpi_tmp_path):
    from mpifc.data import DistributedLoader

    tmp = _shared(comm, mpi_tmp_path)
    key, other = _keys(comm, tmp)
    clear, enc = _datasets(comm, tmp, key)
    with pytest.raises(DatasetError, match=f"rank 0: {enc}: wrong key"):
        DistributedLoader(enc, comm, batch_size=8, key=other)
    with pytest.raises(DatasetError, match="is encrypted .*set data.key_file or data.key_env"):
        DistributedLoader(enc, comm, batch_size=8)
    with pytest.raises(DatasetError, match="not encrypted, but data.key_file or data.key_env"):
        DistributedLoader(clear, comm, batch_size=8, key=key)
    # only the last rank holds the wrong key: every rank still raises
    mine = other if comm.rank == comm.size - 1 else key
    with pytest.raises(DatasetError, match=f"rank {comm.size - 1}: .*wrong key"):
        DistributedLoader(enc, comm, batch_size=8, key=mine)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("cache", [False, True])
def test_a_bad_chunk_seen_by_one_rank_fails_every_rank(comm, mpi_tmp_path, cache):
    """Rank 1 alone reads the altered chunk; all ranks raise at that batch, none hangs."""
    from mpifc.data import DistributedLoader

    tmp = _shared(comm, mpi_tmp_path)
    key, _ = _keys(comm, tmp)
    _, enc = _datasets(comm, tmp, key, rows_per_chunk=8)
    if comm.rank == 0:
        with h5py.File(enc, "r+") as f:
            blob = f["train/x"][1]               # rows 8..15: rank 1's rows of batch 0
            blob[100] ^= 4
            f["train/x"][1] = blob
    comm.barrier()
    b = DistributedLoader(enc, comm, batch_size=8 * comm.size, shuffle=False, key=key,
                          cache=cache)
    with pytest.raises(DatasetError, match=rf"rank {0 if cache else 1}: .*train/x: chunk 1 fails "
                                           "authentication"):
        b.get_batch(0, 0)
    # the ranks are still in step: the next collective completes on every rank
    assert comm.allreduce(np.ones(1))[0] == comm.size
    b.close()


def test_config_keys_agree_or_fail_together(comm, mpi_tmp_path, monkeypatch):
    from mpifc.config import ConfigError, load_config

    tmp = _shared(comm, mpi_tmp_path)
    key, _ = _keys(comm, tmp)
    cfg = load_config("digits-mlp", [f"data.key_file={tmp}/k",
                                     "train.encrypt_key_env=MPIFC_TEST_CKPT_KEY"])
    raw_hex = open(f"{tmp}/k").read().strip()
    if comm.rank == comm.size - 1:               # the variable is missing on one node
        monkeypatch.delenv("MPIFC_TEST_CKPT_KEY", raising=False)
    else:
        monkeypatch.setenv("MPIFC_TEST_CKPT_KEY", raw_hex)
    with pytest.raises(ConfigError, match=f"rank {comm.size - 1}: environment variable "
                                          "MPIFC_TEST_CKPT_KEY is not set"):
        crypt.config_keys(cfg, comm)
    monkeypatch.setenv("MPIFC_TEST_CKPT_KEY", raw_hex)
    dk, ck = crypt.config_keys(cfg, comm)
    assert dk.key_id == ck.key_id == key.key_id


# ---------------------------------------------------------------------------- checkpoints

def _save_load(comm, tmp, key, load_key, tamper=None):
    """Save a tp=P toy model encrypted with ``key``; load it under dp=P with ``load_key``."""
    from ckpt_helpers import ToyModel, expected_local, full_state, local_state, mismatches, trained

    from mpifc.checkpoint import load, save
    from mpifc.comm import Grid
    from mpifc.optim import Adam

    g = Grid(comm, dp=1, tp=comm.size)
    m, opt = trained(7, g.tp_comm)
    path = save(f"{tmp}/ck.h5", m, opt, g, step=3, key=key)
    if tamper is not None and comm.rank == 0:
        tamper(path)
    comm.barrier()
    g2 = Grid(comm, dp=comm.size, tp=1)           # reshard: tp=P -> dp=P
    m2 = ToyModel(99, g2.tp_comm)
    opt2 = Adam(m2.named_parameters(), lr=1.0, weight_decay=0.1)
    info = load(path, m2, opt2, g2, key=load_key)
    ref_m, ref_opt = trained(7)
    assert not mismatches(local_state(m2, opt2), expected_local(full_state(ref_m, ref_opt), m2))
    return info


@pytest.fixture
def ckpt_helpers_path(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "checkpoint"))


def test_encrypted_checkpoint_reshards_and_verifies(comm, mpi_tmp_path, ckpt_helpers_path):
    from mpifc.checkpoint import verify

    tmp = _shared(comm, mpi_tmp_path)
    key, _ = _keys(comm, tmp)
    info = _save_load(comm, tmp, key, key)
    assert info["digest"] == verify(f"{tmp}/ck.h5")    # digest checks without the key
    with h5py.File(f"{tmp}/ck.h5", "r") as f:
        assert crypt.is_encrypted(f["params/fc1.weight"])
        assert f.attrs[crypt.A_KEY_ID] == key.key_id


@pytest.mark.parametrize("case", ["wrong key", "no key", "altered, digest recomputed"])
def test_encrypted_checkpoint_refusals_reach_every_rank(comm, mpi_tmp_path, ckpt_helpers_path,
                                                        case):
    from mpifc.checkpoint import CheckpointError
    from mpifc.checkpoint import digest

    tmp = _shared(comm, mpi_tmp_path)
    key, other = _keys(comm, tmp)

    def alter(path):                            # an attacker who recomputes the digest
        with h5py.File(path, "r+") as f:
            ds = f["params/fc1.weight"]
            blob = ds[0]
            blob[20] ^= 1
            ds[0] = blob
            total, per = digest.compute(f)
            for p, d in per.items():
                f[p].attrs[digest.DATASET_ATTR] = d
            f.attrs[digest.DIGEST_ATTR] = total

    load_key, tamper, msg = {
        "wrong key": (other, None, "wrong key: the file was encrypted with key id"),
        "no key": (None, None, "is encrypted .*set train.encrypt_key_file or"),
        "altered, digest recomputed": (key, alter, "params/fc1.weight: chunk 0 fails "
                                                   "authentication"),
    }[case]
    with pytest.raises(CheckpointError, match=msg):
        _save_load(comm, tmp, key, load_key, tamper)


def test_per_rank_mode_refuses_encryption_on_every_rank(comm, mpi_tmp_path, ckpt_helpers_path):
    from ckpt_helpers import trained

    from mpifc.checkpoint import CheckpointError, save
    from mpifc.comm import Grid

    tmp = _shared(comm, mpi_tmp_path)
    key, _ = _keys(comm, tmp)
    g = Grid(comm, dp=1, tp=comm.size)
    model, opt = trained(7, g.tp_comm)
    with pytest.raises(CheckpointError, match="mode='gather' only"):
        save(f"{tmp}/pr.h5", model, opt, g, step=1, mode="per-rank", key=key)
    assert not os.path.exists(f"{tmp}/pr.h5")
