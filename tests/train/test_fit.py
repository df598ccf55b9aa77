"""mpifc.fit, the Python API: the CLI trainer's results from objects built by hand.

Oracle: ``mpifc train`` on the equivalent config (mpifc.train.Trainer via train()).
Both write metrics.jsonl; every record (per-step with log_every, per epoch) must agree
to 1e-6 in loss, accuracy, lr and test metrics. Any number of ranks.
"""
import json
import os

import numpy as np
import pytest

import mpifc
from mpifc import nn, optim
from mpifc.comm import Grid, GridError
from mpifc.config import ConfigError, load_config

pytestmark = pytest.mark.mpi(min_size=1)
KEYS = ("step", "epoch", "loss", "acc", "lr", "test_loss", "test_acc")


def _records(path):
    with open(path) as f:
        return [{k: r[k] for k in KEYS if k in r} for r in map(json.loads, f)]


def _same_records(comm, a_path, b_path, keep=lambda r: True):
    """(ok, detail) on every rank: rank 0 compares the records ``keep`` selects."""
    verdict = None
    if comm.rank == 0:
        a = [r for r in _records(a_path) if keep(r)]
        b = [r for r in _records(b_path) if keep(r)]
        diff = [(x, y) for x, y in zip(a, b) if x.keys() != y.keys() or any(
            abs(x[k] - y[k]) > 1e-6 for k in x)]
        verdict = (len(a) == len(b) and len(a) > 0 and not diff, (len(a), len(b), diff[:2]))
    return comm.bcast_obj(verdict)


def _cli(comm, tmp, out, *sets):
    from mpifc.train import train

    cfg = load_config("digits-mlp", [f"data.dir={tmp}/data", "train.trace=false", *sets])
    train(cfg, quiet=True, out=f"{tmp}/{out}", overwrite=True)
    return cfg


def _serial_mlp(seed, dtype=np.float32):
    """digits-mlp at tp = 1, by hand: layer i of the table draws from [seed, i]."""
    def rng(i):
        return np.random.default_rng([seed, i])

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256, rng=rng(1), dtype=dtype), nn.ReLU(),
                         nn.Linear(256, 256, rng=rng(3), dtype=dtype), nn.ReLU(),
                         nn.Linear(256, 10, rng=rng(5), dtype=dtype), input_grad=False)


def test_the_cli_trainer_is_the_object_trainer():
    """One training loop: the config trainer only builds objects (no override of the loop)."""
    from mpifc import train, trainer

    assert issubclass(train.Trainer, trainer.Trainer)
    for name in ("run", "train_step", "evaluate", "save", "resume", "finish"):
        assert name not in vars(train.Trainer), name


def test_fit_of_a_net_with_a_loader_equals_the_cli(comm, mpi_tmp_path):
    """A build_model Net (its own loss) on a DistributedLoader, tp = all ranks, with
    accumulation, clipping, a cosine schedule with warm-up and per-step logs."""
    from mpifc.data import DistributedLoader
    from mpifc.models import build_model

    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    sets = [f"parallel.tp={comm.size}", "optim.name=sgd", "optim.lr=0.05", "optim.clip_norm=0.5",
            "schedule.name=cosine", "schedule.warmup_steps=5", "train.accumulate=2",
            "train.epochs=2", "train.log_every=4", "seed=3"]
    cfg = _cli(comm, tmp, "cli", *sets)

    grid = Grid(comm, tp=comm.size)
    model = build_model(cfg["model"], grid, seed=3)
    loader = DistributedLoader(f"{tmp}/data/digits.h5", grid.dp_comm, batch_size=64, seed=3,
                               cache=True)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = optim.CosineWarmup(opt, warmup_steps=5, total_steps=2 * loader.steps_per_epoch)
    last = mpifc.fit(model, loader, optimizer=opt, grid=grid, epochs=2, seed=3,
                     schedule=sched, accumulate=2, clip_norm=0.5, log_every=4, trace=False,
                     out=f"{tmp}/fit", quiet=True)
    ok, detail = _same_records(comm, f"{tmp}/fit/metrics.jsonl", f"{tmp}/cli/metrics.jsonl")
    assert ok, detail
    assert last["epoch"] == 2 and 0 < last["test_acc"] <= 1
    if comm.rank == 0:
        assert os.path.exists(last["paths"]["checkpoint"])


