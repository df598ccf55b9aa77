"""Weight initialisers, deterministic from a NumPy Generator.

Every initialiser returns the FULL tensor as a NumPy array: a sharded layer builds
it on root from the same seed and scatters the shards, so sharded == serial.
Values are drawn in float64 and cast, so float32 and float64 models start from
the same numbers (rounded).

Fans: a weight (F, D) has fan_in D, fan_out F; a conv weight (K, C/G, R, S) has
fan_in C/G*R*S, fan_out K*R*S; a vector (n,) has fan_in = fan_out = n.
"""
from __future__ import annotations

import math

import numpy as np


def make_rng(rng=None, seed=None) -> np.random.Generator:
    """A Generator from ``rng`` (returned as is) or ``seed``; unseeded when both are None."""
    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return rng
    return np.random.default_rng(seed)


def fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight shape, see the module docstring."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("cannot compute fans of a scalar")
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def gain(nonlinearity="relu", param=None) -> float:
    """Recommended gain (as in Glorot/He): relu sqrt(2), leaky_relu sqrt(2/(1+a^2)), tanh 5/3."""
    if nonlinearity in ("linear", "identity", "sigmoid", "conv2d"):
        return 1.0
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        a = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1.0 + a * a))
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity == "gelu":
        return math.sqrt(2.0)
    raise ValueError(f"unknown nonlinearity {nonlinearity!r}")


def _fan(shape, mode):
    fi, fo = fans(shape)
    if mode == "fan_in":
        return fi
    if mode == "fan_out":
        return fo
    raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")


def kaiming_normal(shape, rng, mode="fan_in", nonlinearity="relu", a=None, dtype=np.float32):
    """He normal: N(0, (gain / sqrt(fan))^2)."""
    std = gain(nonlinearity, a) / math.sqrt(_fan(shape, mode))
    return (rng.standard_normal(shape) * std).astype(dtype)


def kaiming_uniform(shape, rng, mode="fan_in", nonlinearity="relu", a=None, dtype=np.float32):
    """He uniform: U(-b, b) with b = gain * sqrt(3 / fan)."""
    bound = gain(nonlinearity, a) * math.sqrt(3.0 / _fan(shape, mode))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def xavier_normal(shape, rng, gain_=1.0, dtype=np.float32):
    """Glorot normal: N(0, gain^2 * 2 / (fan_in + fan_out))."""
    fi, fo = fans(shape)
    std = gain_ * math.sqrt(2.0 / (fi + fo))
    return (rng.standard_normal(shape) * std).astype(dtype)


def xavier_uniform(shape, rng, gain_=1.0, dtype=np.float32):
    """Glorot uniform: U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out))."""
    fi, fo = fans(shape)
    bound = gain_ * math.sqrt(6.0 / (fi + fo))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape, rng, std=1.0, mean=0.0, dtype=np.float32):
    """N(mean, std^2)."""
    return (rng.standard_normal(shape) * std + mean).astype(dtype)


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def constant(shape, value, dtype=np.float32):
    return np.full(shape, value, dtype=dtype)


_BY_NAME = {
    "kaiming_normal": kaiming_normal,
    "he_normal": kaiming_normal,
    "kaiming_uniform": kaiming_uniform,
    "he_uniform": kaiming_uniform,
    "xavier_normal": xavier_normal,
    "glorot_normal": xavier_normal,
    "xavier_uniform": xavier_uniform,
    "glorot_uniform": xavier_uniform,
}


def initialize(init, shape, rng, dtype=np.float32):
    """Full weight tensor from an initialiser name or a callable ``init(shape, rng, dtype=)``."""
    if callable(init):
        return np.asarray(init(shape, rng, dtype=dtype), dtype=dtype)
    try:
        fn = _BY_NAME[init]
    except KeyError:
        raise ValueError(f"unknown initialiser {init!r}; one of {sorted(_BY_NAME)}") from None
    return fn(shape, rng, dtype=dtype)
