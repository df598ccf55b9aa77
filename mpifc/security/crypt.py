"""Encryption at rest: AES-256-GCM over chunks of whole rows, inside ordinary HDF5 files.

An encrypted array of logical shape (N, ...) and dtype T is stored as a contiguous
uint8 HDF5 dataset of shape (K, S), one encrypted chunk per row, where R rows make one
encrypted chunk, K = ceil(N / R) and S = 12 + R * row_bytes + 16::

    chunk k  =  nonce (12 random bytes) | AES-256-GCM(rows [k R, (k+1) R)) | tag (16)

(the last chunk's plaintext is padded with zero rows to R). Its attributes, in the clear,
say what it holds::

    mpifc_cipher = "AES-256-GCM"    mpifc_key_id = "<16 hex>"    mpifc_dtype = "<f4"
    mpifc_shape  = [N, ...]          mpifc_rows_per_chunk = R

The file's root carries ``mpifc_cipher``, ``mpifc_key_id`` and ``mpifc_file_id`` (16 random
bytes, hex). Every chunk is authenticated together with its associated data
``file id | dataset path | dtype | shape | R | k``: an altered byte, a chunk swapped with
another, moved to another dataset or file, or an edited shape/dtype attribute fails
authentication. Each chunk has its own random nonce, so a reader decrypts only the chunks
that hold the rows it asks for (a rank's rows of a batch, a slab of a checkpoint tensor).

The key id is ``HMAC-SHA256(key, "mpifc data key id v1")``, first 16 hex digits: it tells
a wrong key from a damaged chunk and reveals nothing about the key. The key itself is
never written to a file, logged, or taken from the command line: it comes from a key file
(32 raw bytes or 64 hex digits, mode 0600) or an environment variable holding 64 hex
digits, named in the config (``data.key_file`` / ``data.key_env``,
``train.encrypt_key_file`` / ``train.encrypt_key_env``).

Shape letters: N rows (axis 0), R rows per chunk, K chunks, S stored bytes per chunk.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat

import numpy as np

CIPHER = "AES-256-GCM"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
CHUNK_BYTES = 1 << 20            # plaintext per chunk: about 1 MiB of whole rows
_ID_INFO = b"mpifc data key id v1"
_AAD_TAG = b"mpifc-aes256gcm-v1"
A_CIPHER, A_KEY_ID, A_FILE_ID = "mpifc_cipher", "mpifc_key_id", "mpifc_file_id"
A_DTYPE, A_SHAPE, A_ROWS = "mpifc_dtype", "mpifc_shape", "mpifc_rows_per_chunk"
INSTALL_HINT = "encryption needs the cryptography package: pip install mpifc[security]"


class CryptError(ValueError):
    """A key that is missing, unreadable or wrong, or encrypted data that fails authentication."""


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------------------- keys

class DataKey:
    """A 256-bit data key and where it came from; never printed, pickled or stored.

    Attributes
    ----------
    key_id : str, 16 hex digits, safe to show and store
    source : str, e.g. "key file /path" or "environment variable MPIFC_KEY"
    """

    __slots__ = ("_raw", "source", "key_id")

    def __init__(self, raw: bytes, source: str):
        if len(raw) != KEY_BYTES:
            raise CryptError(f"{source}: a data key is {KEY_BYTES} bytes, got {len(raw)}")
        self._raw = bytes(raw)
        self.source = source
        self.key_id = key_id(raw)

    def __repr__(self) -> str:
        return f"DataKey(id={self.key_id}, {self.source})"

    def __reduce__(self):
        raise TypeError("a DataKey is never pickled (it would travel or be stored in the clear)")

    def aead(self):
        """The AESGCM object for this key (imports cryptography on first use)."""
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:
            raise CryptError(INSTALL_HINT) from None
        return AESGCM(self._raw)


def key_id(raw: bytes) -> str:
    """Public name of a key: the first 16 hex digits of HMAC-SHA256(key, fixed label)."""
    return hmac.new(bytes(raw), _ID_INFO, hashlib.sha256).hexdigest()[:16]


def parse_key(data: bytes, source: str) -> DataKey:
    """A key from 32 raw bytes or 64 hex digits (surrounding whitespace ignored)."""
    if len(data) == KEY_BYTES:
        return DataKey(data, source)
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return DataKey(bytes.fromhex(text.decode("ascii")), source)
        except (UnicodeDecodeError, ValueError):
            pass
    raise CryptError(f"{source}: must hold {KEY_BYTES} raw bytes or {2 * KEY_BYTES} hex digits "
                     f"(make one with `mpifc keys generate-data-key PATH`)")


def read_key_file(path) -> DataKey:
    """Read a key file; refuse one that group or others can read or write."""
    path = os.path.expanduser(os.fspath(path))
    source = f"key file {path}"
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise CryptError(f"{source} is accessible by group/others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`")
        with open(path, "rb") as fh:
            data = fh.read(4 * KEY_BYTES)
    except OSError as e:
        raise CryptError(f"{source}: cannot be read ({e.strerror or e})") from None
    return parse_key(data, source)


def read_key_env(name: str) -> DataKey:
    """Read a key (64 hex digits) from the environment variable ``name``."""
    source = f"environment variable {name}"
    value = os.environ.get(name, "")
    if not value:
        raise CryptError(f"{source} is not set (it should hold the {2 * KEY_BYTES} hex digits of "
                         "a data key)")
    return parse_key(value.encode(), source)


def resolve_key(key_file: str = "", key_env: str = "", what: str = "key") -> DataKey | None:
    """The key named by a (file, environment variable) pair of settings; None when both are ""."""
    if key_file and key_env:
        raise CryptError(f"set only one of {what}_file and {what}_env")
    if key_file:
        return read_key_file(key_file)
    if key_env:
        return read_key_env(key_env)
    return None


def agreed_key(comm, key_file: str, key_env: str, what: str) -> DataKey | None:
    """:func:`resolve_key` on every rank of ``comm`` (collective), agreeing on the outcome.

    A rank that cannot read the key, or holds a different one, makes every rank raise
    the same :class:`CryptError` naming it, before anything else is collective.
    """
    key, err = None, None
    try:
        key = resolve_key(key_file, key_env, what)
    except CryptError as e:
        err = str(e)
    everyone = comm.allgather_obj((err, key.key_id if key is not None else None))
    errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(everyone) if e]
    if errors:
        more = f" (and {len(errors) - 1} more ranks)" if len(errors) > 1 else ""
        raise CryptError(f"{what}: {errors[0]}{more}")
    ids = [i for _, i in everyone]
    if len(set(ids)) != 1:
        raise CryptError(f"{what}: ranks hold different keys (key ids by rank: {ids})")
    return key


# ---------------------------------------------------------------------------- files

def file_encryption(f) -> tuple[str, str] | None:
    """(cipher, key id) of an open h5py file written with a key, or None for a clear file."""
    a = f.attrs
    if A_CIPHER not in a:
        return None
    return _s(a[A_CIPHER]), _s(a.get(A_KEY_ID, ""))


def describe_file(f) -> str:
    """``"AES-256-GCM, key id 0123..."`` or ``""`` for a clear file (for ``inspect``)."""
    enc = file_encryption(f)
    return f"{enc[0]}, key id {enc[1]}" if enc else ""


def check_key(f, key: DataKey | None, where: str, settings: str, accept_clear: bool) -> None:
    """Raise a :class:`CryptError` unless ``key`` fits the open file ``f``.

    The key id is compared first, so a wrong key says "wrong key" rather than failing
    in the first chunk. ``settings`` names the config keys to set (for the message).
    """
    enc = file_encryption(f)
    if enc is None:
        if key is not None and not accept_clear:
            raise CryptError(f"{where} is not encrypted, but {settings} is set: remove the "
                             "setting, or encrypt the file")
        return
    cipher, kid = enc
    if cipher != CIPHER:
        raise CryptError(f"{where}: cipher {cipher!r} is not supported (this mpifc uses {CIPHER})")
    if key is None:
        raise CryptError(f"{where} is encrypted ({cipher}, key id {kid}); set {settings} to "
                         "the key it was written with")
    if key.key_id != kid:
        raise CryptError(f"{where}: wrong key: the file was encrypted with key id {kid}, "
                         f"{key.source} has key id {key.key_id}")


def mark_file(f, key: DataKey) -> str:
    """Record the cipher, key id and a fresh random file id on a file being written.

    Returns the file id (bound into every chunk's associated data)."""
    a = f.attrs
    if A_CIPHER in a:
        if _s(a[A_KEY_ID]) != key.key_id:
            raise CryptError(f"{f.filename}: already encrypted with another key")
        return _s(a[A_FILE_ID])
    a[A_CIPHER] = CIPHER
    a[A_KEY_ID] = key.key_id
    a[A_FILE_ID] = fid = os.urandom(16).hex()
    return fid


def is_encrypted(ds) -> bool:
    """Whether an h5py dataset holds an encrypted array."""
    return A_CIPHER in ds.attrs


def logical_shape(ds) -> tuple:
    """Shape of the array a dataset holds (its own shape when stored in the clear)."""
    if is_encrypted(ds):
        # a 0-d array stores [-1]: HDF5 attributes cannot be empty arrays everywhere
        shape = tuple(int(s) for s in np.atleast_1d(ds.attrs[A_SHAPE]))
        return () if shape == (-1,) else shape
    return tuple(ds.shape)


def logical_dtype(ds) -> np.dtype:
    """Dtype of the array a dataset holds."""
    return np.dtype(_s(ds.attrs[A_DTYPE])) if is_encrypted(ds) else ds.dtype


def rows_per_chunk(shape, dtype, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per encrypted chunk: about ``chunk_bytes`` of plaintext, at least 1, at most N."""
    n = shape[0] if shape else 1
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize if shape else \
        np.dtype(dtype).itemsize
    return int(max(1, min(max(n, 1), round(chunk_bytes / max(row, 1)))))


def create_array(group, name: str, shape, dtype, key: DataKey,
                 chunk_bytes: int = CHUNK_BYTES) -> "EncryptedArray":
    """Create an empty encrypted array ``group[name]``; write rows with ``arr[a:b] = rows``."""
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    file_id = mark_file(group.file, key)
    r = rows_per_chunk(shape, dtype, chunk_bytes)
    n = shape[0] if shape else 1
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    k = -(-n // r)
    s = NONCE_BYTES + r * row + TAG_BYTES
    # contiguous: reading chunk k is one seek and one read (an HDF5 chunked layout of one
    # row per chunk went through HDF5's chunk cache: ~20x slower reads, measured)
    ds = group.create_dataset(name, shape=(k, s), dtype=np.uint8)
    a = ds.attrs
    a[A_CIPHER] = CIPHER
    a[A_KEY_ID] = key.key_id
    a[A_DTYPE] = dtype.str
    a[A_SHAPE] = np.asarray(shape if shape else (-1,), dtype=np.int64)
    a[A_ROWS] = r
    return EncryptedArray(ds, key, (shape, dtype, r, key.key_id, CIPHER, file_id))


def open_array(ds, key: DataKey | None):
    """``ds`` itself when stored in the clear, else an :class:`EncryptedArray` reading it."""
    return EncryptedArray(ds, key) if is_encrypted(ds) else ds


# ---------------------------------------------------------------------------- arrays

def _bytes_view(a: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (what the AEAD reads or writes)."""
    if not a.flags.c_contiguous:            # reshape would copy: writes would be lost
        raise ValueError("internal: AEAD buffers must be C-contiguous")
    return memoryview(a.reshape(-1).view(np.uint8))


class EncryptedArray:
    """Row-chunked AES-256-GCM array over an h5py dataset; indexes like the array it holds.

    ``arr[i]``, ``arr[a:b]``, ``arr[index_array]``, ``arr[...]`` and any of these followed by
    more axes (``arr[a:b, :, c:d]``) decrypt only the chunks holding the rows asked for.
    ``arr[a:b] = rows`` encrypts and writes each chunk as soon as all its rows are given
    (rows may come in any blocks). With ``key=None`` only the metadata can be read.

    Raises :class:`CryptError` for a wrong key, a malformed layout, and a chunk that fails
    authentication (naming the dataset and chunk).
    """

    def __init__(self, ds, key: DataKey | None, _meta=None):
        a = ds.attrs
        self.ds = ds
        self.name = ds.name
        self.key = key
        fh = ds.file
        where = f"{fh.filename}:{ds.name}"
        self.where = where
        try:
            if _meta is None:        # attribute reads cost ~0.1-0.5 ms each: read each once
                shape = tuple(int(s) for s in np.atleast_1d(a[A_SHAPE]))
                meta = (() if shape == (-1,) else shape, np.dtype(_s(a[A_DTYPE])),
                        int(a[A_ROWS]), _s(a[A_KEY_ID]), _s(a[A_CIPHER]),
                        _s(fh.attrs[A_FILE_ID]))
            else:
                meta = _meta
            self.shape, self.dtype, self.rows, kid, cipher, self._file_id = meta
        except (KeyError, TypeError, ValueError) as e:
            raise CryptError(f"{where}: encrypted array lacks or garbles its attributes ({e})") \
                from None
        self._rshape = self.shape[1:] if self.shape else ()
        self._n = self.shape[0] if self.shape else 1
        self._row_bytes = int(np.prod(self._rshape, dtype=np.int64)) * self.dtype.itemsize
        n_chunks = -(-self._n // self.rows) if self.rows > 0 else -1
        want = (n_chunks, NONCE_BYTES + self.rows * self._row_bytes + TAG_BYTES)
        if self.dtype.kind not in "biufc":      # raw bytes must never become Python objects
            raise CryptError(f"{where}: encrypted arrays hold numbers, not {self.dtype}")
        if (cipher != CIPHER or ds.dtype != np.uint8 or self.rows < 1
                or min(self.shape, default=1) < 0 or tuple(ds.shape) != want):
            raise CryptError(f"{where}: stored {tuple(ds.shape)} {ds.dtype} does not fit an "
                             f"encrypted {self.shape} {self.dtype} array of {self.rows} rows "
                             "per chunk")
        if key is not None and key.key_id != kid:
            raise CryptError(f"{where}: wrong key: encrypted with key id {kid}, {key.source} has "
                             f"key id {key.key_id}")
        self._aead = key.aead() if key is not None else None
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._blob = self._plain = None

    # --- metadata, as h5py.Dataset has it
    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    attrs = property(lambda self: self.ds.attrs)
    chunks = property(lambda self: (self.rows,) + self._rshape)
    compression = None

    def __len__(self) -> int:
        return self._n

    # --- one chunk
    def _aad(self, k: int) -> bytes:
        return b"\x00".join([_AAD_TAG, self._file_id.encode(), self.name.encode(),
                             self.dtype.str.encode(), repr(self.shape).encode(),
                             str(self.rows).encode(), str(k).encode()])

    def _count(self, k: int) -> int:
        return min(self.rows, self._n - k * self.rows)

    def _need_key(self):
        if self._aead is None:
            raise CryptError(f"{self.where} is encrypted; no key given to read or write it")

    def _buffers(self):
        """Reused buffers (no page faults per chunk): one stored chunk, one plaintext chunk."""
        if self._blob is None:
            self._blob = np.empty(self.ds.shape[1], dtype=np.uint8)
            self._plain = np.empty((self.rows,) + self._rshape, dtype=self.dtype)
        return self._blob, self._plain

    def _decrypt(self, k: int, into=None) -> np.ndarray:
        """Rows of chunk ``k``, (count_k, ...) of the logical dtype.

        ``into``: a C-contiguous (R, ...) array to decrypt into; by default a reused
        buffer, valid until the next call (callers copy out of it).
        """
        from cryptography.exceptions import InvalidTag

        blob, plain = self._buffers()
        dst = plain if into is None else into
        self.ds.read_direct(blob, source_sel=np.s_[k])
        nonce, sealed, aad = blob[:NONCE_BYTES].tobytes(), memoryview(blob)[NONCE_BYTES:], self._aad(k)
        try:
            if hasattr(self._aead, "decrypt_into"):     # cryptography >= 45: no extra copy
                self._aead.decrypt_into(nonce, sealed, aad, _bytes_view(dst))
            else:
                _bytes_view(dst)[:] = self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise CryptError(f"{self.where}: chunk {k} fails authentication (altered, swapped or "
                             "moved data, or a damaged file)") from None
        return dst[:self._count(k)]

    def _encrypt(self, k: int, rows: np.ndarray) -> None:
        """Seal rows (count_k, ...) as chunk ``k`` (padded with zero rows to R) and write it."""
        blob, plain = self._buffers()
        c = rows.shape[0]
        if c == self.rows and rows.dtype == self.dtype and rows.flags.c_contiguous:
            src = rows
        else:
            plain[:c] = rows
            plain[c:] = 0
            src = plain
        nonce = os.urandom(NONCE_BYTES)
        blob[:NONCE_BYTES] = np.frombuffer(nonce, dtype=np.uint8)
        if hasattr(self._aead, "encrypt_into"):         # cryptography >= 45: no extra copy
            self._aead.encrypt_into(nonce, _bytes_view(src), self._aad(k),
                                    memoryview(blob)[NONCE_BYTES:])
        else:
            blob[NONCE_BYTES:] = np.frombuffer(self._aead.encrypt(nonce, _bytes_view(src),
                                                                  self._aad(k)), dtype=np.uint8)
        self.ds.write_direct(blob, dest_sel=np.s_[k])

    # --- rows
    def _index(self, first) -> tuple[np.ndarray, bool]:
        """(row indices, whether the axis is dropped) for an axis-0 index."""
        if isinstance(first, slice):
            return np.arange(*first.indices(self._n), dtype=np.int64), False
        if isinstance(first, (int, np.integer)):
            i = int(first) + (self._n if first < 0 else 0)
            if not 0 <= i < self._n:
                raise IndexError(f"index {int(first)} outside [0, {self._n}) of {self.where}")
            return np.array([i], dtype=np.int64), True
        idx = np.asarray(first)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TypeError(f"{self.where}: index rows with an int, a slice or 1-D ints")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise IndexError(f"row indices outside [0, {self._n}) of {self.where}")
        return idx, False

    def read_rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed), decrypting each covering chunk once."""
        self._need_key()
        out = np.empty((idx.size,) + self._rshape, dtype=self.dtype)
        if idx.size == 0:
            return out
        lo, hi, r = int(idx[0]), int(idx[-1]) + 1, self.rows
        if hi - lo == idx.size and (idx.size == 1 or (np.diff(idx) == 1).all()):
            for k in range(lo // r, -(-hi // r)):      # a range of rows: plain slices
                a, b = max(lo, k * r), min(hi, (k + 1) * r)
                if b - a == r:                          # a whole chunk: straight into out
                    self._decrypt(k, into=out[a - lo:b - lo])
                else:
                    out[a - lo:b - lo] = self._decrypt(k)[a - k * r:b - k * r]
            return out
        chunk = idx // self.rows
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        for group in np.split(order, bounds):
            k = int(chunk[group[0]])
            out[group] = self._decrypt(k)[idx[group] - k * self.rows]
        return out

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if not self.shape:                                  # a 0-d array: one stored row
            value = self.read_rows(np.zeros(1, dtype=np.int64)).reshape(())
            return value[key] if key not in ((), (Ellipsis,)) else value
        if not key or key[0] is Ellipsis:
            return self.read_rows(np.arange(self._n, dtype=np.int64))[key]
        idx, drop = self._index(key[0])
        rows = self.read_rows(idx)
        rows = rows[0] if drop else rows
        rest = key[1:]
        return rows[((slice(None),) if not drop else ()) + rest] if rest else rows

    def __array__(self, dtype=None, copy=None):
        a = self[...]
        return a if dtype is None else a.astype(dtype)

    def __setitem__(self, key, value) -> None:
        """Write rows ``key`` (``...``, a slice of step 1, or an int) of the whole row width."""
        self._need_key()
        if not self.shape:
            if key not in ((), Ellipsis, slice(None)):
                raise TypeError(f"{self.where}: write a 0-d array with arr[...] = value")
            self._encrypt(0, np.asarray(value, dtype=self.dtype).reshape(1))
            return
        if key is Ellipsis or key == ():
            key = slice(None)
        if isinstance(key, (int, np.integer)):
            key = slice(int(key), int(key) + 1)
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"{self.where}: write whole rows with arr[a:b] = rows (got {key!r})")
        start, stop, _ = key.indices(self._n)
        stop = max(stop, start)
        rows = np.broadcast_to(np.asarray(value, dtype=self.dtype),
                               (stop - start,) + self._rshape)
        r = self.rows
        for k in range(start // r, -(-stop // r)):
            lo, hi = max(start, k * r), min(stop, (k + 1) * r)
            part = rows[lo - start:hi - start]
            if lo == k * r and hi == k * r + self._count(k):   # the whole chunk at once
                self._encrypt(k, part)
                self._pending.pop(k, None)
                continue
            buf, have = self._pending.setdefault(
                k, (np.zeros((self._count(k),) + self._rshape, self.dtype),
                    np.zeros(self._count(k), bool)))
            buf[lo - k * r:hi - k * r] = part
            have[lo - k * r:hi - k * r] = True
            if have.all():
                self._encrypt(k, buf)
                del self._pending[k]

    @property
    def unwritten_chunks(self) -> list[int]:
        """Chunks still waiting for some of their rows (nothing of them is on disk yet)."""
        return sorted(self._pending)


def config_keys(cfg: dict, comm) -> tuple[DataKey | None, DataKey | None]:
    """(dataset key, checkpoint key) named by a run's config, agreed on over ``comm``.

    Collective. ``data.key_file`` / ``data.key_env`` read an encrypted dataset;
    ``train.encrypt_key_file`` / ``train.encrypt_key_env`` write checkpoints encrypted and
    read encrypted ones. Raises :class:`mpifc.config.ConfigError` on every rank when a
    key cannot be read on some rank.
    """
    from mpifc.config import ConfigError

    d, t = cfg["data"], cfg["train"]
    try:
        return (agreed_key(comm, d["key_file"], d["key_env"], "data.key"),
                agreed_key(comm, t["encrypt_key_file"], t["encrypt_key_env"], "train.encrypt_key"))
    except CryptError as e:
        raise ConfigError(str(e)) from None
