"""Training with augmentation and a validation split: a resumed run is bit-exact (issue 18)."""
import json

import pytest

from mpifc.config import load_config

pytestmark = pytest.mark.mpi(min_size=1)


def _cfg(tmp, *extra):
    return load_config("digits-cnn", [f"data.dir={tmp}/data", "train.trace=false",
                                      "train.log_every=1", "train.epochs=2",
                                      "data.validation_split=0.1", *extra])


def _step_losses(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "epoch_s" not in r}


def _run(cfg, out, comm, resume=False):
    from mpifc.train import Trainer

    tr = Trainer(cfg, quiet=True, comm=comm, out=out)
    if resume:
        assert tr.resume() is not None
    tr.run()
    return tr


def test_augmented_run_resumed_mid_epoch_is_bit_exact(comm, mpi_tmp_path):
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    aug = ["data.augment=crop,flip", "data.crop_pad=1"]
    tr = _run(_cfg(tmp, *aug), f"{tmp}/full", comm)
    _run(_cfg(tmp, *aug, "train.max_steps=7"), f"{tmp}/cut", comm)
    _run(_cfg(tmp, *aug), f"{tmp}/cut", comm, resume=True)
    _run(_cfg(tmp), f"{tmp}/plain", comm)
    assert tr.loader.augment is not None and tr.val_loader.augment is None
    assert tr.test_loader.augment is None
    if comm.rank == 0:
        full = _step_losses(f"{tmp}/full/metrics.jsonl")
        assert len(full) == 2 * tr.loader.steps_per_epoch
        assert _step_losses(f"{tmp}/cut/metrics.jsonl") == full
        plain = _step_losses(f"{tmp}/plain/metrics.jsonl")
        assert plain[1] != full[1]                # augmentation changed the first batch


def test_augmented_losses_do_not_depend_on_dp(comm, mpi_tmp_path):
    """digits-mlp (no batch statistics) with augmentation: dp = world size == dp = 1."""
    import numpy as np

    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    cfg = load_config("digits-mlp", [f"data.dir={tmp}/data", "train.trace=false",
                                     "train.log_every=1", "train.epochs=1", "train.max_steps=6",
                                     "data.augment=crop,flip", "data.crop_pad=2",
                                     "data.validation_split=0.2", "train.checkpoint_every=0"])
    _run(cfg, f"{tmp}/dp", comm)
    alone = comm.split(comm.rank)
    _run(cfg, f"{tmp}/alone-{comm.rank}", alone)
    comm.barrier()
    if comm.rank == 0:
        dp = _step_losses(f"{tmp}/dp/metrics.jsonl")
        one = _step_losses(f"{tmp}/alone-0/metrics.jsonl")
        assert sorted(dp) == sorted(one) == list(range(1, 7))
        np.testing.assert_allclose([dp[s] for s in one], list(one.values()), rtol=1e-5)


def test_resume_with_another_validation_split_is_one_clear_error(comm, mpi_tmp_path):
    from mpifc.data import DatasetError
    from mpifc.errors import UserError
    from mpifc.train import Trainer

    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    _run(_cfg(tmp, "train.max_steps=2"), f"{tmp}/vs", comm)
    tr = Trainer(_cfg(tmp, "data.validation_split=0.2"), quiet=True, comm=comm, out=f"{tmp}/vs")
    with pytest.raises(DatasetError, match="another stream.*data.validation_split") as e:
        tr.resume()
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
