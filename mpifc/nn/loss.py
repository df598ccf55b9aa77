"""Losses: forward(pred, target) -> scalar, backward(dloss=1) -> dpred. N batch, Q classes."""
from __future__ import annotations

from mpifc.nn import functional as F


class SoftmaxCrossEntropy:
    """Mean softmax cross-entropy over non-ignored rows (stable log-sum-exp).

    Parameters
    ----------
    label_smoothing : e in [0, 1): target = (1-e)*onehot + e/Q
    ignore_index : rows whose target equals it add nothing and are not counted
    """

    def __init__(self, label_smoothing=0.0, ignore_index=-100):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)
        self._cache = None

    def forward(self, logits, target):
        """logits : (N, Q), target : (N,) ints -> 0-d loss array."""
        loss, self._cache = F.softmax_cross_entropy_forward(logits, target, self.label_smoothing,
                                                            self.ignore_index)
        return loss

    __call__ = forward

    def backward(self, dloss=1.0):
        """-> dlogits : (N, Q)."""
        return F.softmax_cross_entropy_backward(self._cache, dloss)


class MSELoss:
    """Mean over all elements of (pred - target)^2."""

    def forward(self, pred, target):
        if pred.shape != target.shape:
            raise ValueError(f"MSELoss: pred {pred.shape} and target {target.shape} differ")
        loss, self._diff = F.mse_forward(pred, target)
        return loss

    __call__ = forward

    def backward(self, dloss=1.0):
        return F.mse_backward(self._diff, dloss)
