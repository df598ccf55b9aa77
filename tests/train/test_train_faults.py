"""The faults a user hits around training (in-process, any number of ranks).

Resume past the end, a damaged newest checkpoint, a loss that blows up while
staying finite (keep the best checkpoint), NaN/Inf in the dataset.
"""
import os

import numpy as np
import pytest

from mpifc.config import load_config

pytestmark = pytest.mark.mpi(min_size=1)


def _shared_dir(comm, mpi_tmp_path):
    return str(comm.bcast_obj(str(mpi_tmp_path)))


def _cfg(tmp, *extra, preset="digits-mlp"):
    return load_config(preset, [f"data.dir={tmp}/data", "train.epochs=2", *extra])


def _snapshot(out):
    """{relative path: (size, mtime_ns)} of every file under ``out``."""
    got = {}
    for d, _, files in os.walk(out):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            got[os.path.relpath(p, out)] = (st.st_size, st.st_mtime_ns)
    return got


def test_resume_past_the_end_says_so_and_touches_nothing(comm, mpi_tmp_path, capsys):
    from mpifc.train import train

    tmp = _shared_dir(comm, mpi_tmp_path)
    out = f"{tmp}/past-end"
    train(_cfg(tmp), quiet=True, out=out)
    comm.barrier()
    before = _snapshot(out)
    capsys.readouterr()
    got = train(_cfg(tmp, "train.epochs=1"), quiet=True, out=out, resume=True)
    printed = capsys.readouterr().out
    assert "already at epoch 2 >= train.epochs = 1" in got["nothing_to_do"]
    comm.barrier()
    if comm.rank == 0:
        assert "nothing to do" in printed and "done in" not in printed
        assert _snapshot(out) == before          # trace, metrics, checkpoints untouched


def test_damaged_newest_checkpoint_falls_back_to_the_newest_that_verifies(comm, mpi_tmp_path,
                                                                           capsys):
    from mpifc.checkpoint import list_checkpoints
    from mpifc.train import Trainer

    tmp = _shared_dir(comm, mpi_tmp_path)
    out = f"{tmp}/damaged"
    tr = Trainer(_cfg(tmp, "train.trace=false"), quiet=True, comm=comm, out=out)
    tr.run()
    good = list_checkpoints(os.path.join(out, "checkpoints"))[-1][1]
    comm.barrier()
    if comm.rank == 0:     # a cut-off copy: a 0-byte newest checkpoint
        open(os.path.join(out, "checkpoints", "ckpt-999999.h5"), "wb").close()
    comm.barrier()
    again = Trainer(_cfg(tmp, "train.trace=false", "train.epochs=3"), quiet=True, comm=comm,
                    out=out)
    capsys.readouterr()
    info = again.resume()
    err = capsys.readouterr()
    assert info["path"] == good and again.step == tr.step
    if comm.rank == 0:
        assert "skipped" in err.err and "ckpt-999999.h5" in err.err
        assert "did not verify" in err.out and good in err.out
        # renamed aside: never resumed, listed or pruned in place of the run's own
        assert os.path.exists(os.path.join(out, "checkpoints", "ckpt-999999.h5.damaged"))
        assert list_checkpoints(os.path.join(out, "checkpoints"))[-1][1] == good
    comm.barrier()
    again.run()                                  # and the run goes on from there
    assert again.loader.position == (3, 0)


def test_best_checkpoint_survives_keep_last(comm, mpi_tmp_path):
    """Accuracy 0.5, 0.9, 0.2, 0.1: best.h5 keeps epoch 2 although keep_last = 1."""
    from mpifc.checkpoint import list_checkpoints, load, verify
    from mpifc.train import Trainer

    tmp = _shared_dir(comm, mpi_tmp_path)
    out = f"{tmp}/best"
    cfg = _cfg(tmp, "train.trace=false", "train.epochs=4", "train.keep_last=1",
               'train.keep_best="test_acc"')
    tr = Trainer(cfg, quiet=True, comm=comm, out=out)
    accs = iter([0.5, 0.9, 0.2, 0.1])
    tr.evaluate = lambda loader=None: {"test_loss": 1.0, "test_acc": next(accs)}
    tr.run()
    steps = tr.loader.steps_per_epoch
    ck = os.path.join(out, "checkpoints")
    assert tr.best == {"metric": "test_acc", "value": 0.9, "step": 2 * steps}
    comm.barrier()
    if comm.rank == 0:
        assert [s for s, _ in list_checkpoints(ck)] == [4 * steps]       # the last one only
        verify(os.path.join(ck, "best.h5"))
    meta = load(os.path.join(ck, "best.h5"), tr.model, None, tr.grid)
    assert meta["step"] == 2 * steps and meta["extra"]["best"]["value"] == 0.9
    # a resumed run knows the best so far: a worse epoch does not replace it
    again = Trainer(cfg, quiet=True, comm=comm, out=out)
    again.resume()
    assert again.best == tr.best


