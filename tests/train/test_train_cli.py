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
