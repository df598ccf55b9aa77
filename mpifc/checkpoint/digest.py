"""SHA-256 digest of a checkpoint's contents, stored in it and checked on load.

Canonical order, independent of how HDF5 laid the bytes out on disk:

* every dataset, sorted by its full path: a per-dataset SHA-256 of
  ``dtype | shape | C-order bytes`` (read in slabs of at most ``SLAB_BYTES``, so
  memory stays bounded), fed into the file digest together with its path;
* every attribute of every group and dataset, sorted by (object path, name), as
  ``path | name | canonical value bytes`` -- except the root ``digest`` itself,
  the root signature attributes (``signature``, ``signed_by``, ``signature_alg``:
  the signature covers this digest, see :mod:`mpifc.security.signing`) and each
  dataset's ``sha256`` (a copy of the per-dataset hash, kept only to name a
  damaged dataset in error messages).

Every field is length-prefixed so no two different contents hash alike. Any
flipped bit in a tensor, a changed step or sharding attribute, or a dataset added
or removed changes the digest; a truncated file fails earlier, when HDF5 reads it.
A digest detects accidents, not an attacker (who can recompute it): for that, sign
checkpoints (:mod:`mpifc.security.signing`).

Encrypted checkpoints (:mod:`mpifc.security.crypt`) are hashed as stored: the digest
covers the ciphertext chunks and their attributes, so it is checked (and ``inspect``
says OK or BAD) without the key; the AES-GCM tags then authenticate the plaintext.
"""
from __future__ import annotations

import hashlib

import h5py
import numpy as np

DIGEST_ATTR = "digest"
DATASET_ATTR = "sha256"
SLAB_BYTES = 64 << 20
SIGNATURE_ATTRS = ("signature", "signed_by", "signature_alg")
_SKIP = {("/", DIGEST_ATTR)} | {("/", a) for a in SIGNATURE_ATTRS}


def _field(h, b: bytes) -> None:
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


def _attr_bytes(v) -> bytes:
    """Canonical bytes of an attribute value (str, bytes, number or array)."""
    if isinstance(v, str):
        return b"U" + v.encode()
    if isinstance(v, bytes):
        return b"S" + v
    a = np.asarray(v)
    if a.dtype.kind == "O":
        return b"O" + b"\x00".join(_attr_bytes(x) for x in a.reshape(-1))
    a = np.ascontiguousarray(a)
    return f"{a.dtype.str}{a.shape}".encode() + a.tobytes()


def dataset_digest(ds: h5py.Dataset) -> str:
    """Hex SHA-256 of one dataset's dtype, shape and contents (read slab by slab)."""
    h = hashlib.sha256()
    if h5py.check_string_dtype(ds.dtype) is not None or ds.shape == ():
        _field(h, f"{ds.dtype.str}{ds.shape}".encode())
        v = ds[()]
        _field(h, _attr_bytes(v))
        return h.hexdigest()
    dt = ds.dtype.newbyteorder("<") if ds.dtype.byteorder == ">" else ds.dtype
    _field(h, f"{dt.str}{ds.shape}".encode())
    n = ds.shape[0]
    row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * dt.itemsize)
    step = max(1, SLAB_BYTES // row)
    for s in range(0, n, step):
        h.update(np.ascontiguousarray(ds[s:s + step], dtype=dt).tobytes())
    return h.hexdigest()


def compute(f: h5py.File) -> tuple[str, dict[str, str]]:
    """File digest ``"sha256:<hex>"`` and {dataset path: dataset hex digest}.

    Reads every byte of every dataset once, after refusing (ValueError) a file that
    links outside itself or declares bytes it does not store (mpifc.security.inputs).
    """
    from mpifc.security.inputs import check_file

    check_file(f, f.filename)
    objects: list[tuple[str, object]] = [("/", f)]
    f.visititems(lambda name, obj: objects.append(("/" + name, obj)))
    objects.sort(key=lambda t: t[0])
    h = hashlib.sha256()
    per_dataset = {}
    for path, obj in objects:
        if isinstance(obj, h5py.Dataset):
            d = dataset_digest(obj)
            per_dataset[path] = d
            _field(h, b"D" + path.encode())
            _field(h, bytes.fromhex(d))
        for name in sorted(obj.attrs.keys()):
            if (path, name) in _SKIP or (isinstance(obj, h5py.Dataset) and name == DATASET_ATTR):
                continue
            _field(h, b"A" + path.encode() + b"\x00" + name.encode())
            _field(h, _attr_bytes(obj.attrs[name]))
    return "sha256:" + h.hexdigest(), per_dataset


def check(f: h5py.File, where: str) -> str:
    """Recompute the digest of an open checkpoint and compare with the stored one.

    Returns the digest; raises ValueError naming the damaged dataset(s) when the
    per-dataset copies tell which, else naming the file.
    """
    stored = f.attrs.get(DIGEST_ATTR)
    if stored is None:
        raise ValueError(f"{where}: no '{DIGEST_ATTR}' attribute (not a finished checkpoint)")
    stored = stored.decode() if isinstance(stored, bytes) else str(stored)
    actual, per_dataset = compute(f)
    if actual == stored:
        return actual
    bad = []
    for path, d in per_dataset.items():
        s = f[path].attrs.get(DATASET_ATTR)
        if s is not None and (s.decode() if isinstance(s, bytes) else str(s)) != d:
            bad.append(path)
    what = (f"dataset(s) {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} changed"
            if bad else "metadata or dataset set changed")
    raise ValueError(f"{where}: SHA-256 digest mismatch ({what}; stored {stored[:19]}..., "
                     f"computed {actual[:19]}...): the file is damaged or was altered")
