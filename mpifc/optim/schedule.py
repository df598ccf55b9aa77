"""Learning-rate schedules. They set ``optimizer.lr``; ``base_lr`` is the lr at construction.

Every schedule has a floor, ``min_lr``, and splits its state in two: settings (given
to the constructor, e.g. from a config) and a position (``counters``: what
``state_dict`` saves and ``load_state_dict`` restores). A resumed run therefore
continues the saved position under the settings it is given now. Schedules whose lr is
a function of their position (:class:`StepLR`, :class:`CosineWarmup`) give it with
``current_lr()``; :class:`ReduceLROnPlateau`'s lr is the optimizer's own.
"""
from __future__ import annotations

import math


class _Schedule:
    counters: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        """The position (JSON-able), not the settings."""
        return {k: getattr(self, k) for k in self.counters}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; keys that are not counters (older checkpoints saved the
        settings too) are ignored, so the settings stay the ones given now."""
        for k in self.counters:
            if k in state:
                setattr(self, k, type(getattr(self, k))(state[k]))


class StepLR(_Schedule):
    """lr = max(base_lr * gamma ** (epoch // step_size), min_lr); ``step()`` once per epoch."""

    counters = ("epoch",)

    def __init__(self, optimizer, step_size, gamma=0.1, min_lr=0.0):
        if step_size < 1:
            raise ValueError("step_size must be >= 1")
        self.opt, self.step_size, self.gamma = optimizer, int(step_size), float(gamma)
        self.min_lr = float(min_lr)
        self.base_lr = optimizer.lr
        self.epoch = 0

    def lr_at(self, epoch):
        return max(self.base_lr * self.gamma ** (epoch // self.step_size), self.min_lr)

    def current_lr(self):
        return self.lr_at(self.epoch)

    def step(self):
        self.epoch += 1
        self.opt.lr = self.lr_at(self.epoch)
        return self.opt.lr


class CosineWarmup(_Schedule):
    """Linear warm-up then cosine decay, per optimizer step.

    lr(t) = base * (t+1) / warmup                                    for t < warmup
    lr(t) = min_lr + (base - min_lr) * (1 + cos(pi * u)) / 2,  u = (t - warmup) / (total - warmup)
    and min_lr for t >= total. ``lr(0)`` is applied at construction; ``step()`` advances t.
    """

    counters = ("t",)

    def __init__(self, optimizer, warmup_steps, total_steps, min_lr=0.0):
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError("need 0 <= warmup_steps < total_steps")
        self.opt = optimizer
        self.warmup, self.total, self.min_lr = int(warmup_steps), int(total_steps), float(min_lr)
        self.base_lr = optimizer.lr
        self.t = 0
        self.opt.lr = self.lr_at(0)

    def lr_at(self, t):
        if t < self.warmup:
            return self.base_lr * (t + 1) / self.warmup
        if t >= self.total:
            return self.min_lr
        u = (t - self.warmup) / (self.total - self.warmup)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * u))

    def current_lr(self):
        return self.lr_at(self.t)

    def step(self):
        self.t += 1
        self.opt.lr = self.lr_at(self.t)
        return self.opt.lr


class ReduceLROnPlateau(_Schedule):
    """Multiply lr by ``factor`` when a metric stops improving for ``patience`` epochs.

    Same rule as PyTorch: a value improves on ``best`` if (mode "min", threshold_mode
    "rel") value < best * (1 - threshold), ("abs") value < best - threshold; "max"
    mirrors it. After a reduction, ``cooldown`` epochs pass before bad epochs count.
    lr never goes below ``min_lr``; changes smaller than ``eps`` are skipped.
    """

    counters = ("best", "num_bad", "cooldown_left")

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8):
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise ValueError("mode must be min|max and threshold_mode rel|abs")
        if not 0.0 < factor < 1.0:
            raise ValueError("factor must be in (0, 1)")
        self.opt, self.mode, self.factor = optimizer, mode, float(factor)
        self.patience, self.threshold, self.threshold_mode = int(patience), float(threshold), threshold_mode
        self.cooldown, self.min_lr, self.eps = int(cooldown), float(min_lr), float(eps)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad = 0
        self.cooldown_left = 0

    def _better(self, a, best):
        if self.mode == "min":
            return a < (best * (1 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold)
        return a > (best * (1 + self.threshold) if self.threshold_mode == "rel" else best + self.threshold)

    def step(self, metric):
        metric = float(metric)
        if self._better(metric, self.best):
            self.best, self.num_bad = metric, 0
        else:
            self.num_bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            new = max(self.opt.lr * self.factor, self.min_lr)
            if self.opt.lr - new > self.eps:
                self.opt.lr = new
            self.cooldown_left, self.num_bad = self.cooldown, 0
        return self.opt.lr
