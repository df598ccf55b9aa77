"""Files from elsewhere cannot make a rank read other files or allocate what is not there.

HDF5 lets a file point outside itself: an external link (``h5py.ExternalLink``) names
an object in another file, a soft link names any path, a dataset may keep its bytes
in other local files (external storage, ``dset.external``) or be a virtual dataset
mapping other files. A checkpoint or dataset handed over by someone else must not
make mpifc read ``/etc/...`` or another user's file, so :func:`check_file` refuses
all of them.

A dataset's shape is only a declaration: a 1 KB file can declare a (10**12,) array
whose storage was never written (reads return the fill value). Before anything is
read, :func:`check_file` checks each dataset against the file: contiguous storage
must hold every declared byte, chunked storage every chunk the shape needs, and the
declared size may not exceed ``MAX_DECLARED_BYTES`` per stored byte (gzip cannot
expand beyond ~1032x; this bound also stops a compression bomb).
"""
from __future__ import annotations

import os

import h5py
import numpy as np

#: most bytes a dataset may declare per byte it stores (deflate's limit is ~1032:1)
MAX_EXPANSION = 1100


def _dataset_problem(ds: h5py.Dataset, path: str) -> str | None:
    """Why ``ds`` may not be read, or None."""
    if ds.is_virtual:
        return f"dataset {path} is a virtual dataset (its bytes live in other files)"
    if ds.external:
        names = ", ".join(os.fspath(e[0]) if not isinstance(e[0], bytes) else e[0].decode()
                          for e in ds.external[:3])
        return f"dataset {path} keeps its bytes in external file(s) {names}"
    if ds.shape is None or ds.dtype.kind in ("O", "V") or h5py.check_string_dtype(ds.dtype):
        return None         # scalar/string datasets: bounded by the heap that holds them
    declared = int(np.prod(ds.shape, dtype=object)) * ds.dtype.itemsize
    if declared == 0:
        return None
    stored = int(ds.id.get_storage_size())
    if ds.chunks is None:
        if stored < declared:
            return (f"dataset {path} declares {ds.shape} {ds.dtype} ({declared:,} bytes) but the "
                    f"file stores {stored:,} bytes of it")
        return None
    need = 1
    for n, c in zip(ds.shape, ds.chunks):
        need *= -(-int(n) // int(c))
    have = int(ds.id.get_num_chunks())
    if have < need:
        return (f"dataset {path} declares {ds.shape} {ds.dtype} in {need:,} chunks but the file "
                f"stores {have:,} of them")
    if declared > MAX_EXPANSION * max(stored, 1):
        return (f"dataset {path} declares {declared:,} bytes from {stored:,} stored bytes "
                f"(more than {MAX_EXPANSION}x: not a real compressed array)")
    return None


def problems(f: h5py.File, limit: int = 5) -> list[str]:
    """Links out of the file, external or virtual storage, undeclared bytes (first ``limit``)."""
    found: list[str] = []
    seen: set = set()

    def walk(g: h5py.Group, prefix: str) -> None:
        if g.id in seen:             # a hard link back to an ancestor: visited already
            return
        seen.add(g.id)
        for name in g:
            if len(found) >= limit:
                return
            path = f"{prefix}/{name}" if prefix != "/" else f"/{name}"
            link = g.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                found.append(f"{path} is an external link to {link.filename}:{link.path}")
                continue
            if isinstance(link, h5py.SoftLink):
                found.append(f"{path} is a soft link to {link.path}")
                continue
            obj = g[name]
            if isinstance(obj, h5py.Group):
                walk(obj, path)
            elif isinstance(obj, h5py.Dataset):
                p = _dataset_problem(obj, path)
                if p:
                    found.append(p)

    walk(f, "/")
    return found


def check_file(f: h5py.File, where: str) -> None:
    """Raise ValueError naming ``where`` and the first problems :func:`problems` finds."""
    bad = problems(f)
    if bad:
        raise ValueError(f"{where}: refused: " + "; ".join(bad)
                         + " (only self-contained mpifc files are read)")


def user_set(overrides, key: str) -> bool:
    """Whether ``--set`` strings give ``key`` (``data.dir``) explicitly."""
    return any(o.split("=", 1)[0].strip() == key for o in overrides or [])


def eval_config(cfg: dict, overrides) -> dict:
    """A checkpoint's stored config made safe to evaluate with.

    The stored config came with the file: it never decides where ``mpifc eval``
    writes or which key signs. Signing settings are cleared; ``data.dir`` is the
    user's (``--set data.dir=...``, else the default ``runs/data`` under the current
    directory) unless the stored directory already holds the dataset file, which is
    then only read.
    """
    from mpifc.config import DEFAULTS

    train = {**cfg["train"], "sign_key": "", "verify_key": ""}
    data = dict(cfg["data"])
    if not user_set(overrides, "data.dir"):
        name = data["dataset"]
        named = not (name.endswith((".h5", ".hdf5")) or os.path.sep in name)
        if named:
            from mpifc.train import named_dataset_path

            if not os.path.isfile(named_dataset_path(cfg)):
                data["dir"] = DEFAULTS["data"]["dir"]
    return {**cfg, "train": train, "data": data}
