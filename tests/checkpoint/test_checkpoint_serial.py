"""Checkpoints on one process: round trip, digest refusal, atomicity, keep-last-K, describe."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from mpifc.checkpoint import (CheckpointError, describe, latest_checkpoint, list_checkpoints, load,
                              save, set_rng_state, verify)
from mpifc.comm import Grid, world
from mpifc.optim import SGD, Adam

from joblaunch import child_env
from ckpt_helpers import ToyModel, full_state, grads_from, mismatches, trained

HERE = os.path.dirname(os.path.abspath(__file__))

# One process: these tests build a 1 x 1 grid. (pytest-mpi's --with-mpi also runs unmarked
# tests under mpiexec; at N > 1 the MPI file covers the same ground across ranks.)
pytestmark = pytest.mark.skipif(world().size != 1, reason="single-process checkpoint tests")


@pytest.fixture(scope="module")
def grid():
    return Grid(world(), 1, 1)


def _save(d, model, opt, grid, step, **kw):
    kw.setdefault("epoch", step // 10)
    return save(d, model, opt, grid, step=step, **kw)


# ---------------------------------------------------------------- round trip

@pytest.mark.parametrize("mode", ["gather", "per-rank"])
def test_round_trip_bit_exact(tmp_path, grid, mode):
    m, opt = trained(1)
    rng = np.random.default_rng(42)
    mt = np.random.Generator(np.random.MT19937(7))
    pos = {"epoch": 2, "step": 5, "n": 100, "split": "train"}
    path = _save(tmp_path, m, opt, grid, 25, data_position=pos, config="seed = 1\n",
                 rng_states={"data": rng, "mt": mt}, extra={"best": 0.5}, mode=mode)
    assert path == os.path.join(str(tmp_path), "ckpt-000025.h5")
    m2 = ToyModel(99)
    opt2 = Adam(m2.named_parameters(), lr=1.0, weight_decay=0.1)
    meta = load(tmp_path, m2, opt2, grid)
    bad = mismatches(full_state(m2, opt2), full_state(m, opt))
    print("round trip:", "OK" if not bad else f"BAD {bad}")
    assert not bad
    assert (meta["step"], meta["epoch"], meta["data_position"]) == (25, 2, pos)
    assert meta["config"] == "seed = 1\n" and meta["extra"] == {"best": 0.5}
    assert (opt2.lr, opt2.step_count) == (opt.lr, opt.step_count)
    assert meta["layout"] == {"world": 1, "dp": 1, "tp": 1}
    # generators continue exactly where the saved ones were
    r2, mt2 = np.random.default_rng(), np.random.Generator(np.random.MT19937(0))
    set_rng_state(r2, meta["rng_states"]["data"])
    set_rng_state(mt2, meta["rng_states"]["mt"])
    assert r2.random(4).tobytes() == rng.random(4).tobytes()
    assert mt2.random(4).tobytes() == mt.random(4).tobytes()


def test_resume_continues_bit_exact(tmp_path, grid):
    """Train 2 steps, save, train 2 more == load into a fresh model, train 2 more."""
    m, opt = trained(3, steps=2)
    _save(tmp_path, m, opt, grid, 2)
    for s in (2, 3):
        grads_from(3 + s, m)
        opt.step()
    m2 = ToyModel(0)
    opt2 = Adam(m2.named_parameters(), lr=0.01, weight_decay=0.1)
    load(tmp_path, m2, opt2, grid)
    for s in (2, 3):
        grads_from(3 + s, m2)
        opt2.step()
    assert not mismatches(full_state(m2, opt2), full_state(m, opt))


def test_lazy_optimizer_slot_stays_unset(tmp_path, grid):
    """SGD momentum is created on the first step: a step-0 checkpoint must restore 'none yet'."""
    m = ToyModel(1)
    opt = SGD(m.named_parameters(), lr=0.1, momentum=0.9)
    path = _save(tmp_path, m, opt, grid, 0)
    with h5py.File(path) as f:
        assert "optimizer/momentum" in f and len(f["optimizer/momentum"]) == 0
    m2 = ToyModel(2)
    opt2 = SGD(m2.named_parameters(), lr=0.1, momentum=0.9)
    m2.named_parameters()[0][1].grad[...] = 1.0
    opt2.step()                     # creates a momentum buffer that the load must clear
    load(path, m2, opt2, grid)
    assert all(b is None for b in opt2.state["momentum"])
    assert not mismatches(full_state(m2, None), full_state(m, None))


def test_file_path_and_layout_attributes(tmp_path, grid):
    m, opt = trained(4, grid.tp_comm)          # sharded over a tensor group of one
    path = save(tmp_path / "one.h5", m, opt, grid, step=7)
    assert path.endswith("one.h5") and os.path.exists(path)
    with h5py.File(path) as f:
        w = f["params/fc1.weight"]
        assert w.shape == (7, 5) and w.dtype == np.float32
        assert int(w.attrs["sharding_axis"]) == 0 and w.attrs["sharding_group"] == "tp"
        assert list(w.attrs["sharding_counts"]) == [7]
        assert int(f["params/fc2.bias"].attrs["sharding_axis"]) == -1
        assert f["buffers/bn.running_mean"].shape == (7,)
        assert f["optimizer/exp_avg/conv.weight"].shape == (5, 4, 3, 3)
        assert f.attrs["digest"].startswith("sha256:")
    assert verify(path) == h5py.File(path).attrs["digest"]


# ---------------------------------------------------------------- refusal

def _flip_byte_in(path, dataset):
    """Flip one bit of a tensor's stored bytes directly in the file (not through HDF5)."""
    with h5py.File(path, "r") as f:
        off = f[dataset].id.get_offset()
        assert off is not None
    with open(path, "r+b") as fh:
        fh.seek(off + 3)
        b = fh.read(1)
        fh.seek(off + 3)
        fh.write(bytes([b[0] ^ 0x10]))


