"""Collective load: root verifies the whole file, then every rank reads only its slices.

1. World rank 0 opens the file, checks its format, recomputes the SHA-256 digest
   over every byte, and compares the stored tensors with this model (names, global
   shapes) and optimizer; the verdict is broadcast, so a missing, truncated,
   altered or foreign checkpoint raises the same :class:`CheckpointError` on every
   rank before anything is touched.
2. Every rank opens the file read-only (a shared file system) and reads, for each
   tensor, the hyperslab ``Sharding.local_slice()`` of its OWN (new) layout into a
   staging copy -- tp 2 -> 1, dp 1 -> 2 or tp 1 -> 3 all work the same way.
3. Only when every rank has read everything are the model, buffers and optimizer
   overwritten: a load never stops half-way.
"""
from __future__ import annotations

import os

import h5py
import numpy as np

from mpifc.backend import get_array_module, to_device
from mpifc.checkpoint import digest
from mpifc.checkpoint.entries import collect, local_problems, signature
from mpifc.checkpoint.format import (BUFFERS, FORMAT_NAME, FORMAT_VERSION, OPTIMIZER, PARAMS,
                                     CheckpointError, as_str, layout_attr, loads, resolve)
from mpifc.checkpoint.save import _agree
from mpifc.security import crypt

KEY_SETTINGS = "train.encrypt_key_file or train.encrypt_key_env"


def _first(items, n=5) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _compare(f, entries, optimizer, where: str) -> None:
    """Raise ValueError listing the first mismatches between the file and this model."""
    want = {e.path: e.global_shape for e in entries if e.kind != OPTIMIZER}
    have = {}
    for grp in (PARAMS, BUFFERS):
        if grp in f:
            f[grp].visititems(lambda n, o, g=grp: have.__setitem__(f"/{g}/{n}",
                                                                   crypt.logical_shape(o))
                              if isinstance(o, h5py.Dataset) else None)
    missing = [p for p in want if p not in have]
    unexpected = [p for p in have if p not in want]
    shapes = [f"{p} {tuple(have[p])} in file vs {tuple(want[p])} in model"
              for p in want if p in have and tuple(have[p]) != tuple(want[p])]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_first(missing)}")
        if unexpected:
            parts.append(f"not in this model: {_first(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {_first(shapes, 3)}")
        raise ValueError(f"{where}: checkpoint was saved from a different model; " + "; ".join(parts))
    if optimizer is None:
        return
    if OPTIMIZER not in f:
        raise ValueError(f"{where}: checkpoint holds no optimizer state, but an optimizer "
                         f"({type(optimizer).__name__}) was given to load into; pass None to "
                         "load the model only")
    cls = as_str(f[OPTIMIZER].attrs.get("class", ""))
    if cls != type(optimizer).__name__:
        raise ValueError(f"{where}: checkpoint optimizer is {cls}, this run uses "
                         f"{type(optimizer).__name__}")


def _root_check(path, entries, optimizer, verify_key=None, key=None) -> dict:
    """Resolve, open, verify and compare on the root; the metadata every rank needs."""
    if verify_key:                       # security: a bad key file is refused first
        from mpifc.security.signing import public_key
        verify_key = public_key(verify_key)
    final = resolve(path)
    try:
        f = h5py.File(final, "r")
    except OSError as exc:
        raise ValueError(f"{final}: cannot be read as HDF5 ({exc}); the file is truncated, "
                         "damaged, or not a checkpoint") from None
    with f:
        if as_str(f.attrs.get("format", "")) != FORMAT_NAME:
            raise ValueError(f"{final}: not an mpifc checkpoint (format attribute "
                             f"{f.attrs.get('format')!r})")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise ValueError(f"{final}: checkpoint format version {version}; this mpifc reads "
                             f"{FORMAT_VERSION}")
        # an encrypted file needs its key (a clear one loads with or without a key)
        crypt.check_key(f, key, final, KEY_SETTINGS, accept_clear=True)
        try:
            total = digest.check(f, final)
        except (OSError, RuntimeError, KeyError) as exc:
            raise ValueError(f"{final}: unreadable while verifying its digest ({exc}); the file "
                             "is truncated or damaged") from None
        if verify_key:                   # security: unsigned / other key / altered after signing
            from mpifc.security.signing import check_open
            check_open(f, final, verify_key, total)
        _compare(f, entries, optimizer, final)
        a = f.attrs
        meta = {"path": final, "step": int(a["step"]), "epoch": int(a["epoch"]),
                "data_position": loads(a["data_position"]), "extra": loads(a["extra"]),
                "layout": layout_attr(a, final), "created": as_str(a["created"]),
                "model_signature": as_str(a["model_signature"]), "digest": total,
                "config": as_str(f["config"][()]) if "config" in f else None}
        if OPTIMIZER in f:
            oa = f[OPTIMIZER].attrs
            meta["optimizer"] = {"class": as_str(oa["class"]), "lr": float(oa["lr"]),
                                 "step_count": int(oa["step_count"]), "hyper": loads(oa["hyper"])}
        else:
            meta["optimizer"] = None
    return meta


