"""A run directory holds one run: the lock, refusing to mix, --overwrite, stale traces.

Serial tests of :mod:`mpifc.rundir` on the world communicator of one process.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from mpifc import rundir
from mpifc.train import TrainingError


def _fake_run(out, ranks=2):
    """The files a finished run leaves, plus a user's file that must survive."""
    ck, tr = out / "checkpoints", out / "trace"
    ck.mkdir(parents=True)
    tr.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    for s in (23, 46):
        (ck / f"ckpt-{s:06d}.h5").write_bytes(b"x")
    (ck / ".ckpt-000069.h5.tmp-1@elsewhere").write_bytes(b"x")
    for r in range(ranks):
        (tr / f"trace.rank{r}.jsonl").write_text("")
    (tr / "trace.chrome.json").write_text("{}")
    (out / "notes.txt").write_text("mine")


@pytest.fixture
def world():
    from mpifc.comm import world
    return world()


def test_a_second_run_into_a_used_directory_is_refused(tmp_path, world):
    out = tmp_path / "run"
    _fake_run(out)
    with pytest.raises(TrainingError) as e:
        rundir.claim(world, str(out))
    msg = str(e.value)
    assert "--resume" in msg and "--overwrite" in msg and str(out) in msg and "\n" not in msg
    assert not (out / rundir.LOCK_NAME).exists()          # a refusal leaves no lock behind
    assert (out / "metrics.jsonl").exists()


def test_resume_continues_and_overwrite_deletes_only_run_outputs(tmp_path, world):
    out = tmp_path / "run"
    _fake_run(out)
    c = rundir.claim(world, str(out), resume=True)
    assert (out / rundir.LOCK_NAME).exists()
    c.release()
    assert not (out / rundir.LOCK_NAME).exists()
    c = rundir.claim(world, str(out), overwrite=True)
    c.release()
    assert rundir.outputs(str(out)) == []
    assert sorted(os.listdir(out)) == ["notes.txt"]        # the user's file stays
    assert any("deleted" in n for n in c.notes)


def test_overwrite_cannot_delete_what_resume_reads(tmp_path, world):
    out = tmp_path / "run"
    _fake_run(out)
    with pytest.raises(TrainingError, match="--overwrite"):
        rundir.claim(world, str(out), resume=True, overwrite=True)
    assert (out / "checkpoints" / "ckpt-000046.h5").exists()


def test_resume_of_another_run_into_a_used_directory_is_refused(tmp_path, world):
    out = tmp_path / "run"
    _fake_run(out)
    with pytest.raises(TrainingError, match="holds another run"):
        rundir.claim(world, str(out), resume=str(tmp_path / "other" / "ckpt-000001.h5"))


def test_stale_trace_files_of_a_larger_job_are_removed(tmp_path):
    tr = tmp_path / "trace"
    tr.mkdir()
    for r in range(3):
        (tr / f"trace.rank{r}.jsonl").write_text("")
    (tr / "other.rank5.jsonl").write_text("")
    gone = rundir.remove_stale_traces(str(tr), 2)
    assert [os.path.basename(p) for p in gone] == ["trace.rank2.jsonl"]
    assert sorted(os.listdir(tr)) == ["other.rank5.jsonl", "trace.rank0.jsonl",
                                      "trace.rank1.jsonl"]


# ---------------------------------------------------------------- the lock
def _write_lock(out, host, pid):
    out.mkdir(parents=True, exist_ok=True)
    (out / rundir.LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid,
                                                    "started": "2026-01-01T00:00:00"}))


def test_a_live_owner_refuses_the_second_job_naming_it(tmp_path, world):
    out = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, socket.gethostname(), other.pid)
        with pytest.raises(TrainingError) as e:
            rundir.claim(world, str(out))
        assert f"pid {other.pid}" in str(e.value) and "in use" in str(e.value)
        assert json.loads((out / rundir.LOCK_NAME).read_text())["pid"] == other.pid
    finally:
        other.kill()
        other.wait()


def test_a_dead_owner_of_this_host_is_taken_over_with_a_note(tmp_path, world):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(out, socket.gethostname(), dead.pid)
    c = rundir.claim(world, str(out))
    assert any(f"pid {dead.pid}" in n and "no longer running" in n for n in c.notes)
    assert json.loads((out / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    c.release()
    assert not (out / rundir.LOCK_NAME).exists()


def test_an_owner_on_another_host_is_refused_with_how_to_remove_it(tmp_path, world):
    out = tmp_path / "run"
    _write_lock(out, "node-that-is-not-here", 4242)
    with pytest.raises(TrainingError) as e:
        rundir.claim(world, str(out))
    msg = str(e.value)
    assert "node-that-is-not-here" in msg and "4242" in msg
    assert f"delete {out / rundir.LOCK_NAME}" in msg


def test_the_lock_is_released_when_training_fails(tmp_path, world):
    """train() gives the directory back on an error (here: a dataset that does not exist)."""
    from mpifc.config import load_config
    from mpifc.train import train

    cfg = load_config("digits-mlp", [f"data.dataset={tmp_path}/missing.h5", "train.trace=false"])
    out = tmp_path / "run"
    with pytest.raises(Exception, match="missing.h5"):
        train(cfg, quiet=True, out=str(out))
    assert not (out / rundir.LOCK_NAME).exists()


def test_relative_data_paths_of_older_checkpoints_resolve_against_the_start_dir(tmp_path):
    from mpifc.config import load_config

    cfg = load_config("digits-mlp", ["data.dataset=runs/data/cifar10.h5"])    # relative, as before
    ck = str(tmp_path / "a" / "runs" / "digits-mlp" / "checkpoints" / "ckpt-000001.h5")
    got = rundir.stored_data_paths(cfg, ck)["data"]
    assert got["dir"] == str(tmp_path / "a" / "runs" / "data")
    assert got["dataset"] == str(tmp_path / "a" / "runs" / "data" / "cifar10.h5")
    # absolute paths (what runs store now) are kept as they are
    cfg["data"].update(dir="/data/x", dataset="digits")
    assert rundir.stored_data_paths(cfg, ck) is cfg


def test_resume_of_a_run_without_checkpoints_is_refused(tmp_path, world):
    """It would start afresh and append to the old run's metrics."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(TrainingError, match="no checkpoint to --resume from"):
        rundir.claim(world, str(out), resume=True)