def test_flipped_byte_is_refused_and_model_untouched(tmp_path, grid):
    m, opt = trained(5)
    path = _save(tmp_path, m, opt, grid, 1)
    _flip_byte_in(path, "params/conv.weight")
    m2, opt2 = trained(6)
    before = full_state(m2, opt2)
    with pytest.raises(CheckpointError, match=r"digest mismatch.*params/conv\.weight"):
        load(path, m2, opt2, grid)
    assert not mismatches(full_state(m2, opt2), before)    # never half-loaded
    with pytest.raises(CheckpointError, match="digest mismatch"):
        verify(path)
    assert "digest: BAD" in describe(path)


def test_altered_attribute_is_refused(tmp_path, grid):
    m, opt = trained(5)
    path = _save(tmp_path, m, opt, grid, 1)
    with h5py.File(path, "r+") as f:
        f.attrs["step"] = 999
    with pytest.raises(CheckpointError, match="digest mismatch"):
        load(path, ToyModel(0), None, grid)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file_is_refused(tmp_path, grid, keep):
    m, opt = trained(5)
    path = _save(tmp_path, m, opt, grid, 1)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))
    m2 = ToyModel(8)
    before = full_state(m2, None)
    with pytest.raises(CheckpointError, match="refusing to load.*(truncated|damaged)"):
        load(path, m2, None, grid)
    assert not mismatches(full_state(m2, None), before)


def test_missing_file_and_empty_directory(tmp_path, grid):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load(tmp_path / "nope.h5", ToyModel(0), None, grid)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load(tmp_path, ToyModel(0), None, grid)


def test_different_model_lists_mismatches(tmp_path, grid):
    from mpifc import nn

    m, opt = trained(5)
    path = _save(tmp_path, m, opt, grid, 1)
    other = nn.Sequential(nn.Linear(5, 7, seed=0), nn.Linear(7, 3, seed=0))
    with pytest.raises(CheckpointError, match=r"different model.*missing from the file: "
                                              r"/params/0\.weight.*not in this model"):
        load(path, other, None, grid)
    # same names, one shape changed
    import ckpt_helpers as H

    spec = list(H.SPEC)
    try:
        H.SPEC[0] = ("fc1", "weight", (8, 5), 0)
        H.SPEC[1] = ("fc1", "bias", (8,), 0)
        with pytest.raises(CheckpointError, match=r"shape mismatch: /params/fc1\.(bias|weight)"):
            load(path, ToyModel(0), None, grid)
    finally:
        H.SPEC[:] = spec


def test_optimizer_mismatch(tmp_path, grid):
    m, opt = trained(5)
    path = _save(tmp_path, m, opt, grid, 1)
    m2 = ToyModel(0)
    with pytest.raises(CheckpointError, match="optimizer is Adam, this run uses SGD"):
        load(path, m2, SGD(m2.named_parameters(), lr=0.1), grid)
    p2 = _save(tmp_path / "noopt", m, None, grid, 1)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load(p2, m2, Adam(m2.named_parameters()), grid)
    load(p2, m2, None, grid)   # model only is fine
    assert not mismatches(full_state(m2, None), full_state(m, None))


