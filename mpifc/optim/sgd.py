"""Stochastic gradient descent with momentum, Nesterov momentum and weight decay."""
from __future__ import annotations

from mpifc.backend import get_array_module
from mpifc.nn import hostjit
from mpifc.optim.optimizer import Optimizer, for_each_chunk


class SGD(Optimizer):
    """PyTorch-compatible SGD.

    g = grad + weight_decay * p
    b = momentum * b + (1 - dampening) * g       (b = g on the first step)
    g = g + momentum * b  if nesterov  else  b
    p = p - lr * g
    """

    slots = ("momentum",)

    def __init__(self, params, lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)

    def _update(self, i, p):
        if self._compiled(i, p):
            return
        if not self.momentum:
            for_each_chunk(lambda data, grad: self._rule(data, grad, None, False), p.data, p.grad)
            return
        first = self.state["momentum"][i] is None
        for_each_chunk(lambda data, grad, b: self._rule(data, grad, b, first),
                       p.data, p.grad, self._slot("momentum", i))

    def _compiled(self, i, p) -> bool:
        """The update as one compiled pass (mpifc.nn.hostjit) on contiguous host arrays;
        False (nothing done) where that does not apply."""
        jit = hostjit.kernels(get_array_module(p.data), p.data.nbytes)
        if jit is None or not (p.data.flags.c_contiguous and p.grad.flags.c_contiguous) \
                or p.data.dtype != p.grad.dtype:
            return False
        use_b = bool(self.momentum)
        first = use_b and self.state["momentum"][i] is None
        b = self._slot("momentum", i) if use_b else p.data      # p: an unused stand-in
        if not b.flags.c_contiguous:
            return False
        t = p.data.dtype.type           # NumPy takes the Python floats in the arrays' type
        jit.sgd_update(p.data.reshape(-1), p.grad.reshape(-1), b.reshape(-1), t(self.lr),
                       t(self.weight_decay), t(self.momentum), t(1.0 - self.dampening),
                       self.nesterov, first, use_b)
        return True

    def _rule(self, data, g, b, first):
        """The update of one chunk (views of the parameter, its gradient and momentum)."""
        if self.weight_decay:
            g = g + self.weight_decay * data
        if b is not None:
            if first:
                b[...] = g
            else:
                b *= self.momentum
                b += (1.0 - self.dampening) * g if self.dampening else g
            if self.nesterov:
                g = g + self.momentum * b
            else:
                g = b
        data -= self.lr * g
