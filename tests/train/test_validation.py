"""Validation split, the plateau schedule and early stop watching it (issue 18 item 3).

In-process trainer runs on any number of ranks. The expected lr sequence and stop
epoch are replayed from the losses the run logged, with the same rules
(:class:`ReduceLROnPlateau`, strictly lower loss for early stop), on the loss the run
should watch -- and the test checks that the other loss would have given a
different answer, so it tells the two apart.
"""
import json
import math
import os

import numpy as np
import pytest

from mpifc.config import loads_config
from mpifc.optim import ReduceLROnPlateau

pytestmark = pytest.mark.mpi(min_size=1)


def _shared_dir(comm, mpi_tmp_path):
    return str(comm.bcast_obj(str(mpi_tmp_path)))


def _dataset(comm, path, *, train_random: bool):
    """Features (8,), 4 classes. Train: y = argmax of the first 4 features (learnable) or
    random; test: random labels, so test loss rises while the model learns train."""
    if comm.rank == 0 and not os.path.exists(path):
        from mpifc.data.format import write_dataset

        rng = np.random.default_rng(0)
        xtr = rng.standard_normal((256, 8)).astype(np.float32)
        ytr = rng.integers(0, 4, 256) if train_random else np.argmax(xtr[:, :4], axis=1)
        xte = rng.standard_normal((96, 8)).astype(np.float32)
        yte = rng.integers(0, 4, 96)
        write_dataset(path, (xtr, ytr), (xte, yte), class_names="abcd", source="test")
    comm.barrier()
    return path


def _cfg(path, *sets, epochs=6):
    text = f"""
seed = 0
[data]
dataset = "{path}"
[model]
input = [8]
layers = [{{type = "linear", out = 64}}, {{type = "relu"}}, {{type = "linear", out = 4}}]
[optim]
name = "sgd"
lr = 0.2
[train]
epochs = {epochs}
batch_size = 32
eval_batch_size = 64
trace = false
"""
    return loads_config(text, "val", list(sets))


def _epochs(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "epoch_s" in r]


def _plateau_lrs(losses, lr0, factor=0.5, patience=0):
    class Opt:
        lr = lr0

    opt, lrs = Opt(), [lr0]
    sched = ReduceLROnPlateau(opt, mode="min", factor=factor, patience=patience)
    for v in losses[:-1]:
        lrs.append(sched.step(v))
    return lrs


def _stop_epoch(losses, patience):
    best, bad = math.inf, 0
    for e, v in enumerate(losses, 1):
        if v < best:
            best, bad = v, 0
        else:
            bad += 1
        if bad >= patience:
            return e
    return None


@pytest.mark.parametrize("holdout", [0.25, 0.0])
def test_plateau_watches_validation_loss(comm, mpi_tmp_path, holdout):
    from mpifc.train import train

    tmp = _shared_dir(comm, mpi_tmp_path)
    path = _dataset(comm, f"{tmp}/learnable.h5", train_random=False)
    out = f"{tmp}/plateau-{holdout}"
    train(_cfg(path, f"data.validation_split={holdout}", "schedule.name=plateau",
               "schedule.patience=0", "schedule.factor=0.5"), quiet=True, out=out)
    comm.barrier()
    if comm.rank != 0:
        return
    recs = _epochs(out)
    assert len(recs) == 6
    lrs = [r["lr"] for r in recs]
    by_test = _plateau_lrs([r["test_loss"] for r in recs], 0.2)
    if holdout:
        assert all({"val_loss", "val_acc", "test_loss", "test_acc"} <= set(r) for r in recs)
        by_val = _plateau_lrs([r["val_loss"] for r in recs], 0.2)
        assert by_val != by_test, "the case must tell val_loss from test_loss"
        assert lrs == pytest.approx(by_val, rel=1e-12)
        assert recs[-1]["val_acc"] > 0.5 and recs[-1]["test_acc"] < 0.5      # they differ
    else:
        assert not any("val_loss" in r for r in recs)
        assert lrs == pytest.approx(by_test, rel=1e-12)      # as before: the test loss