def test_keep_best_by_loss_and_off(comm, mpi_tmp_path):
    from mpifc.config import ConfigError
    from mpifc.train import Trainer

    tmp = _shared_dir(comm, mpi_tmp_path)
    for key, losses, want in (('"test_loss"', [0.9, 0.3, 0.5], 2), ('""', [0.9, 0.3, 0.5], None)):
        out = f"{tmp}/best-{key.strip(chr(34)) or 'off'}"
        tr = Trainer(_cfg(tmp, "train.trace=false", "train.epochs=3", f"train.keep_best={key}"),
                     quiet=True, comm=comm, out=out)
        it = iter(losses)
        tr.evaluate = lambda loader=None: {"test_loss": next(it), "test_acc": 0.5}
        tr.run()
        has = os.path.exists(os.path.join(out, "checkpoints", "best.h5"))
        if want is None:
            assert tr.best is None and not has
        else:
            assert tr.best["step"] == want * tr.loader.steps_per_epoch and has
    with pytest.raises(ConfigError, match="train.keep_best"):
        _cfg(tmp, 'train.keep_best="accuracy"')


# ---------------------------------------------------------------- bad data
def _features_with_nan(path, bad_row=37, value=np.nan):
    from mpifc.data import write_dataset

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[bad_row, 5] = value
    y = rng.integers(0, 10, 256)
    xt = rng.standard_normal((64, 64)).astype(np.float32)
    write_dataset(path, (x, y), (xt, rng.integers(0, 10, 64)),
                  class_names=[str(i) for i in range(10)], source="test", normalisation=None)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_in_features_is_a_data_error_not_an_lr_error(comm, mpi_tmp_path, value):
    from mpifc.data import DatasetError
    from mpifc.train import Trainer

    tmp = _shared_dir(comm, mpi_tmp_path)
    path = f"{tmp}/bad-{value}.h5"
    if comm.rank == 0:
        _features_with_nan(path, value=value)
    comm.barrier()
    cfg = _cfg(tmp, f"data.dataset={path}", "model.input=[64]", "train.trace=false")
    with pytest.raises(DatasetError) as e:
        Trainer(cfg, quiet=True, comm=comm, out=f"{tmp}/nan-run").run()
    msg = str(e.value)
    assert path in msg and "split 'train'" in msg and "sample 37" in msg
    assert "optim.lr" not in msg.replace("lowering optim.lr will not help", "")


def test_non_finite_loss_from_bad_input_blames_the_data(comm, mpi_tmp_path):
    """Input that turns bad after the loader checked it: the message names the data, not the lr."""
    from mpifc.data import DatasetError
    from mpifc.train import Trainer

    tmp = _shared_dir(comm, mpi_tmp_path)
    tr = Trainer(_cfg(tmp, "train.trace=false"), quiet=True, comm=comm, out=f"{tmp}/late-nan")
    tr.loader._read(np.array([0]))                        # fills the cache
    x = tr.loader._mem[0]
    first = int(tr.loader.plan.global_indices(0, 0)[0])   # the first sample of the first batch
    tr.loader._mem = (x.astype(np.float32), tr.loader._mem[1])
    tr.loader._mem[0][first] = np.nan
    with pytest.raises(DatasetError, match=rf"non-finite input at step 0 .*row {first} of split "
                                           "'train'.*lowering optim.lr will not help"):
        tr.run()


def test_resume_from_another_runs_directory_leaves_it_alone(comm, mpi_tmp_path):
    """Its damaged file is skipped but not renamed; its best.h5 is not this run's best."""
    from mpifc.train import Trainer

    tmp = _shared_dir(comm, mpi_tmp_path)
    src = f"{tmp}/src"
    Trainer(_cfg(tmp, "train.trace=false", "train.epochs=1"), quiet=True, comm=comm,
            out=src).run()
    comm.barrier()
    bad = os.path.join(src, "checkpoints", "ckpt-999999.h5")
    if comm.rank == 0:
        open(bad, "wb").close()
    comm.barrier()
    fork = Trainer(_cfg(tmp, "train.trace=false"), quiet=True, comm=comm, out=f"{tmp}/fork")
    info = fork.resume(os.path.join(src, "checkpoints"))
    assert info["step"] == fork.loader.steps_per_epoch and fork.best is None
    comm.barrier()
    assert os.path.exists(bad)