def test_bad_sharding_metadata_is_refused_before_writing(tmp_path, grid):
    from mpifc.nn.module import Sharding

    m, opt = trained(5)
    p = m.named_parameters()[0][1]
    p.sharding = Sharding(axis=0, group="tp", counts=(6,), index=0, global_shape=(6, 5))
    with pytest.raises(CheckpointError, match=r"fc1\.weight: local shape \(7, 5\)"):
        save(tmp_path, m, opt, grid, step=1)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- atomicity and retention

def test_keep_last_k(tmp_path, grid):
    m, opt = trained(5)
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, m, opt, grid, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40, 50]
    assert latest_checkpoint(tmp_path).endswith("ckpt-000050.h5")
    for step in (60, 70):
        _save(tmp_path, m, opt, grid, step, keep_last=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40, 50, 60, 70]
    assert load(tmp_path, ToyModel(0), None, grid)["step"] == 70


def test_exception_midway_keeps_previous_checkpoint(tmp_path, grid, monkeypatch):
    m, opt = trained(5)
    first = _save(tmp_path, m, opt, grid, 1)
    m_new, opt_new = trained(6)
    calls = {"n": 0}
    real = h5py.Dataset.__setitem__

    def failing(self, key, value):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("injected: disk full")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing)
    with pytest.raises(CheckpointError, match=r"injected: disk full.*previous checkpoint is untouched"):
        _save(tmp_path, m_new, opt_new, grid, 2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000001.h5"]     # temp file removed
    verify(first)
    m2 = ToyModel(0)
    load(tmp_path, m2, None, grid)
    assert not mismatches(full_state(m2, None), full_state(m, None))


KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    import h5py
    sys.path.insert(0, {here!r})
    from ckpt_helpers import trained
    from mpifc.checkpoint import save
    from mpifc.comm import Grid, world
    d, marker = sys.argv[1], sys.argv[2]
    grid = Grid(world(), 1, 1)
    m, opt = trained(11)
    save(d, m, opt, grid, step=1)
    real = h5py.Dataset.__setitem__
    n = [0]
    def slow(self, key, value):
        real(self, key, value)
        n[0] += 1
        if n[0] == 4:                      # midway through the second save
            open(marker, "w").close()
            time.sleep(120)
    h5py.Dataset.__setitem__ = slow
    m2, opt2 = trained(12)
    save(d, m2, opt2, grid, step=2)
""")


def test_save_killed_midway_keeps_previous_checkpoint(tmp_path, grid):
    d, marker = tmp_path / "ckpt", tmp_path / "marker"
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE.format(here=HERE))
    # a fresh singleton MPI process: drop the launcher's PMI connection if we run under mpiexec
    env = child_env(pythonpath=HERE)
    proc = subprocess.Popen([sys.executable, str(script), str(d), str(marker)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            if proc.poll() is not None or time.time() > deadline:
                out = proc.stdout.read().decode()
                pytest.fail(f"saver exited or stalled before the midway point:\n{out}")
            time.sleep(0.05)
        tmps = [n for n in os.listdir(d) if n.startswith(".ckpt-000002.h5.tmp-")]
        assert tmps, os.listdir(d)                       # the half-written file exists
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(d)] == [1]   # the torn save is invisible
    verify(d)
    m2 = ToyModel(0)
    meta = load(d, m2, Adam(m2.named_parameters()), grid)
    ref, ref_opt = trained(11)
    assert meta["step"] == 1 and not mismatches(full_state(m2, None), full_state(ref, None))
    # the next save cleans the stale temporary up
    _save(d, ref, ref_opt, grid, 3)
    assert sorted(os.listdir(d)) == ["ckpt-000001.h5", "ckpt-000003.h5"]


# ---------------------------------------------------------------- describe

def test_describe_checkpoint_and_directory(tmp_path, grid):
    m, opt = trained(5, grid.tp_comm)
    _save(tmp_path, m, opt, grid, 4)
    path = _save(tmp_path, m, opt, grid, 12, data_position={"epoch": 1, "step": 2})
    text = describe(path)
    print(text)
    assert "step 12, epoch 1" in text and "digest: OK" in text
    assert "fc1.weight" in text and "(7, 5)" in text and "axis 0 over tp [7]" in text
    assert "optimizer: Adam" in text and "replicated" in text
    dtext = describe(tmp_path)
    assert "step 4, step 12" in dtext and "ckpt-000012.h5" in dtext


def test_describe_dataset_and_refuses_other_files(tmp_path):
    from mpifc.data import write_dataset

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 255, (20, 1, 4, 4), dtype=np.uint8), rng.integers(0, 3, 20))
    test = (rng.integers(0, 255, (6, 1, 4, 4), dtype=np.uint8), rng.integers(0, 3, 6))
    p = write_dataset(tmp_path / "tiny.h5", train, test, class_names=["a", "b", "c"], source="test")
    text = describe(p)
    print(text)
    assert "mpifc dataset" in text and "train: 20 samples of (1, 4, 4) uint8" in text
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="neither an mpifc checkpoint nor an mpifc dataset"):
        describe(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(CheckpointError, match="cannot be read as HDF5"):
        describe(tmp_path / "junk.h5")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        describe(tmp_path / "absent.h5")


# ---------------------------------------------------------------- faults around the files

def test_prune_keeps_temporaries_of_live_jobs_and_other_hosts(tmp_path, grid):
    """Another live job's save in flight is not ours to delete; a dead one of this host is."""
    import socket

    m, opt = trained(5)
    d = tmp_path / "ckpt"
    _save(d, m, opt, grid, 1)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {"live": f".ckpt-000007.h5.tmp-{live.pid}@{host}",
             "live_old_name": f".ckpt-000008.h5.tmp-{live.pid}",
             "other_host": f".ckpt-000009.h5.tmp-{dead.pid}@node-that-is-not-here",
             "dead": f".ckpt-000010.h5.tmp-{dead.pid}@{host}",
             "dead_old_name": f".ckpt-000011.h5.tmp-{dead.pid}"}
    try:
        for n in names.values():
            (d / n).write_bytes(b"half a checkpoint")
        _save(d, m, opt, grid, 2, keep_last=1)
        left = set(os.listdir(d))
    finally:
        live.kill()
        live.wait()
    assert {names["live"], names["live_old_name"], names["other_host"]} <= left
    assert not {names["dead"], names["dead_old_name"]} & left
    assert "ckpt-000002.h5" in left and "ckpt-000001.h5" not in left


def test_prune_never_deletes_best(tmp_path, grid):
    from mpifc.checkpoint.atomic import publish_link

    m, opt = trained(5)
    p1 = _save(tmp_path, m, opt, grid, 1)
    publish_link(p1, str(tmp_path / "best.h5"))
    for s in (2, 3, 4):
        _save(tmp_path, m, opt, grid, s, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["best.h5", "ckpt-000004.h5"]
    assert load(tmp_path / "best.h5", ToyModel(0), None, grid)["step"] == 1


def test_newest_valid_skips_damaged_newer_files(tmp_path, grid):
    from mpifc.checkpoint import newest_valid

    m, opt = trained(5)
    good = _save(tmp_path, m, opt, grid, 3)
    (tmp_path / "ckpt-999999.h5").write_bytes(b"")
    bad = _save(tmp_path, m, opt, grid, 7)
    _flip_byte_in(bad, "params/conv.weight")
    found, skipped = newest_valid(tmp_path)
    assert found == good
    assert [os.path.basename(p) for p, _ in skipped] == ["ckpt-999999.h5", "ckpt-000007.h5"]
    assert "digest mismatch" in skipped[1][1] and "truncated or damaged" in skipped[0][1]


def test_inspect_reports_a_bad_digest_as_a_problem(tmp_path, grid):
    from mpifc.checkpoint.describe import inspect

    m, opt = trained(5)
    path = _save(tmp_path, m, opt, grid, 1)
    assert inspect(path)[1] is None
    _flip_byte_in(path, "params/conv.weight")
    text, problem = inspect(path)
    assert "digest: BAD" in text and "parameters" in text          # still summarised
    assert "digest does not match" in problem and path in problem


@pytest.mark.parametrize("layout", [5, "[1, 2]", "not json", '{"world": "two", "dp": 1, "tp": 1}'])
def test_malformed_layout_is_a_checkpoint_error(tmp_path, grid, layout):
    m, opt = trained(5)
    path = _save(tmp_path, m, opt, grid, 1)
    with h5py.File(path, "r+") as f:
        f.attrs["layout"] = layout
    with pytest.raises(CheckpointError, match="attribute 'layout' is missing or malformed"):
        describe(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load(path, ToyModel(0), None, grid)


def test_describe_dataset_prints_normalisation_readably(tmp_path):
    from mpifc.data import Normalisation, write_dataset

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 255, (20, 3, 4, 4), dtype=np.uint8), rng.integers(0, 3, 20))
    test = (rng.integers(0, 255, (6, 3, 4, 4), dtype=np.uint8), rng.integers(0, 3, 6))
    p = write_dataset(tmp_path / "n.h5", train, test, class_names=["a", "b", "c"], source="t",
                      normalisation=Normalisation.mean_std([0.5, 0.25, 0.125], [2.0, 1.0, 4.0]))
    text = describe(p)
    assert "normalisation: mean_std, mean [0.5, 0.25, 0.125], std [2, 1, 4]" in text
    assert "array(" not in text and "Normalisation(" not in text
