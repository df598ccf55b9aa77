"""Which loss a run watches, and early stopping on it (``train.early_stop``).

The plateau schedule and early stopping watch ``val_loss`` when the run has a
validation set (``data.validation_split`` > 0), else ``test_loss`` (else the train
loss): per-epoch losses the trainer has already reduced over every rank, so every
rank takes the same decision without another message.
"""
from __future__ import annotations

import math


def watched_loss(record: dict) -> tuple[str, float]:
    """(name, value) of the loss an epoch record is judged by: val_loss, else test_loss,
    else (a run without a test split, e.g. :func:`mpifc.fit` with ``test_data=None``)
    the epoch's train loss."""
    name = next(k for k in ("val_loss", "test_loss", "loss") if k in record)
    return name, float(record[name])


class EarlyStopping:
    """Stop after ``patience`` epochs in a row without a strictly lower watched loss.

    ``patience`` 0 never stops (the counters still run, so a run saved without early
    stop can be resumed with it). A NaN loss is never an improvement.
    """

    def __init__(self, patience: int):
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.patience = int(patience)
        self.best = math.inf
        self.best_epoch = 0
        self.bad = 0
        self.metric = ""
        self.stopped_at = 0          # the epoch (1-based) training stopped after; 0 = not

    def step(self, name: str, value: float, epoch: int) -> bool:
        """Record epoch ``epoch``'s (1-based) watched loss; True when training must stop."""
        self.metric = name
        if value < self.best:
            self.best, self.best_epoch, self.bad = float(value), int(epoch), 0
        else:
            self.bad += 1
        if self.patience and self.bad >= self.patience:
            self.stopped_at = int(epoch)
            return True
        return False

    def reason(self) -> str:
        """Why training stopped, one line."""
        return (f"stopped early after epoch {self.stopped_at}: {self.metric} has not improved "
                f"for {self.bad} epoch(s) (train.early_stop = {self.patience}); best "
                f"{self.best:.4f} at epoch {self.best_epoch}")

    def still_stopped(self) -> bool:
        """On resume: the saved run stopped early and this patience would stop it again."""
        return bool(self.stopped_at) and self.patience > 0 and self.bad >= self.patience

    def resumed(self) -> str | None:
        """On resume, after :meth:`load_state_dict`: a note when a run that stopped early
        goes on (this patience is 0 or larger), and the stop is forgotten; else None."""
        if not self.stopped_at or self.still_stopped():
            return None
        why = ("train.early_stop = 0 (off)" if not self.patience else
               f"train.early_stop = {self.patience} > {self.bad} epoch(s) without improvement")
        note = f"the run stopped early after epoch {self.stopped_at}; {why}: training on"
        self.stopped_at = 0
        return note

    def state_dict(self) -> dict:
        return {"best": None if math.isinf(self.best) else self.best,
                "best_epoch": self.best_epoch, "bad": self.bad, "metric": self.metric,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        best = state.get("best")
        self.best = math.inf if best is None else float(best)
        self.best_epoch = int(state.get("best_epoch", 0))
        self.bad = int(state.get("bad", 0))
        self.metric = str(state.get("metric", ""))
        self.stopped_at = int(state.get("stopped_at", 0))
