"""Ed25519 signing keys: generate a pair, load them, name a public key by its fingerprint.

``mpifc keys generate DIR`` writes::

    DIR/mpifc-sign.key   the private key, PEM (PKCS#8, unencrypted), file mode 0600
    DIR/mpifc-sign.pub   the public key, PEM (SubjectPublicKeyInfo): give this one away

A private key file that the group or others may read is refused: a key anyone on the
machine can copy signs anything as you. A key may also be given as its 32 raw bytes
(private or public), as other tools write them.

The fingerprint of a public key is the SHA-256 of its 32 raw bytes, in hex; the first
16 hex digits name the key in checkpoints and messages.

``cryptography`` is an optional dependency (``pip install mpifc[security]``); it is
imported only when a key is used.
"""
from __future__ import annotations

import hashlib
import os
import stat

from mpifc.config import ConfigError

PRIVATE_NAME = "mpifc-sign.key"
PUBLIC_NAME = "mpifc-sign.pub"
FINGERPRINT_CHARS = 16
RAW_KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 64 << 10      # a PEM key is < 200 bytes; never read a huge file


class KeyFileError(ConfigError):
    """A key file that cannot be used: missing, unreadable, wrong kind, too open."""


def crypto():
    """The ``cryptography`` Ed25519 module, or a one-line error saying how to install it."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise KeyFileError("model signing needs the 'cryptography' package: "
                           "pip install mpifc[security]") from None
    return ed25519


def _read(path: str, what: str) -> bytes:
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise KeyFileError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{what} {path}: not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{what} {path}: {st.st_size} bytes is not a key file")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise KeyFileError(f"{what} {path}: cannot be read ({e.strerror})") from None


def raw_public(public_key) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    from cryptography.hazmat.primitives import serialization as s
    return public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def fingerprint(public_key) -> str:
    """First 16 hex digits of SHA-256(raw public key bytes): the key's short name."""
    return hashlib.sha256(raw_public(public_key)).hexdigest()[:FINGERPRINT_CHARS]


def load_private(path):
    """The Ed25519 private key in ``path`` (PEM PKCS#8 or 32 raw bytes).

    Raises KeyFileError when the file is missing, is readable by group or others
    (on POSIX), or does not hold an unencrypted Ed25519 private key.
    """
    ed25519 = crypto()
    from cryptography.hazmat.primitives import serialization as s

    path = os.fspath(path)
    if os.name == "posix" and os.path.exists(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise KeyFileError(f"private key {path} is readable by group/others (mode {mode:04o}); "
                               f"run: chmod 600 {path}")
    data = _read(path, "private key")
    if len(data) == RAW_KEY_BYTES:
        return ed25519.Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = s.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KeyFileError(f"private key {path}: not an unencrypted PEM private key "
                           f"({first})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"private key {path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public(path):
    """The Ed25519 public key in ``path`` (PEM SubjectPublicKeyInfo or 32 raw bytes)."""
    ed25519 = crypto()
    from cryptography.hazmat.primitives import serialization as s

    path = os.fspath(path)
    data = _read(path, "public key")
    if len(data) == RAW_KEY_BYTES:
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"public key {path}: holds a PRIVATE key; pass the .pub file")
    try:
        key = s.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KeyFileError(f"public key {path}: not a PEM public key ({first})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"public key {path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)        # the umask may have narrowed it; never widened


def generate(directory) -> tuple[str, str, str]:
    """Write a new key pair into ``directory``; return (private path, public path, fingerprint).

    Refuses to overwrite an existing key (a lost private key cannot be recovered and a
    replaced one makes every checkpoint signed with the old one unverifiable).
    """
    ed25519 = crypto()
    from cryptography.hazmat.primitives import serialization as s

    directory = os.fspath(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    priv_path = os.path.join(directory, PRIVATE_NAME)
    pub_path = os.path.join(directory, PUBLIC_NAME)
    for p in (priv_path, pub_path):
        if os.path.exists(p):
            raise KeyFileError(f"{p} exists; refusing to overwrite a key (move it away first)")
    key = ed25519.Ed25519PrivateKey.generate()
    _write_new(priv_path, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
                                            s.NoEncryption()), 0o600)
    pub = key.public_key()
    _write_new(pub_path, pub.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo),
               0o644)
    return priv_path, pub_path, fingerprint(pub)