def final_or(path) -> str:
    """The file ``path`` resolves to, or ``path`` itself when it does not resolve."""
    try:
        return resolve(path)
    except CheckpointError:
        return os.fspath(path)


def _local_slice(e):
    return e.sharding.local_slice() if e.sharded else tuple(slice(None) for _ in e.global_shape)


def load(path, model, optimizer, grid, *, rng: bool = True, verify_key=None, key=None) -> dict:
    """Load a checkpoint into ``model`` (and ``optimizer``) under ANY dp x tp layout.

    Collective over ``grid.world``; every rank passes its own (sharded) model.

    Parameters
    ----------
    path : str or PathLike
        A checkpoint file, or a directory (its highest-step ``ckpt-NNNNNN.h5``).
    model : Module
        Receives parameters and buffers: each rank reads the slice its
        ``Parameter.sharding`` (new layout) asks for.
    optimizer : Optimizer or None
        Receives lr, step count and per-parameter state (None: model only).
    grid : mpifc.comm.Grid or None
        This run's layout; None means pure data parallel over the world.
    rng : bool
        Return this rank's saved generator states (only meaningful when the saved
        layout equals this one).
    verify_key : path or Ed25519 public key, optional
        Refuse (on every rank, before any tensor is read) a checkpoint that is not
        signed by this key or was altered after signing (``mpifc.security.signing``).
    key : mpifc.security.crypt.DataKey, optional
        Key of an encrypted checkpoint (its key id is checked on the root first);
        each rank decrypts only the chunks holding its slices.

    Returns
    -------
    dict with ``path, step, epoch, data_position, config, extra, layout`` (saved
    {"world", "dp", "tp"}), ``created, digest, model_signature, optimizer``
    ({"class", "lr", "step_count", "hyper"} or None) and ``rng_states``: this
    rank's {name: state} when the saved layout equals this one, else None (restore
    with :func:`mpifc.checkpoint.set_rng_state`).

    Raises
    ------
    CheckpointError on every rank: missing file, bad format, digest mismatch,
    truncated file, different model, optimizer mismatch, unreadable slices.

    Notes
    -----
    Every rank opens the file read-only at once. On file systems without POSIX
    locks (some NFS mounts) HDF5 may refuse that; set ``HDF5_USE_FILE_LOCKING=FALSE``.
    """
    from mpifc.comm import Grid, trace, world

    if grid is None:
        grid = Grid(world())
    comm = grid.world
    where = os.fspath(path)
    problems, entries = [], []
    try:
        entries = collect(model, optimizer, grid)
        problems = local_problems(entries)
    except Exception as exc:  # noqa: BLE001 - agreed on by all ranks below
        problems = [f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)]
    _agree(comm, problems, f"cannot load checkpoint {where}")
    sigs = comm.allgather_obj(signature(entries))
    if len(set(sigs)) != 1:
        raise CheckpointError(f"cannot load checkpoint {where}: ranks hold different models")

    with trace.phase("checkpoint.load"):
        # 1. the root verifies every byte and the model match; all ranks share the verdict
        verdict = None
        if comm.rank == 0:
            try:
                verdict = ("ok", _root_check(path, entries, optimizer, verify_key, key))
            except (ValueError, CheckpointError) as exc:
                verdict = ("error", str(exc))
            except Exception as exc:  # noqa: BLE001 - never leave the other ranks waiting
                verdict = ("error", f"{final_or(path)}: {type(exc).__name__}: {exc}")
        verdict = comm.bcast_obj(verdict, root=0)
        if verdict[0] != "ok":
            raise CheckpointError(f"refusing to load: {verdict[1]}")
        meta = verdict[1]
        final = meta["path"]

        # 2. every rank reads its slices of the new layout into staging copies
        staged, error = {}, None
        try:
            with h5py.File(final, "r") as f:
                for e in entries:
                    if e.kind == OPTIMIZER and e.path not in f:
                        staged[e.path] = None        # slot not created when saved
                        continue
                    ds = crypt.open_array(f[e.path], key)      # decrypts only these rows
                    staged[e.path] = np.asarray(ds[_local_slice(e)], dtype=e.dtype)
                rng_states = None
                same = meta["layout"] == {"world": comm.size, "dp": grid.dp, "tp": grid.tp}
                key = f"rank_{comm.rank:05d}"
                if rng and same and key in f["rng"].attrs:
                    rng_states = loads(f["rng"].attrs[key])
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it
            error = f"{type(exc).__name__}: {exc}"
        _agree(comm, [error] if error else [], f"refusing to load {final}")

    # 3. nothing can fail any more: overwrite in place (buffers keep their identity)
    sd_slots = {}
    for e in entries:
        host = staged[e.path]
        if e.kind == OPTIMIZER:
            if host is None:
                optimizer.state[e.slot][e.opt_index] = None
            else:
                sd_slots[f"{optimizer.names[e.opt_index]}/{e.slot}"] = host
            continue
        xp = get_array_module(e.local)
        e.local[...] = to_device(host, xp) if xp is not np else host
    if optimizer is not None:
        om = meta["optimizer"]
        optimizer.load_state_dict({"lr": om["lr"], "step": om["step_count"], "slots": sd_slots})
    meta["rng_states"] = rng_states
    return meta
