"""Encrypted data and checkpoints in the trainer: the same losses as in the clear, bit for bit."""
import json
import os

import pytest

pytest.importorskip("cryptography")

from mpifc.config import load_config  # noqa: E402
from mpifc.security.keys_data import generate_data_key  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=1)


def _step_losses(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "epoch_s" not in r}


def _run(cfg, out, comm, resume=None):
    from mpifc.train import Trainer

    tr = Trainer(cfg, quiet=True, comm=comm, out=out)
    if resume:
        assert tr.resume(None if resume is True else resume) is not None
    tr.run()
    return tr


@pytest.fixture
def setup(comm, mpi_tmp_path):
    """(shared dir, clear-run settings, encrypted-run settings) for digits-cnn."""
    from mpifc.data import prepare
    from mpifc.security.crypt import read_key_file

    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    if comm.rank == 0:
        generate_data_key(f"{tmp}/k")
        prepare.prepare_digits(f"{tmp}/clear.h5")
        prepare.prepare_digits(f"{tmp}/enc.h5", encrypt_key=read_key_file(f"{tmp}/k"))
    comm.barrier()
    base = ["train.trace=false", "train.log_every=1", "train.epochs=1"]
    clear = base + [f"data.dataset={tmp}/clear.h5"]
    enc = base + [f"data.dataset={tmp}/enc.h5", f"data.key_file={tmp}/k",
                  f"train.encrypt_key_file={tmp}/k"]
    return tmp, clear, enc


def test_encrypted_run_and_resume_match_the_clear_run(comm, setup):
    """Encrypted dataset + checkpoints: same per-step losses; a resumed run too, bit for bit."""
    tmp, clear, enc = setup
    _run(load_config("digits-cnn", clear), f"{tmp}/clear", comm)
    _run(load_config("digits-cnn", enc), f"{tmp}/enc", comm)
    _run(load_config("digits-cnn", enc + ["train.max_steps=7"]), f"{tmp}/cut", comm)
    _run(load_config("digits-cnn", enc), f"{tmp}/cut", comm, resume=True)
    if comm.rank == 0:
        want = _step_losses(f"{tmp}/clear/metrics.jsonl")
        assert len(want) > 7
        assert _step_losses(f"{tmp}/enc/metrics.jsonl") == want
        assert _step_losses(f"{tmp}/cut/metrics.jsonl") == want
        ckpts = sorted(os.listdir(f"{tmp}/cut/checkpoints"))
        with open(f"{tmp}/cut/checkpoints/{ckpts[-1]}", "rb") as fh:
            assert b"mpifc_cipher" in fh.read()


@pytest.mark.mpi(min_size=2)
def test_encrypted_checkpoint_reshards_tp2_to_dp2_like_the_clear_one(comm, setup):
    """Save encrypted under tp=2, continue under dp=2: the clear checkpoint's losses, bit for bit."""
    if comm.size != 2:
        pytest.skip("layouts of exactly two ranks")
    tmp, clear, enc = setup
    losses = {}
    for name, s in (("clear", clear), ("enc", enc)):
        src = f"{tmp}/{name}-tp2"
        _run(load_config("digits-cnn", s + ["parallel.tp=2", "train.max_steps=10"]), src, comm)
        out = f"{tmp}/{name}-dp2"
        _run(load_config("digits-cnn", s + ["parallel.tp=1", "parallel.dp=2",
                                            "train.max_steps=16"]),
             out, comm, resume=f"{src}/checkpoints")
        losses[name] = _step_losses(f"{out}/metrics.jsonl")
    if comm.rank == 0:
        assert sorted(losses["enc"]) == list(range(11, 17))
        assert losses["enc"] == losses["clear"]

