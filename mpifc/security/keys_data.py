"""Data keys for encryption at rest: ``mpifc keys generate-data-key PATH``."""
from __future__ import annotations

import os

from mpifc.security.crypt import KEY_BYTES, CryptError, key_id


def generate_data_key(path) -> str:
    """Write a fresh random 256-bit key to ``path`` as 64 hex digits, mode 0600; return its id.

    Refuses to overwrite an existing file (a lost key means unreadable data). The key
    is drawn from ``os.urandom`` and is never printed; only its key id is.
    """
    path = os.fspath(path)
    raw = os.urandom(KEY_BYTES)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CryptError(f"{path} already exists; not overwriting a key (data encrypted with it "
                         "would become unreadable)") from None
    except OSError as e:
        raise CryptError(f"cannot create key file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)       # whatever the umask
        fh.write(raw.hex() + "\n")
    return key_id(raw)
