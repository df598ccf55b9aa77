"""Adam and AdamW."""
from __future__ import annotations

import math

from mpifc.backend import get_array_module
from mpifc.nn import hostjit
from mpifc.optim.optimizer import Optimizer


class Adam(Optimizer):
    """Adam (Kingma & Ba), bias-corrected; ``weight_decay`` is an L2 term added to the grad.

    m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
    p = p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    """

    slots = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.betas, self.eps, self.weight_decay = (float(b1), float(b2)), float(eps), float(weight_decay)

    def _update(self, i, p):
        if self._compiled(i, p):
            return
        xp = get_array_module(p.data)
        b1, b2 = self.betas
        t = self.step_count
        g = p.grad
        if self.weight_decay and not self.decoupled:
            g = g + self.weight_decay * p.data
        if self.weight_decay and self.decoupled:
            p.data *= 1.0 - self.lr * self.weight_decay
        m, v = self._slot("exp_avg", i), self._slot("exp_avg_sq", i)
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        denom = xp.sqrt(v) * (1.0 / math.sqrt(bc2))
        denom += self.eps
        p.data -= (self.lr / bc1) * (m / denom)


    def _compiled(self, i, p) -> bool:
        """The update as one compiled pass (mpifc.nn.hostjit) on contiguous host arrays,
        the scalars in the arrays' type as NumPy takes Python floats; False (nothing
        done) where that does not apply."""
        jit = hostjit.kernels(get_array_module(p.data), p.data.nbytes)
        if jit is None or p.data.dtype != p.grad.dtype:
            return False
        m, v = self._slot("exp_avg", i), self._slot("exp_avg_sq", i)
        if not all(a.flags.c_contiguous for a in (p.data, p.grad, m, v)):
            return False
        b1, b2 = self.betas
        t = self.step_count
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        ty = p.data.dtype.type
        wd = self.weight_decay
        jit.adam_update(p.data.reshape(-1), p.grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                        ty(wd), ty(1.0 - self.lr * wd), ty(b1), ty(1.0 - b1), ty(b2), ty(1.0 - b2),
                        ty(1.0 / math.sqrt(bc2)), ty(self.eps), ty(self.lr / bc1),
                        bool(wd) and not self.decoupled, bool(wd) and self.decoupled)
        return True


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr*wd, then Adam."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay)