def test_fit_of_serial_layers_on_a_path_equals_the_cli(comm, mpi_tmp_path):
    """A Sequential of serial layers with nn.SoftmaxCrossEntropy, data parallel over all
    ranks, a dataset path, Adam with a step schedule, keep_best on the test loss."""
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    _cli(comm, tmp, "cli", "schedule.name=step", "schedule.step_size=1", "schedule.gamma=0.5",
         "train.epochs=2", "train.keep_best=test_loss", "train.log_every=5")
    model = _serial_mlp(0)
    opt = optim.Adam(model.parameters(), lr=0.002)
    last = mpifc.fit(model, f"{tmp}/data/digits.h5", optimizer=opt,
                     loss=nn.SoftmaxCrossEntropy(), epochs=2,
                     schedule=optim.StepLR(opt, step_size=1, gamma=0.5), keep_best="test_loss",
                     log_every=5, trace=False, out=f"{tmp}/fit", quiet=True)
    ok, detail = _same_records(comm, f"{tmp}/fit/metrics.jsonl", f"{tmp}/cli/metrics.jsonl")
    assert ok, detail
    if comm.rank == 0:
        assert os.path.exists(last["paths"]["best"])
        assert "trace_chrome" not in last["paths"]


def test_fit_resumes_where_it_stopped(comm, mpi_tmp_path):
    """max_steps cuts a run; fit(resume=True) on a fresh model continues it, the same
    records as an uninterrupted run (and the trace is written by default); resuming a
    finished run does nothing."""
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    from mpifc.data import prepared

    path = prepared("digits", comm, dir=f"{tmp}/data")

    def run(out, **kw):
        model = _serial_mlp(1)
        return mpifc.fit(model, path, optimizer=optim.Adam(model.parameters(), lr=0.002),
                         loss=nn.SoftmaxCrossEntropy(), epochs=2, seed=1, log_every=3,
                         out=f"{tmp}/{out}", quiet=True, **kw)

    run("whole", trace=False)
    cut = run("cut", max_steps=7, trace=False)
    assert cut["step"] == 7
    last = run("cut", resume=True)
    assert last["epoch"] == 2
    # the steps after the cut, and the last epoch (the cut epoch's record covers steps 8-23)
    ok, detail = _same_records(comm, f"{tmp}/cut/metrics.jsonl", f"{tmp}/whole/metrics.jsonl",
                               keep=lambda r: r["step"] > 7 and ("test_loss" not in r
                                                                 or r["epoch"] == 2))
    assert ok, detail
    if comm.rank == 0:
        assert os.path.exists(last["paths"]["trace_chrome"])
    done = run("cut", resume=True)
    assert "nothing_to_do" in done


def test_fit_refuses_bad_arguments_naming_them(comm, mpi_tmp_path):
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    model = _serial_mlp(0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="fit: epochs must be an integer >= 1, got 0"):
        mpifc.fit(model, "x.h5", optimizer=opt, loss=nn.SoftmaxCrossEntropy(), epochs=0)
    with pytest.raises(ConfigError, match="fit: keep_best must be one of"):
        mpifc.fit(model, "x.h5", optimizer=opt, loss=nn.SoftmaxCrossEntropy(), keep_best="acc")
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['epoch'\]"):
        mpifc.fit(model, "x.h5", optimizer=opt, loss=nn.SoftmaxCrossEntropy(), epoch=2)
    with pytest.raises(TypeError, match="pass loss="):
        mpifc.fit(model, "x.h5", optimizer=opt, out=f"{tmp}/noloss")


@pytest.mark.mpi(min_size=2)
def test_fit_refuses_a_model_built_on_another_grid(comm, mpi_tmp_path):
    """Sharded layers built on a tensor group of all ranks, a pure dp grid passed: every
    rank raises the same GridError before any gradient is averaged over the wrong group."""
    from mpifc.parallel import ColumnParallelLinear

    tp_grid = Grid(comm, tp=comm.size)
    model = nn.Sequential(nn.Flatten(), ColumnParallelLinear(64, 10, tp_grid.tp_comm,
                                                             gather_output=True, seed=0))
    with pytest.raises(GridError, match=r"does not fit the grid dp=\d+ x tp=1"):
        mpifc.fit(model, "x.h5", optimizer=optim.SGD(model.parameters(), lr=0.1),
                  loss=nn.SoftmaxCrossEntropy(), grid=Grid(comm, dp=comm.size))


