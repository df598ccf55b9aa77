"""Key pairs, a small signed checkpoint, and the six ways to tamper with it.

Each tamper function edits a checkpoint file in place the way an attacker or an
accident would; ``REASONS`` maps it to the phrase its refusal must contain (and no
other refusal does).
"""
import os
import sys

import h5py
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "checkpoint"))
from ckpt_helpers import ToyModel, trained  # noqa: E402

from mpifc.checkpoint import digest  # noqa: E402


def keypair(directory):
    """(private path, public path, fingerprint) of a new key pair in ``directory``."""
    from mpifc.security.keys import generate
    return generate(directory)


def flip_bit(path):
    """One flipped bit in a tensor's bytes on disk."""
    with h5py.File(path) as f:
        off = f["params/fc2.weight"].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(off)
        b = fh.read(1)
        fh.seek(off)
        fh.write(bytes([b[0] ^ 1]))


def change_attribute(path):
    """A changed root attribute (the step)."""
    with h5py.File(path, "r+") as f:
        f.attrs["step"] = int(f.attrs["step"]) + 1000


def recompute_digest(path):
    """A changed tensor with the digest (and per-dataset hashes) recomputed: digest OK."""
    with h5py.File(path, "r+") as f:
        w = f["params/fc1.weight"]
        w[0, 0] = w[0, 0] + 1.0
        total, per = digest.compute(f)
        for p, d in per.items():
            f[p].attrs[digest.DATASET_ATTR] = d
        f.attrs[digest.DIGEST_ATTR] = total


def other_key(path, other_private):
    """Signed again, by another key (as an attacker with their own key would)."""
    from mpifc.security.signing import sign_file
    sign_file(path, other_private)


def remove_signature(path):
    with h5py.File(path, "r+") as f:
        for a in digest.SIGNATURE_ATTRS:
            if a in f.attrs:
                del f.attrs[a]


def truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


REASONS = {
    "flipped bit": "dataset(s) /params/fc2.weight changed",
    "changed attribute": "metadata or dataset set changed",
    "recomputed digest": "signature does not match the content",
    "another key": "signed by another key",
    "removed signature": "not signed",
    "truncated": "truncated",
}


def tamper(case, path, other_private):
    {"flipped bit": flip_bit, "changed attribute": change_attribute,
     "recomputed digest": recompute_digest, "another key": lambda p: other_key(p, other_private),
     "removed signature": remove_signature, "truncated": truncate}[case](path)


def own_reason(case, message) -> bool:
    """``message`` names this case's reason and no other case's."""
    others = [r for c, r in REASONS.items() if c != case and r not in REASONS[case]]
    return REASONS[case] in message and not any(r in message for r in others)


def all_equal(model) -> dict:
    return {n: p.data.copy() for n, p in model.named_parameters()}


__all__ = ["ToyModel", "trained", "keypair", "tamper", "REASONS", "own_reason", "np"]
