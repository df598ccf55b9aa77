"""`mpifc train / eval / inspect` end to end under mpiexec (child jobs)."""
import json
import os
import re
import subprocess
import sys

import pytest

from joblaunch import MPIEXEC, child_env, run_job

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")


def mpifc(*args, n=None, timeout=240, cwd=None):
    cmd = [sys.executable, "-m", "mpifc", *args]
    if n:
        p, _ = run_job(cmd, n, timeout=timeout, cwd=cwd)
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(),
                           cwd=cwd)
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """digits-cnn, 2 ranks, dp=1 x tp=2, 2 epochs."""
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    p = mpifc("train", "digits-cnn", "--set", "train.epochs=2", "--set", "parallel.tp=2",
              "--set", f"data.dir={tmp}/data", "--out", str(out), n=2)
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p.stdout


def test_train_prints_where_everything_went(trained):
    out, stdout = trained
    assert "2 rank(s) as dp=1 x tp=2" in stdout
    ckpt = re.search(r"^checkpoint (\S+)", stdout, re.M).group(1)
    metrics = re.search(r"^metrics +(\S+)", stdout, re.M).group(1)
    chrome = re.search(r"^trace +(\S+)", stdout, re.M).group(1)
    assert os.path.exists(ckpt) and os.path.exists(metrics)
    with open(chrome) as f:
        events = json.load(f)["traceEvents"]
    assert {e["tid"] for e in events if e.get("ph") == "X"} == {0, 1}   # a track per rank
    with open(metrics) as f:
        recs = [json.loads(line) for line in f]
    assert [r["epoch"] for r in recs] == [1, 2]
    assert recs[-1]["comm_s"] > 0


def test_eval_reloads_into_another_layout(trained):
    """The tp=2 checkpoint evaluated on 1 rank gives the accuracy the run reported."""
    out, stdout = trained
    acc = float(re.findall(r"test_acc (\d\.\d+)", stdout)[-1])
    p = mpifc("eval", str(out / "checkpoints"))
    assert p.returncode == 0, p.stderr
    assert "saved as dp=1 x tp=2, evaluated as dp=1 x tp=1" in p.stdout
    got = float(re.search(r"test_acc (\d\.\d+)", p.stdout).group(1))
    assert got == pytest.approx(acc, abs=1e-4)


def test_inspect_checkpoint(trained):
    out, _ = trained
    p = mpifc("inspect", str(out / "checkpoints"))
    assert p.returncode == 0, p.stderr
    assert "tp" in p.stdout and "weight" in p.stdout


def test_bad_input_is_a_clear_error(tmp_path):
    p = mpifc("train", "no-such-preset")
    assert p.returncode != 0 and "neither a config file nor a preset" in p.stderr
    p = mpifc("train", "digits-mlp", "--set", "train.epochs=0")
    assert p.returncode != 0 and "train.epochs must be an integer >= 1" in p.stderr
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    p = mpifc("eval", str(bad))
    assert p.returncode != 0 and "mpifc eval" in p.stderr


def test_impossible_layout_fails_on_every_rank_without_hanging(tmp_path):
    p = mpifc("train", "digits-mlp", "--set", "parallel.tp=2", "--set", f"data.dir={tmp_path}",
              n=3, timeout=60)
    assert p.returncode != 0
    assert "tp=2" in p.stderr or "tp = 2" in p.stderr


def test_print_config_shows_overrides():
    p = mpifc("train", "digits-cnn", "--set", "optim.lr=0.01", "--print-config")
    assert p.returncode == 0 and "lr = 0.01" in p.stdout