def test_fit_without_a_test_split_steps_a_plateau_schedule_on_the_train_loss(comm, mpi_tmp_path):
    """test_data=None: no evaluation (no test metrics, no best.h5); ReduceLROnPlateau then
    watches the epoch's train loss. mode="max" on a falling loss: the 2nd epoch halves lr."""
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    from mpifc.data import prepared

    path = prepared("digits", comm, dir=f"{tmp}/data")
    model = _serial_mlp(0)
    opt = optim.Adam(model.parameters(), lr=0.002)
    last = mpifc.fit(model, path, optimizer=opt, loss=nn.SoftmaxCrossEntropy(), epochs=3,
                     test_data=None, trace=False, out=f"{tmp}/fit", quiet=True,
                     schedule=optim.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0))
    assert "test_loss" not in last
    if comm.rank == 0:
        recs = _records(f"{tmp}/fit/metrics.jsonl")
        assert [r["lr"] for r in recs] == [0.002, 0.002, 0.001]
        assert recs[0]["loss"] > recs[1]["loss"] > recs[2]["loss"]
        assert "best" not in last["paths"]


def test_fit_with_validation_augment_and_early_stop_equals_the_cli(comm, mpi_tmp_path):
    """validation_split, augment and early_stop given to fit do what the config keys do:
    the same records (val metrics included) as mpifc train, the same stopping epoch."""
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    sets = ["data.validation_split=0.2", "data.augment=flip", "train.early_stop=1",
            "train.epochs=6", "train.keep_best=val_loss", "optim.lr=0.05"]
    # digits-mlp flattens 1x8x8 images: flip applies before Flatten
    _cli(comm, tmp, "cli", *sets)
    model = _serial_mlp(0)
    opt = optim.Adam(model.parameters(), lr=0.05)
    last = mpifc.fit(model, f"{tmp}/data/digits.h5", optimizer=opt,
                     loss=nn.SoftmaxCrossEntropy(), epochs=6, validation_split=0.2,
                     augment=["flip"], early_stop=1, keep_best="val_loss", trace=False,
                     out=f"{tmp}/fit", quiet=True)
    keys = KEYS + ("val_loss", "val_acc", "stopped_early")
    verdict = None
    if comm.rank == 0:
        def recs(p):
            with open(p) as f:
                return [{k: r[k] for k in keys if k in r} for r in map(json.loads, f)]
        a, b = recs(f"{tmp}/fit/metrics.jsonl"), recs(f"{tmp}/cli/metrics.jsonl")
        verdict = (len(a) == len(b) and all(x.keys() == y.keys() and all(
            abs(x[k] - y[k]) <= 1e-6 for k in x) for x, y in zip(a, b)), a, b)
    ok, a, b = comm.bcast_obj(verdict)
    assert ok, (a, b)
    assert all("val_loss" in r for r in a)
    assert a[-1].get("stopped_early") is True and len(a) < 6, a     # lr 0.05: it stops early
    assert last.get("stopped_early") is True


def test_fit_refuses_validation_split_on_a_loader(comm, mpi_tmp_path):
    from mpifc.data import DistributedLoader, prepared

    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    path = prepared("digits", comm, dir=f"{tmp}/data")
    model = _serial_mlp(0)
    loader = DistributedLoader(path, comm, batch_size=64)
    try:
        with pytest.raises(ConfigError, match="validation_split and augment apply to a dataset"):
            mpifc.fit(model, loader, optimizer=optim.SGD(model.parameters(), lr=0.1),
                      loss=nn.SoftmaxCrossEntropy(), validation_split=0.1, out=f"{tmp}/fit")
        with pytest.raises(ConfigError, match="fit: augment must be"):
            mpifc.fit(model, path, optimizer=optim.SGD(model.parameters(), lr=0.1),
                      loss=nn.SoftmaxCrossEntropy(), augment=["rotate"], out=f"{tmp}/fit")
    finally:
        loader.close()