@pytest.mark.parametrize("holdout", [0.25, 0.0])
def test_early_stop_stops_saves_and_resume_says_so(comm, mpi_tmp_path, capsys, holdout):
    from mpifc.checkpoint import latest_checkpoint
    from mpifc.train import train

    def read_header(p):
        import h5py

        with h5py.File(p, "r") as f:
            return {"epoch": int(f.attrs["epoch"]), "step": int(f.attrs["step"])}

    tmp = _shared_dir(comm, mpi_tmp_path)
    path = _dataset(comm, f"{tmp}/random.h5", train_random=True)
    out = f"{tmp}/early-{holdout}"
    watched = "val_loss" if holdout else "test_loss"
    sets = [f"data.validation_split={holdout}", "train.early_stop=2",
            f"train.keep_best={watched}"]
    capsys.readouterr()
    last = train(_cfg(path, *sets, epochs=15), quiet=True, out=out)
    printed = capsys.readouterr().out
    comm.barrier()
    recs = comm.bcast_obj(_epochs(out) if comm.rank == 0 else None)
    want = _stop_epoch([r[watched] for r in recs], 2)
    assert want is not None and want < 15, "the case must stop early"
    assert len(recs) == want and recs[-1].get("stopped_early") is True
    assert last.get("stopped_early") is True
    if comm.rank == 0:
        line = [s for s in printed.splitlines() if "stopped early" in s]
        assert len(line) == 1 and f"after epoch {want}: {watched} has not improved" in line[0]
        ckpt = latest_checkpoint(f"{out}/checkpoints")
        assert read_header(ckpt)["epoch"] == want                  # saved at the stop
        best = read_header(f"{out}/checkpoints/best.h5")
        low = min(range(want), key=lambda i: recs[i][watched])
        assert best["step"] == recs[low]["step"]                 # best.h5: the lowest loss
    # resume with the same patience: nothing to do, and it says why
    capsys.readouterr()
    got = train(_cfg(path, *sets, epochs=15), quiet=True, out=out, resume=True)
    printed = capsys.readouterr().out
    assert f"stopped early after epoch {want}" in got["nothing_to_do"]
    if comm.rank == 0:
        assert "raise train.early_stop" in printed and "done in" not in printed
    # early stop off: the run goes on to train.epochs, saying so
    capsys.readouterr()
    train(_cfg(path, *sets[:-2], "train.early_stop=0", epochs=want + 2), quiet=True, out=out,
          resume=True)
    printed = capsys.readouterr().out
    comm.barrier()
    if comm.rank == 0:
        assert f"the run stopped early after epoch {want}; train.early_stop = 0" in printed
        assert [r["epoch"] for r in _epochs(out)] == list(range(1, want + 3))


@pytest.mark.parametrize("holdout", [0.25, 0.0])
def test_keep_best_auto_chooses_on_validation_when_there_is_one(comm, mpi_tmp_path, holdout):
    """keep_best = "auto" (the default): best.h5 by val_acc with a validation split, so
    the test split stays out of model selection; by test_acc without one."""
    from mpifc.train import train

    tmp = _shared_dir(comm, mpi_tmp_path)
    path = _dataset(comm, f"{tmp}/learnable.h5", train_random=False)
    out = f"{tmp}/auto-{holdout}"
    last = train(_cfg(path, f"data.validation_split={holdout}", epochs=4), quiet=True, out=out)
    comm.barrier()
    if comm.rank != 0:
        return
    key = "val_acc" if holdout else "test_acc"
    recs = _epochs(out)
    best = max(recs, key=lambda r: (r[key], -r["step"]))    # the first epoch of the maximum
    if holdout:       # the case tells the two apart: test_acc would pick another epoch
        assert max(recs, key=lambda r: (r["test_acc"], -r["step"]))["step"] != best["step"]
    assert os.path.exists(last["paths"]["best"])
    import h5py

    with h5py.File(last["paths"]["best"], "r") as f:
        assert int(f.attrs["step"]) == best["step"]
