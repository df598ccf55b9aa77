"""Stochastic gradient descent with momentum, Nesterov momentum and weight decay."""
from __future__ import annotations

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
        if not self.momentum:
            for_each_chunk(lambda data, grad: self._rule(data, grad, None, False), p.data, p.grad)
            return
        first = self.state["momentum"][i] is None
        for_each_chunk(lambda data, grad, b: self._rule(data, grad, b, first),
                       p.data, p.grad, self._slot("momentum", i))

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
