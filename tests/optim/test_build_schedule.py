"""The trainer's schedules from a config: schedule.min_lr is every schedule's floor; a warm-up
longer than the run is shortened (with a note), not a crash; a resumed position keeps the
settings of the config given now."""
import math

import numpy as np
import pytest

from mpifc.config import load_config
from mpifc.nn import Parameter
from mpifc.optim import SGD, CosineWarmup, ReduceLROnPlateau, StepLR
from mpifc.train import build_schedule


def _opt(cfg):
    return SGD([Parameter(np.zeros(1), "w")], lr=cfg["optim"]["lr"])


def test_plateau_honours_min_lr():
    cfg = load_config("digits-cnn", ["optim.lr=0.05", "schedule.min_lr=0.01",
                                     "schedule.patience=0", "schedule.factor=0.5"])
    o = _opt(cfg)
    kind, s = build_schedule(cfg, o, steps_per_epoch=10)
    assert kind == "metric" and isinstance(s, ReduceLROnPlateau)
    lrs = [s.step(1.0) for _ in range(8)]          # the loss never improves after epoch 1
    assert lrs[:3] == [0.05, 0.025, 0.0125]
    assert min(lrs) == lrs[-1] == 0.01             # was 0.05 * 0.5**7 before: min_lr ignored


def test_step_honours_min_lr():
    cfg = load_config("digits-mlp", ["optim.lr=0.05", "schedule.name=step", "schedule.step_size=1",
                                     "schedule.gamma=0.1", "schedule.min_lr=0.001"])
    o = _opt(cfg)
    kind, s = build_schedule(cfg, o, steps_per_epoch=10)
    assert kind == "epoch"
    lrs = [s.step() for _ in range(4)]
    assert lrs == pytest.approx([0.005, 0.001, 0.001, 0.001])


def test_cosine_reaches_min_lr_at_the_end():
    cfg = load_config("cifar-cnn", ["schedule.min_lr=0.002", "train.epochs=2"])
    o = _opt(cfg)
    _, s = build_schedule(cfg, o, steps_per_epoch=40)
    lrs = [s.step() for _ in range(80)]
    assert max(lrs) == pytest.approx(0.02) and lrs[-1] == 0.002


@pytest.mark.parametrize("epochs,spe", [(1, 32), (1, 50), (2, 10), (1, 1)])
def test_warmup_not_shorter_than_the_run_is_shortened_with_a_note(epochs, spe):
    """cifar-cnn (warmup_steps = 50) on a run of <= 50 steps: a tenth of the run warms up."""
    cfg = load_config("cifar-cnn", [f"train.epochs={epochs}"])
    notes = []
    o = _opt(cfg)
    kind, s = build_schedule(cfg, o, steps_per_epoch=spe, note=notes.append)
    total = epochs * spe
    assert kind == "step" and isinstance(s, CosineWarmup)
    assert s.warmup == total // 10 and s.total == total
    assert len(notes) == 1
    assert "schedule.warmup_steps = 50" in notes[0] and f"{total} steps" in notes[0]
    assert f"shortened to {total // 10} steps" in notes[0]
    lrs = [o.lr] + [s.step() for _ in range(total)]
    assert all(0 <= lr <= 0.02 + 1e-15 for lr in lrs) and lrs[-1] == 0.0
    assert max(lrs) == pytest.approx(0.02)


def test_warmup_shorter_than_the_run_is_kept_silently():
    cfg = load_config("cifar-cnn")
    notes = []
    _, s = build_schedule(cfg, _opt(cfg), steps_per_epoch=64, note=notes.append)
    assert s.warmup == 50 and notes == []


def test_state_is_the_position_and_settings_come_from_the_constructor():
    """A checkpoint's schedule state restores where the schedule was, never its settings
    (older checkpoints stored base_lr, gamma, ... as well: those are ignored)."""
    o = SGD([Parameter(np.zeros(1), "w")], lr=0.01)
    s = StepLR(o, step_size=2, gamma=0.5)
    s.load_state_dict({"epoch": 4, "base_lr": 1.0, "gamma": 0.1, "step_size": 7})
    assert (s.epoch, s.base_lr, s.gamma, s.step_size) == (4, 0.01, 0.5, 2)
    assert s.current_lr() == pytest.approx(0.0025)
    assert s.state_dict() == {"epoch": 4}
    c = CosineWarmup(o, warmup_steps=2, total_steps=10)
    c.load_state_dict({"t": 6, "total": 99, "min_lr": 5.0})
    assert (c.t, c.total, c.min_lr) == (6, 10, 0.0) and c.state_dict() == {"t": 6}
    p = ReduceLROnPlateau(o, patience=3)
    p.load_state_dict({"best": 0.5, "num_bad": 2, "cooldown_left": 0, "patience": 9})
    assert p.state_dict() == {"best": 0.5, "num_bad": 2, "cooldown_left": 0} and p.patience == 3
    p2 = ReduceLROnPlateau(o)
    p2.load_state_dict({"best": math.inf, "num_bad": 0, "cooldown_left": 0})
    assert p2.best == math.inf
