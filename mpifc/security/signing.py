"""Ed25519 signatures over a checkpoint's canonical content digest.

The digest (:mod:`mpifc.checkpoint.digest`) covers every tensor and every attribute
except itself and the three signature attributes below. The signed message is::

    DOMAIN | len+"ed25519" | len+fingerprint | len+"sha256:<hex>"

so a signature made for something else (another format, another key name) never
verifies here. It is stored in root attributes::

    signature       hex of the 64-byte Ed25519 signature
    signed_by       fingerprint of the signing key (first 16 hex digits of SHA-256)
    signature_alg   "ed25519"

Verifying recomputes the digest from the bytes in the file, compares it with the
stored one, then checks the signature with the TRUSTED public key given by the user
(never a key named by the file). Each way to fail has its own message: unsigned,
signed by another key, signature that does not match the content, digest mismatch
(a changed tensor or attribute), unreadable (truncated) file.
"""
from __future__ import annotations

import os
import shutil

import h5py

from mpifc.checkpoint import digest
from mpifc.checkpoint.format import CheckpointError, as_str
from mpifc.security import keys

SIGNATURE_ATTR, SIGNED_BY_ATTR, ALG_ATTR = digest.SIGNATURE_ATTRS
ALG = "ed25519"
DOMAIN = b"mpifc-checkpoint-signature-v1\x00"


class SignatureError(CheckpointError):
    """A checkpoint is unsigned, signed by another key, or altered after signing."""


def _field(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b


def message(total: str, signed_by: str, alg: str = ALG) -> bytes:
    """The bytes that are signed: domain, algorithm, key fingerprint, content digest."""
    return DOMAIN + _field(alg.encode()) + _field(signed_by.encode()) + _field(total.encode())


def private_key(key):
    """A private key object from a path (or the key object itself)."""
    return key if hasattr(key, "sign") else keys.load_private(key)


def public_key(key):
    """A public key object from a path (or the key object itself)."""
    return key if hasattr(key, "verify") else keys.load_public(key)


def sign_open(f: h5py.File, key, total: str | None = None) -> str:
    """Sign an open, writable checkpoint whose digest is ``total`` (recomputed if None).

    Returns the signing key's fingerprint.
    """
    key = private_key(key)
    if total is None:
        total = digest.compute(f)[0]
    fp = keys.fingerprint(key.public_key())
    sig = key.sign(message(total, fp))
    f.attrs[SIGNATURE_ATTR] = sig.hex()
    f.attrs[SIGNED_BY_ATTR] = fp
    f.attrs[ALG_ATTR] = ALG
    return fp


def signed_by(f: h5py.File) -> str | None:
    """The fingerprint a checkpoint claims to be signed by (not verified), or None."""
    if SIGNATURE_ATTR not in f.attrs:
        return None
    return as_str(f.attrs.get(SIGNED_BY_ATTR, "?"))


def check_open(f: h5py.File, where: str, key, total: str) -> str:
    """Check the signature of an open checkpoint whose digest ``total`` was verified.

    Returns the fingerprint; raises SignatureError with the reason.
    """
    pub = public_key(key)
    trusted = keys.fingerprint(pub)
    a = f.attrs
    if SIGNATURE_ATTR not in a:
        raise SignatureError(f"{where}: not signed, but a verify key ({trusted}) is configured; "
                             "sign it with `mpifc sign` or drop the key")
    alg = as_str(a.get(ALG_ATTR, ""))
    if alg != ALG:
        raise SignatureError(f"{where}: signature algorithm {alg!r} is not {ALG!r}")
    claimed = as_str(a.get(SIGNED_BY_ATTR, ""))
    if claimed != trusted:
        raise SignatureError(f"{where}: signed by another key ({claimed}), not the trusted key "
                             f"{trusted}")
    try:
        sig = bytes.fromhex(as_str(a[SIGNATURE_ATTR]))
    except ValueError:
        sig = b""
    if len(sig) != 64:
        raise SignatureError(f"{where}: the signature attribute is malformed "
                             f"({len(sig)} bytes, not 64)")
    from cryptography.exceptions import InvalidSignature
    try:
        pub.verify(sig, message(total, claimed, alg))
    except InvalidSignature:
        raise SignatureError(f"{where}: signature does not match the content: the checkpoint "
                             f"was altered after key {trusted} signed it") from None
    return claimed


def _open_checked(path: str, mode: str = "r"):
    try:
        return h5py.File(path, mode)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read as HDF5 ({e}); the file is truncated, "
                              "damaged, or not a checkpoint") from None


def _digest(f, where) -> str:
    try:
        return digest.check(f, where)
    except (OSError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{where}: unreadable while verifying its digest ({e}); the file "
                              "is truncated or damaged") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def verify_file(path, key) -> tuple[str, str]:
    """Verify digest and signature of a checkpoint file on this process alone.

    Returns (digest, fingerprint); raises CheckpointError / SignatureError / KeyFileError.
    """
    from mpifc.checkpoint.format import resolve

    pub = public_key(key)               # a bad key file is reported before the checkpoint
    target = resolve(path)
    with _open_checked(target) as f:
        total = _digest(f, target)
        return total, check_open(f, target, pub, total)


def sign_file(path, key) -> tuple[str, str]:
    """Sign a finished checkpoint made elsewhere; returns (file, fingerprint).

    The digest is checked first (a damaged file is never signed). The signed copy is
    written beside the file and renamed over it, so the file is never half-signed.
    """
    from mpifc.checkpoint.atomic import publish, temporary_path
    from mpifc.checkpoint.format import resolve

    priv = private_key(key)
    target = resolve(path)
    with _open_checked(target) as f:
        _digest(f, target)
    tmp = temporary_path(target)
    try:
        shutil.copyfile(target, tmp)
        with h5py.File(tmp, "r+") as f:
            total = _digest(f, target)
            fp = sign_open(f, priv, total)
        publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target, fp


def check_keys(cfg: dict, comm) -> None:
    """Load ``train.sign_key`` / ``train.verify_key`` on rank 0 at start-up; agree on errors.

    A bad key is one line on every rank before training, not at the first checkpoint.
    """
    t = cfg["train"]
    err = None
    if comm.rank == 0:
        try:
            if t.get("sign_key"):
                private_key(t["sign_key"])
            if t.get("verify_key"):
                public_key(t["verify_key"])
        except keys.KeyFileError as e:
            err = str(e)
    err = comm.bcast_obj(err, root=0)
    if err:
        raise keys.KeyFileError(err)
