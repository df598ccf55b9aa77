"""Trainer: bit-exact resume, reshard on load, non-finite loss, metrics (in-process, any P)."""
import json
import math
import os

import numpy as np
import pytest

from mpifc.config import load_config

pytestmark = pytest.mark.mpi(min_size=1)


def _cfg(preset, tmp, *extra):
    return load_config(preset, [f"data.dir={tmp}/data", "train.trace=false", "train.log_every=1",
                                "train.epochs=2", *extra])


def _step_losses(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "epoch_s" not in r}


def _shared_dir(comm, mpi_tmp_path):
    return str(comm.bcast_obj(str(mpi_tmp_path)))


def _run(cfg, out, comm, resume=None):
    from mpifc.train import Trainer

    tr = Trainer(cfg, quiet=True, comm=comm, out=out)
    if resume:
        assert tr.resume(None if resume is True else resume) is not None
    last = tr.run()
    return tr, last


@pytest.mark.parametrize("preset,layout", [("digits-mlp", "dp"), ("digits-cnn", "dp"),
                                           ("digits-mlp", "tp")])
def test_resume_mid_epoch_is_bit_exact(comm, mpi_tmp_path, preset, layout):
    """A run stopped at step 7 (mid-epoch 1) and resumed == the uninterrupted run, bit for bit."""
    tmp = _shared_dir(comm, mpi_tmp_path)
    lay = [f"parallel.tp={comm.size}"] if layout == "tp" else []
    cfg = _cfg(preset, tmp, *lay)
    _run(cfg, f"{tmp}/{preset}-{layout}-full", comm)
    _run(_cfg(preset, tmp, *lay, "train.max_steps=7"), f"{tmp}/{preset}-{layout}-cut", comm)
    tr, _ = _run(cfg, f"{tmp}/{preset}-{layout}-cut", comm, resume=True)
    if comm.rank == 0:
        full = _step_losses(f"{tmp}/{preset}-{layout}-full/metrics.jsonl")
        resumed = _step_losses(f"{tmp}/{preset}-{layout}-cut/metrics.jsonl")
        assert len(full) == 2 * tr.loader.steps_per_epoch
        assert resumed == full            # steps 1-7 before the cut, 8.. after it: identical


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("preset", ["digits-mlp", "digits-cnn"])
def test_tp2_checkpoint_continues_under_tp1_and_dp2(comm, mpi_tmp_path, preset):
    """Save under tp=2; continue under tp=2, dp=2 and (rank 0 alone) tp=1: same losses to 1e-6."""
    if comm.size != 2:
        pytest.skip("layouts of exactly two ranks")
    tmp = _shared_dir(comm, mpi_tmp_path)
    base = [f"data.dir={tmp}/data", "train.trace=false", "train.log_every=1", "train.epochs=2",
            "train.dtype=float64"]
    src = f"{tmp}/{preset}-saved"
    _run(load_config(preset, base + ["parallel.tp=2", "train.max_steps=10"]), src, comm)
    ckpt = f"{src}/checkpoints"
    runs = {}
    for name, lay in (("tp2", ["parallel.tp=2"]), ("dp2", ["parallel.tp=1", "parallel.dp=2"])):
        out = f"{tmp}/{preset}-{name}"
        _run(load_config(preset, base + lay + ["train.max_steps=16"]), out, comm, resume=ckpt)
        runs[name] = f"{out}/metrics.jsonl"
    solo = comm.split(comm.rank)
    if comm.rank == 0:
        out = f"{tmp}/{preset}-tp1"
        _run(load_config(preset, base + ["parallel.tp=1", "parallel.dp=1", "train.max_steps=16"]),
             out, solo, resume=ckpt)
        runs["tp1"] = f"{out}/metrics.jsonl"
        losses = {k: _step_losses(v) for k, v in runs.items()}
        assert sorted(losses["tp2"]) == list(range(11, 17))
        for k in ("dp2", "tp1"):
            assert sorted(losses[k]) == sorted(losses["tp2"])
            for s, v in losses["tp2"].items():
                assert math.isclose(losses[k][s], v, rel_tol=1e-6), (k, s, losses[k][s], v)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_stops_naming_the_step(comm, mpi_tmp_path):
    from mpifc.train import Trainer, TrainingError

    tmp = _shared_dir(comm, mpi_tmp_path)
    cfg = _cfg("digits-mlp", tmp, "optim.name=sgd", "optim.lr=1e6", "optim.momentum=0.0")
    tr = Trainer(cfg, quiet=True, comm=comm, out=f"{tmp}/nan")
    with pytest.raises(TrainingError, match=r"non-finite loss at step \d+"):
        tr.run()


def test_metrics_and_eval_agree_with_checkpoint(comm, mpi_tmp_path):
    """Per-epoch records carry the documented fields; the final checkpoint evaluates the same."""
    from mpifc.checkpoint import load
    from mpifc.train import Trainer

    tmp = _shared_dir(comm, mpi_tmp_path)
    cfg = _cfg("digits-mlp", tmp, "train.epochs=2")
    tr, last = _run(cfg, f"{tmp}/metrics", comm)
    assert 0.0 <= last["test_acc"] <= 1.0 and last["epoch"] == 2
    fresh = Trainer(cfg, quiet=True, comm=comm, out=f"{tmp}/metrics")
    load(f"{tmp}/metrics/checkpoints", fresh.model, None, fresh.grid)
    again = fresh.evaluate()
    assert again["test_loss"] == pytest.approx(last["test_loss"], rel=1e-12)
    if comm.rank == 0:
        with open(f"{tmp}/metrics/metrics.jsonl") as f:
            epochs = [json.loads(x) for x in f if "epoch_s" in x]
        assert [r["epoch"] for r in epochs] == [1, 2]
        for key in ("loss", "acc", "test_loss", "test_acc", "samples_per_s", "comm_s", "lr"):
            assert all(np.isfinite(r[key]) for r in epochs), key
        assert os.path.exists(f"{tmp}/metrics/checkpoints")
