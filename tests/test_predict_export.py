"""mpifc predict and mpifc export: same logits under any layout, exported tensors reproduce them.

The checkpoint: digits-mlp trained a few steps in float64 (so 1e-6 compares the
layouts, not float32 rounding). Serial tests run in the serial pytest run; the
layout test runs at every MPI size (dp = P and tp = P; dp 2 x tp 2 at 4 ranks).
"""
import json
import os

import h5py
import numpy as np
import pytest

from mpifc.config import load_config


def _train(comm, tmp):
    """A float64 digits-mlp checkpoint (rank 0's run directory) and the dataset path."""
    from mpifc.train import Trainer

    cfg = load_config("digits-mlp", [f"data.dir={tmp}/data", "train.trace=false",
                                     "train.epochs=1", "train.max_steps=8", "train.dtype=float64"])
    tr = Trainer(cfg, quiet=True, comm=comm, out=f"{tmp}/run")
    tr.run()
    return f"{tmp}/run", tr.data_path


def _forward_numpy(tensors, x):
    """digits-mlp by hand from its exported tensors: flatten, (linear, relu) x 2, linear."""
    h = x.reshape(x.shape[0], -1)
    for i in (1, 2, 3):
        h = h @ tensors[f"fc{i}.weight"].T + tensors[f"fc{i}.bias"]
        if i < 3:
            h = np.maximum(h, 0.0)
    return h


def _inputs(data_path, split="test"):
    """The normalised rows predict sees, in file order (the loader on one process)."""
    from mpifc.comm import world
    from mpifc.data import DistributedLoader

    solo = world().split(world().rank)
    ld = DistributedLoader(data_path, solo, split=split, batch_size=10**6, shuffle=False,
                           dtype=np.float64)
    b = ld.get_batch(0, 0)
    return np.asarray(b.x), np.asarray(b.y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mpifc.comm import world

    if world().size != 1:
        pytest.skip("serial tests")
    return _train(world(), str(tmp_path_factory.mktemp("pe")))


def test_predict_writes_logits_in_input_order(trained, tmp_path):
    from mpifc.predict import predict

    run, data = trained
    out = str(tmp_path / "p.h5")
    res = predict(run, data, out)
    x, y = _inputs(data)
    with h5py.File(out, "r") as f:
        logits, pred, labels = f["logits"][...], f["pred"][...], f["labels"][...]
        assert f.attrs["step"] == 8 and f.attrs["split"] == "test"
        assert f.attrs["checkpoint"].endswith("ckpt-000008.h5")
        assert json.loads(f.attrs["layout"]) == {"dp": 1, "tp": 1}
    assert logits.shape == (len(y), 10) and np.array_equal(labels, y)
    assert np.array_equal(pred, logits.argmax(1)) and np.array_equal(logits, res["logits"])
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]     # atomic: no leftovers
    tr_res = predict(run, data, None, split="train")
    assert tr_res["logits"].shape[0] == len(_inputs(data, "train")[1])


def test_exported_safetensors_reproduce_predict_logits(trained, tmp_path):
    """Done-when: the export loads in plain NumPy/safetensors and reproduces predict to 1e-6."""
    st = pytest.importorskip("safetensors.numpy")
    from mpifc.cli import main
    from mpifc.predict import predict

    run, data = trained
    path = str(tmp_path / "m.safetensors")
    assert main(["export", run, "--format", "safetensors", "--out", path]) == 0
    tensors = st.load_file(path)                      # plain safetensors + NumPy from here
    assert sorted(tensors) == sorted(f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias"))
    assert tensors["fc1.weight"].shape == (256, 64) and tensors["fc1.weight"].dtype == np.float64
    x, _ = _inputs(data)
    mine = _forward_numpy(tensors, x)
    theirs = predict(run, data, None)["logits"]
    diff = np.abs(mine - theirs).max()
    print(f"OK, maxdiff = {diff:.2e}")
    assert diff < 1e-6
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    assert meta["step"] == "8" and "digits" in meta["config"] and meta["format"] == "mpifc-export"
    assert load_config("digits-mlp")["model"]["layers"] == __import__("tomllib").loads(
        meta["config"])["model"]["layers"]


def test_npz_and_the_small_writer_hold_the_same_tensors(trained, tmp_path):
    from mpifc.export import export, read_tensors, write_safetensors

    run, _ = trained
    export(run + "/checkpoints", str(tmp_path / "m.npz"), "npz")
    tensors, meta = read_tensors(run + "/checkpoints")
    with np.load(tmp_path / "m.npz") as z:
        assert json.loads(str(z["__metadata__"]))["step"] == "8"
        for k, v in tensors.items():
            assert np.array_equal(z[k], v)
    # the hand-written format (no package): header length, JSON header, raw LE bytes
    write_safetensors(str(tmp_path / "h.safetensors"), tensors, meta)
    raw = (tmp_path / "h.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    assert head["__metadata__"]["config"] == meta["config"]
    for k, v in tensors.items():
        a, b = head[k]["data_offsets"]
        got = np.frombuffer(raw[8 + n + a: 8 + n + b], dtype="<f8").reshape(head[k]["shape"])
        assert head[k]["dtype"] == "F64" and np.array_equal(got, v)
    st = pytest.importorskip("safetensors.numpy")
    back = st.load_file(str(tmp_path / "h.safetensors"))
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())


def test_mistakes_are_one_line(trained, tmp_path):
    """A missing checkpoint, input file or split: one line naming it (the SystemExit text
    every rank agrees on; Python prints it, status 1), and no output file."""
    from mpifc.cli import main

    run, data = trained
    cases = [(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.st")],
              "mpifc export:", "nope"),
             (["predict", run, str(tmp_path / "none.h5"), "--out", str(tmp_path / "p.h5")],
              "mpifc predict:", "none.h5"),
             (["predict", run, data, "--split", "valid", "--out", str(tmp_path / "p.h5")],
              "mpifc predict:", "valid"),
             (["plot", str(tmp_path)], "mpifc plot:", "metrics.jsonl")]
    for argv, start, names in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        msg = str(e.value.code)
        assert msg.startswith(start) and names in msg and "\n" not in msg, msg
    assert not os.path.exists(tmp_path / "x.st") and not os.path.exists(tmp_path / "p.h5")


@pytest.mark.mpi(min_size=1)
def test_predict_same_logits_under_every_layout(comm, mpi_tmp_path):
    """Predict at P ranks as dp = P and tp = P (and dp 2 x tp 2 at 4) == serial, to 1e-6."""
    from mpifc.predict import predict

    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    run, data = _train(comm, tmp)
    solo = comm.split(comm.rank)
    ref = predict(run, data, None, comm=solo)["logits"] if comm.rank == 0 else None
    layouts = {"dp": [f"parallel.dp={comm.size}", "parallel.tp=1"],
               "tp": ["parallel.dp=1", f"parallel.tp={comm.size}"]}
    if comm.size == 4:
        layouts["dp2xtp2"] = ["parallel.dp=2", "parallel.tp=2"]
    for name, lay in layouts.items():
        out = f"{tmp}/pred-{name}.h5"
        res = predict(run, data, out, overrides=lay, comm=comm)
        if comm.rank == 0:
            diff = np.abs(res["logits"] - ref).max()
            print(f"OK {name} at {comm.size} rank(s), maxdiff = {diff:.2e}")
            assert diff < 1e-6
            with h5py.File(out, "r") as f:
                assert np.array_equal(f["logits"][...], res["logits"])
        else:
            assert res is None
