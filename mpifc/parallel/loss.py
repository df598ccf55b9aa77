"""Class-parallel softmax cross-entropy and accuracy: logits stay sharded over classes.

N batch, Q classes, Q_r this rank's classes (uneven: 10 classes over 3 ranks is
4, 3, 3; an empty shard still joins every allreduce).

    m      = max_q z[n, q]                      allreduce max   (N,)
    s, zt  = sum_q exp(z - m), z[n, target]     allreduce sum   (2N,) one fused buffer
    loss   = mean_n (log s + m - zt)
    dz_r   = (exp(z_r - m) / s - onehot_r) / N  no message
"""
from __future__ import annotations

import numpy as np

from mpifc.backend import get_array_module, is_device_array
from mpifc.nn.module import ShapeError
from mpifc.parallel.base import ParallelModule
from mpifc.parallel.init import shard_counts


class ParallelSoftmaxCrossEntropy(ParallelModule):
    """Mean softmax cross-entropy on class-sharded logits, without gathering them.

    Contract row:

    ========================================= ============================================ ==========
    layer                                     forward                                      backward
    ========================================= ============================================ ==========
    class-parallel softmax cross-entropy      allreduce max, allreduce sum-exp, allreduce   none
                                              target logit (the two sums share one buffer)
    ========================================= ============================================ ==========

    Parameters
    ----------
    num_classes : Q
    group : Communicator that splits the classes (the same group, and the same
        balanced counts, as the ColumnParallelLinear that produced the logits)
    name : phase prefix ("loss.forward", "loss.metrics")
    """

    def __init__(self, num_classes, group, *, name="loss", dtype=np.float32):
        super().__init__()
        self.num_classes, self.group, self.name = int(num_classes), group, name
        self.dtype = np.dtype(dtype)
        self.counts = shard_counts(self.num_classes, group)
        self.Q_r = self.counts[group.rank]
        self.offset = sum(self.counts[: group.rank])
        self._cache = None

    def forward(self, logits, target):
        """logits : (N, Q_r), target : (N,) global class ids -> 0-d loss (same on every rank)."""
        xp = get_array_module(logits)
        N = logits.shape[0]
        self._check_input(logits, logits.ndim == 2 and logits.shape[1] == self.Q_r,
                          lambda: f"(N, {self.Q_r}): its {self.Q_r} of {self.num_classes} classes")
        if target.shape != (N,):
            self._refuse("target", target.shape, f"({N},) to match logits {tuple(logits.shape)}")
        if target.dtype.kind not in "iu":
            raise ShapeError(f"{self._where()}: target has dtype {target.dtype}, expected integer class ids")
        # host targets only: on a device the range is two scalar reads per step (the
        # loader checks labels on the host, before the copy)
        if N and not is_device_array(target) and (
                int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(f"{self.name}: target class ids must be in [0, {self.num_classes})")
        with self.phase("forward"):
            # an empty shard contributes -inf to the max and 0 to the sums
            m = logits.max(axis=1) if self.Q_r else xp.full(N, -np.inf, dtype=logits.dtype)
            self.group.allreduce(m, op="max", out=m)
            e = xp.exp(logits - m[:, None])
            local_t = target - self.offset
            mine = (local_t >= 0) & (local_t < self.Q_r)
            sums = xp.empty(2 * N, dtype=logits.dtype)
            sums[:N] = e.sum(axis=1)
            zt = xp.zeros(N, dtype=logits.dtype)
            if self.Q_r:
                rows = xp.nonzero(mine)[0]
                zt[rows] = logits[rows, local_t[rows]]
            sums[N:] = zt
            self.group.allreduce(sums, out=sums)
        s, zt = sums[:N], sums[N:]
        loss = (xp.log(s) + m - zt).mean() if N else xp.zeros((), dtype=logits.dtype)
        if N and is_device_array(target):    # out-of-range ids unchecked above: a NaN loss
            bad = ((target < 0) | (target >= self.num_classes)).any()
            loss = xp.where(bad, np.nan, loss).astype(loss.dtype)
        self._cache = (logits, e, s, m, local_t, mine)
        return loss

    __call__ = forward

    def backward(self, dloss=1.0):
        """-> dlogits : (N, Q_r) = (softmax_r - onehot_r) / N * dloss. No message."""
        logits, e, s, m, local_t, mine = self._cache
        xp = get_array_module(e)
        N = e.shape[0]
        d = e / s[:, None]
        if self.Q_r:
            rows = xp.nonzero(mine)[0]
            d[rows, local_t[rows]] -= 1.0
        d *= dloss / max(N, 1)
        return d

    def correct(self):
        """Number of rows whose argmax is the target, without gathering the logits.

        The global argmax is the smallest class id whose logit equals the global
        max (the max is already reduced in :meth:`forward`): one allreduce min of
        (N,) int64 candidates, in phase "<name>.metrics". Ties resolve to the
        first class, as ``numpy.argmax`` does on the full logits.
        """
        return int(self.correct_array())

    def correct_array(self):
        """:meth:`correct` as a 0-d int64 array where the logits live (no host read;
        the trainer reads its counts back once per log line)."""
        logits, e, s, m, local_t, mine = self._cache
        xp = get_array_module(logits)
        N = logits.shape[0]
        cand = xp.full(N, self.num_classes, dtype=np.int64)
        if self.Q_r:
            hit = logits == m[:, None]
            first = xp.argmax(hit, axis=1)
            has = hit.any(axis=1)
            cand[has] = first[has] + self.offset
        with self.phase("metrics"):
            self.group.allreduce(cand, op="min", out=cand)
        return (cand == (local_t + self.offset)).sum()

    # --- description ---
    def output_shape(self, input_shape):
        return ()

    def collectives(self, input_shape, accuracy=False):
        """input_shape : the local logits shape (N, Q_r)."""
        N = int(input_shape[0])
        out = [self._c("forward", "allreduce", self.group, N),
               self._c("forward", "allreduce", self.group, 2 * N)]
        if accuracy:
            c = self._c("metrics", "allreduce", self.group, N)
            out.append(c._replace(itemsize=8))
        return out

    def flops(self, input_shape):
        n = int(np.prod(input_shape))
        return 4 * n, 3 * n
