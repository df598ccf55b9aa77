"""A BatchNorm and the ReLU right after it, run as one pass each way.

With the compiled kernels (:mod:`mpifc.nn.hostjit`), a training-mode BatchNorm
followed by a ReLU in a layer list normalises and applies the ReLU in the same pass
(writing the ReLU's mask), and its backward takes dy * mask inside its own two passes:
one read and one write of the activation fewer each way (classifier, batch 64, 1
thread here: bench/step_profile.py). The layers stay two modules with their own
state: the ReLU holds its mask, so a caller that runs the backward layer by layer
still gets the right gradients; only the loops below skip the extra pass.

:class:`mpifc.nn.Sequential` and the trainer's model (:class:`mpifc.models.Net`) run
their layers through :func:`forward` and :func:`backward`. ``ENABLED = False`` runs
every layer on its own (the tests compare both).
"""
from __future__ import annotations

from mpifc.backend import get_array_module
from mpifc.nn import hostjit
from mpifc.nn.activation import ReLU
from mpifc.nn.norm import _BatchNorm

ENABLED = True


def _fuses(a, b, x) -> bool:
    return (ENABLED and type(b) is ReLU and isinstance(a, _BatchNorm) and a.training
            and hostjit.kernels(get_array_module(x)) is not None)


def forward(layers, x):
    """``for layer in layers: x = layer.forward(x)``, each BatchNorm + ReLU pair fused."""
    i, n = 0, len(layers)
    while i < n:
        a = layers[i]
        if i + 1 < n and _fuses(a, layers[i + 1], x):
            x, layers[i + 1]._mask = a.forward_relu(x)
            a._relu_fused = True         # a flag, not the module: nothing walks it as a child
            i += 2
            continue
        if isinstance(a, _BatchNorm):
            a._relu_fused = False
        x = a.forward(x)
        i += 1
    return x


def backward(layers, dy, on_layer=None):
    """``for layer in reversed(layers): dy = layer.backward(dy)``, a pair fused by
    :func:`forward` as one BatchNorm backward given the ReLU's mask.

    ``on_layer(layer)``, when given, is called after each layer's backward, in the
    order of the unfused loop (a fused pair: the ReLU, then the BatchNorm):
    DataParallel starts the allreduce of finished gradients from it."""
    i = len(layers) - 1
    while i >= 0:
        b = layers[i]
        a = layers[i - 1] if i > 0 else None
        if a is not None and type(b) is ReLU and getattr(a, "_relu_fused", False):
            dy = a.backward(dy, mask=b._mask)
            a._relu_fused, b._mask = False, None
            done = (b, a)
            i -= 2
        else:
            dy = b.backward(dy)
            done = (b,)
            i -= 1
        if on_layer is not None:
            for layer in done:
                on_layer(layer)
    return dy
