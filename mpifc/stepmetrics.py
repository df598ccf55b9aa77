"""The training loop's per-step metrics, kept where the model computes, read back in windows.

Each step gives this rank's loss sum and correct count as values where the model lives:
0-d device arrays under ``train.device = "cuda"`` (reading one back to the host waits
for the GPU to finish the step: a synchronisation per read), NumPy values on the host.
:class:`StepMetrics` writes them into a small (capacity, 2) float64 array on the same
device and hands them to the host in one copy per *window*:

* on a device, a window ends at each ``log_every`` step and at the end of an epoch (or
  of the run: ``max_steps``) -- one device-to-host copy of 16 bytes per step in it;
* on the host, every step is a window of one (a read costs nothing there, and the
  trainer's non-finite check then stops the run at the step that went bad, as it
  always did).

The trainer checks the window's losses on the host (one agreement allreduce per
window, as it did per step) and, when one is not finite, finds the first bad step of
the window over all ranks (:meth:`mpifc.trainer.Trainer.run`): the error still names
the exact step.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mpifc.backend import to_host


class StepRecord(NamedTuple):
    """What the host knows of a step without reading the device."""

    step: int          # steps completed before this one (the trainer's self.step)
    epoch: int         # the batch's epoch (0-based)
    batch: int         # the batch's step within the epoch (0-based)
    rows: int          # this rank's rows


class StepMetrics:
    """A window of per-step (loss sum, correct) values on ``xp``'s device.

    ``every_step``: the window holds one step (the host: nothing to save by waiting).
    """

    def __init__(self, xp, capacity: int, every_step: bool):
        self.every_step = bool(every_step)
        self.capacity = 1 if self.every_step else max(int(capacity), 1)
        self._buf = xp.zeros((self.capacity, 2), dtype=np.float64)
        self._steps: list[StepRecord] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, loss_sum, correct, record: StepRecord) -> None:
        """Keep one step's values (device to device: no host read)."""
        if len(self._steps) >= self.capacity:
            raise RuntimeError("StepMetrics: window full; take() it first")
        i = len(self._steps)
        self._buf[i, 0] = loss_sum
        self._buf[i, 1] = correct
        self._steps.append(record)

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    def take(self) -> tuple[np.ndarray, list[StepRecord]]:
        """(values (n, 2) float64 on the host, their steps); empties the window.

        One device-to-host copy of the n rows."""
        n = len(self._steps)
        vals = np.array(to_host(self._buf[:n]), dtype=np.float64, copy=True)
        steps, self._steps = self._steps, []
        return vals, steps
