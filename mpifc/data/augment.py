"""Image augmentation of training batches: random crop with zero padding, horizontal flip.

Every random choice is a pure function of ``(seed, epoch, i)``, where ``i`` is the
sample's row in the file's split (its *global* index): a counter-based hash
(SplitMix64) of those three numbers, not a generator advanced draw by draw. So the
augmented sample does not depend on which rank holds it, on the dp size, on the
loader mode (slice, scatter, cached) or on where a run was resumed: the augmented
global batch of a run is the same under dp = 1, 2, 3, 4 and after a resume.

For a sample with hash ``h`` (one 64-bit word per sample)::

    flip  = bit 0 of h                         ("flip" on: mirror the W axis)
    dy    = (h >> 8)  mod (2P + 1)             ("crop" on: offsets of the H x W window
    dx    = (h >> 32) mod (2P + 1)              in the image padded with P zeros per side)

and the output is ``out[c, y, x] = padded[c, dy + y, dx + x']`` with ``x' = W - 1 - x``
when flipped, else ``x`` (crop, then mirror the crop). The padding is 0 in the
stored units, before normalisation: black for uint8 images, as torchvision's
``RandomCrop(padding=P)`` before ``Normalize``. One gather does both, vectorised
over the batch on the batch's array module (NumPy or CuPy).

Shape letters: b rows on this rank, C/H/W channels/height/width, P padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpifc import backend

#: the operations ``data.augment`` may name
AUGMENTS = ("crop", "flip")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM = np.uint64(0xA55A_6D2E_0F1C_3B47)     # this use of (seed, epoch, i), apart from others


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_hash(seed: int, epoch: int, idx) -> np.ndarray:
    """One well-mixed uint64 per sample from ``(seed, epoch, idx)``; (b,) from (b,) indices."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed], dtype=np.uint64) * _GOLDEN + _STREAM)
        key = _mix(key ^ (np.array([epoch], dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
        i = np.asarray(idx, dtype=np.int64).astype(np.uint64)
        return _mix(key ^ (i + np.uint64(1)) * _GOLDEN)


def parse_augment(value) -> list[str]:
    """``data.augment`` as a list: a list of names, or one string "crop,flip" (``--set``).

    Raises ValueError naming what is wrong (the config turns it into one line)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of names")
    bad = [v for v in value if v not in AUGMENTS]
    if bad or len(set(value)) != len(value):
        raise ValueError(f"unknown or repeated: {bad or value}")
    return value


@dataclass(frozen=True)
class Augment:
    """Random crop (``pad`` zeros per side, crop back to H x W) and/or horizontal flip.

    Parameters
    ----------
    ops : names from :data:`AUGMENTS` ("crop", "flip"); empty = identity
    pad : P, zero padding of the crop (pixels per side)
    seed : the run's seed
    """

    ops: tuple = ()
    pad: int = 4
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(parse_augment(list(self.ops))))
        if self.pad < 0 or self.seed < 0:
            raise ValueError(f"pad and seed must be >= 0, got pad={self.pad}, seed={self.seed}")

    @property
    def active(self) -> bool:
        return bool(self.ops) and (self.ops != ("crop",) or self.pad > 0)

    def draws(self, epoch: int, idx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host draws for samples ``idx`` of ``epoch``: (flip (b,) bool, dy (b,), dx (b,)).

        dy, dx in [0, 2P] (0 when "crop" is off: no padding, no shift)."""
        h = sample_hash(self.seed, epoch, idx)
        b = h.shape[0]
        flip = (h & np.uint64(1)).astype(bool) if "flip" in self.ops else np.zeros(b, bool)
        if "crop" in self.ops:
            span = np.uint64(2 * self.pad + 1)
            dy = ((h >> np.uint64(8)) % span).astype(np.int64)
            dx = ((h >> np.uint64(32)) % span).astype(np.int64)
        else:
            dy = dx = np.zeros(b, dtype=np.int64)
        return flip, dy, dx

    def __call__(self, x, epoch: int, idx):
        """Augmented copy of ``x`` (b, C, H, W), row r being sample ``idx[r]`` of ``epoch``.

        Works on the array module of ``x``; the draws are made on the host (b numbers)."""
        if not self.active:
            return x
        if x.ndim != 4:
            raise ValueError(f"augmentation needs image batches (b, C, H, W), got shape "
                             f"{tuple(x.shape)}")
        xp = backend.get_array_module(x)
        b, c, h, w = x.shape
        flip, dy, dx = self.draws(epoch, idx)
        p = self.pad if "crop" in self.ops else 0
        if p:
            src = xp.zeros((b, c, h + 2 * p, w + 2 * p), dtype=x.dtype)
            src[:, :, p:p + h, p:p + w] = x
        else:
            src = x
        cols = np.where(flip[:, None], np.arange(w - 1, -1, -1), np.arange(w)) + dx[:, None]
        rows = np.arange(h) + dy[:, None]                                    # (b, H)
        ib = np.arange(b)[:, None, None, None]
        ic = np.arange(c)[None, :, None, None]
        # one gather: out[i, c, y, x] = src[i, c, rows[i, y], cols[i, x]]
        index = tuple(backend.to_device(a, xp) for a in
                      (ib, ic, rows[:, None, :, None], cols[:, None, None, :]))
        return src[index]
