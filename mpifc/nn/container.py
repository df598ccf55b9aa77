"""Containers."""
from __future__ import annotations

from mpifc.nn import fuse
from mpifc.nn.module import Module


class Sequential(Module):
    """Apply layers in order; backward in reverse. Children are named "0", "1", ...

    Parameters
    ----------
    *layers : Module
    input_grad : if False, the input needs no gradient (e.g. it is data): layers
        before the first one with parameters are skipped in backward, and that
        layer skips its input-gradient product; backward then returns None.
    """

    def __init__(self, *layers, input_grad=True):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"layer {i} is a {type(layer).__name__}, not a Module")
            self.add_module(str(i), layer)
        self.layers = list(layers)
        self.set_input_grad(input_grad)

    def set_input_grad(self, flag: bool) -> None:
        self.input_grad = bool(flag)
        first = next((i for i, l in enumerate(self.layers) if l.parameters()), len(self.layers))
        self._first_param = first
        if first < len(self.layers) and not isinstance(self.layers[first], Sequential):
            self.layers[first].input_grad = flag
        elif first < len(self.layers):
            self.layers[first].set_input_grad(flag)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def forward(self, x):
        return fuse.forward(self.layers, x)          # BatchNorm + ReLU pairs in one pass

    def backward(self, dy):
        stop = 0 if self.input_grad else self._first_param
        return fuse.backward(self.layers[stop:], dy)

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {l!r}" for i, l in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"