# ---------------------------------------------------------------- one run per directory
def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_run_directory_holds_one_run(tmp_path):
    """3 ranks, then: a second run is refused; --resume on 2 ranks leaves no rank-2 trace;
    --overwrite starts over (its own checkpoint printed and kept, fresh metrics)."""
    out, data = tmp_path / "run", f"data.dir={tmp_path}/data"
    base = ["train", "digits-mlp", "--out", str(out), "--set", data]
    p = mpifc(*base, "--set", "train.epochs=1", n=3)
    assert p.returncode == 0, p.stdout + p.stderr
    first = p.stderr
    assert os.path.exists(out / "trace" / "trace.rank2.jsonl")
    metrics = (out / "metrics.jsonl").read_text()

    p = mpifc(*base, "--set", "train.epochs=2", "--set", "parallel.tp=2", n=2, timeout=120)
    assert p.returncode != 0
    assert "--resume" in p.stderr and "--overwrite" in p.stderr
    assert "already holds a run" in p.stderr
    assert (out / "metrics.jsonl").read_text() == metrics            # untouched
    assert not (out / ".mpifc.lock").exists()

    p = mpifc(*base, "--set", "train.epochs=2", "--resume", n=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(out / "trace")) == ["trace.chrome.json", "trace.rank0.jsonl",
                                                 "trace.rank1.jsonl", "trace.summary.txt"]
    assert [r["epoch"] for r in _records(out / "metrics.jsonl")] == [1, 2]

    p = mpifc(*base, "--set", "train.max_steps=3", "--overwrite", "--quiet", n=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "deleted the previous run's outputs" in p.stderr and "progress:" not in p.stderr
    ckpt = re.search(r"^checkpoint (\S+)", p.stdout, re.M).group(1)
    assert ckpt.endswith("ckpt-000003.h5") and os.path.exists(ckpt)
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-000003.h5"]
    assert [r["step"] for r in _records(out / "metrics.jsonl")] == [3]
    assert not (out / ".mpifc.lock").exists()
    # progress under mpiexec (stderr is a pipe): plain lines, from rank 0 only
    assert len(re.findall(r"^progress: epoch 1/1  step 1/\d+  loss", first, re.M)) == 1


def test_eval_from_another_working_directory(tmp_path):
    """Relative data.dir and out (the defaults) in the run; eval from elsewhere, --best too."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    p = mpifc("data", "prepare", "digits", cwd=a)          # runs/data/digits.h5, relative
    assert p.returncode == 0, p.stdout + p.stderr
    p = mpifc("train", "digits-mlp", "--set", "train.epochs=1", "--quiet",
              "--set", "data.dataset=runs/data/digits.h5", cwd=a)
    assert p.returncode == 0, p.stdout + p.stderr
    acc = float(re.search(r"test accuracy (\d\.\d+)", p.stdout).group(1))
    run = a / "runs" / "digits-mlp"
    p = mpifc("eval", str(run / "checkpoints"), cwd=b)
    assert p.returncode == 0, p.stdout + p.stderr
    got = float(re.search(r"test_acc (\d\.\d+)", p.stdout).group(1))
    assert got == pytest.approx(acc, abs=1e-4)
    assert str(a / "runs" / "data" / "digits.h5") in p.stdout
    p = mpifc("eval", str(run), "--best", cwd=b)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "best.h5" in p.stdout


def test_inspect_exits_non_zero_on_a_damaged_checkpoint(trained, tmp_path):
    import shutil

    import h5py

    out, _ = trained
    src = sorted((out / "checkpoints").glob("ckpt-*.h5"))[-1]
    bad = tmp_path / "ckpt-000001.h5"
    shutil.copy(src, bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["step"] = 12345
    p = mpifc("inspect", str(bad))
    assert p.returncode == 1
    assert "digest: BAD" in p.stdout and "parameters" in p.stdout       # summary still printed
    assert "digest does not match" in p.stderr
    with h5py.File(bad, "r+") as f:
        f.attrs["layout"] = 7
    p = mpifc("inspect", str(bad))
    assert p.returncode != 0 and "attribute 'layout' is missing or malformed" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_second_job_on_a_busy_run_directory_is_refused(tmp_path):
    """Job A trains; job B on the same directory is refused naming A; after A dies, its
    lock is taken over with a note."""
    import signal
    import time

    out = tmp_path / "run"
    a = subprocess.Popen([sys.executable, "-m", "mpifc", "train", "digits-mlp", "--quiet",
                          "--set", "train.epochs=200", "--set", f"data.dir={tmp_path}/data",
                          "--out", str(out)], env=child_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():       # A is training
            assert a.poll() is None and time.time() < deadline, "job A did not start"
            time.sleep(0.2)
        p = mpifc("train", "digits-mlp", "--resume", "--set", "train.max_steps=1",
                  "--set", f"data.dir={tmp_path}/data", "--out", str(out), n=2, timeout=120)
        assert p.returncode != 0
        assert f"in use by pid {a.pid}" in p.stderr
        assert a.poll() is None                            # A goes on
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait(30)
    p = mpifc("train", "digits-mlp", "--overwrite", "--set", "train.max_steps=2", "--quiet",
              "--set", f"data.dir={tmp_path}/data", "--out", str(out), n=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"took over the lock of {out} left by pid {a.pid}" in p.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-000002.h5"]
