"""Config meaning in a real run: a short cifar-cnn run is not stopped by its warm-up; on
--resume a changed optim.lr is applied and said, an unchanged one keeps the checkpoint's lr."""
import json
import os
import subprocess
import sys

import pytest

from joblaunch import child_env
from mpifc.config import load_config


def test_short_cifar_run_is_not_stopped_by_the_warmup(tmp_path):
    """cifar-cnn warms up for 50 steps; 1 epoch of 128-sample batches is 32 steps."""
    p = subprocess.run([sys.executable, "-m", "mpifc", "train", "cifar-cnn",
                        "--set", "train.epochs=1", "--set", "train.batch_size=128",
                        "--set", "train.max_steps=2", "--set", "train.trace=false",
                        "--set", f"data.dir={tmp_path}/data", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, env=child_env())
    assert p.returncode == 0, p.stderr
    # stderr: the note, and rank 0's plain progress lines (stderr is not a terminal here)
    assert [l for l in p.stderr.splitlines() if not l.startswith("progress:")] == [
        "mpifc train: note: schedule.warmup_steps = 50 is not shorter than the run (1 epoch(s) "
        "x 32 steps = 32 steps): warm-up shortened to 3 steps, a tenth of the run"]
    assert "stopped mid-epoch" in p.stdout
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "ckpt-000002.h5")


def _trainer(preset, tmp, out, *sets, quiet=False):
    from mpifc.comm import world
    from mpifc.train import Trainer

    if world().size != 1:
        pytest.skip("serial test")
    cfg = load_config(preset, [f"data.dir={tmp}/data", "train.trace=false", "train.epochs=2",
                               "train.log_every=1", *sets])
    return Trainer(cfg, quiet=quiet, out=str(out))


def _lrs(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["lr"] for r in map(json.loads, f) if "epoch_s" not in r}


def test_resume_applies_a_new_lr_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    _trainer("digits-mlp", tmp_path, out, "train.max_steps=3", quiet=True).run()
    tr = _trainer("digits-mlp", tmp_path, out, "optim.lr=0.001", "train.max_steps=5")
    assert tr.resume() is not None
    said = capsys.readouterr().out
    assert "optim.lr: 0.001 (from this run's config; the checkpoint had 0.002)" in said
    assert tr.opt.lr == 0.001 and tr.step == 3
    tr.run()
    assert _lrs(out) == {1: 0.002, 2: 0.002, 3: 0.002, 4: 0.001, 5: 0.001}


def test_resume_with_the_same_lr_keeps_the_checkpoints_schedule_position(tmp_path, capsys):
    """Plateau: the reduced lr in the checkpoint is kept when optim.lr is unchanged."""
    out = tmp_path / "run"
    tr = _trainer("digits-mlp", tmp_path, out, "schedule.name=plateau", "train.max_steps=3", quiet=True)
    tr.run()
    tr.opt.lr = 0.0005          # as if the plateau had halved it twice
    tr.save()
    again = _trainer("digits-mlp", tmp_path, out, "schedule.name=plateau", "train.max_steps=4")
    again.resume()
    assert again.opt.lr == 0.0005 and "optim.lr:" not in capsys.readouterr().out


def test_resume_under_a_cosine_continues_its_position_from_the_new_base(tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["schedule.name=cosine", "schedule.warmup_steps=2"]
    _trainer("digits-mlp", tmp_path, out, *sets, "train.max_steps=4", quiet=True).run()
    tr = _trainer("digits-mlp", tmp_path, out, *sets, "optim.lr=0.001", "train.max_steps=5")
    tr.resume()
    kind, sched = tr.sched
    assert sched.t == 4 and sched.base_lr == 0.001
    assert tr.opt.lr == sched.lr_at(4) < 0.001
    said = capsys.readouterr().out
    assert "optim.lr: 0.001 (from this run's config; the checkpoint had 0.002); lr at this " \
           "point of the schedule" in said
