"""Collective save: gather shards one tensor at a time to world rank 0, write atomically.

Every rank of the job calls :func:`save` with the same arguments. Only the tensor
group of data-parallel rank 0 takes part in the gathers (data-parallel replicas
hold identical tensors); world rank 0, the writer, holds at most ONE full tensor
at a time. In ``mode="per-rank"`` nothing is gathered: the writer creates the file
with every dataset at its global shape, then each rank in turn opens it and writes
its own hyperslabs (a shared file system and no parallel HDF5 needed).

Nothing hangs and nothing is lost: problems found before any collective are agreed
on by all ranks first; an error while writing is remembered, the writer keeps
joining the gathers without writing, and the verdict is broadcast at the end, so
every rank raises the same :class:`CheckpointError` and the temporary file is
removed. The previous checkpoint is never touched before the new one is complete.
"""
from __future__ import annotations

import datetime
import os

import h5py

from mpifc.backend import to_host
from mpifc.checkpoint import digest
from mpifc.checkpoint.atomic import prune, publish, temporary_path
from mpifc.checkpoint.entries import (collect, gather_full, host_digest, in_root_copy,
                                      local_problems, sharding_attrs, signature)
from mpifc.checkpoint.format import (BUFFERS, FORMAT_NAME, FORMAT_VERSION, OPTIMIZER, PARAMS,
                                     CheckpointError, checkpoint_name, dumps, is_file_path,
                                     rng_state)
from mpifc.security import crypt

MODES = ("gather", "per-rank")


def _agree(comm, problems: list[str], what: str, error=CheckpointError) -> None:
    """Raise the same ``error`` on every rank if any rank found a problem."""
    allp = comm.allgather_obj(problems)
    msgs = [f"rank {r}: {m}" for r, ps in enumerate(allp) for m in ps]
    if msgs:
        more = f" (and {len(msgs) - 5} more)" if len(msgs) > 5 else ""
        raise error(f"{what}: " + "; ".join(msgs[:5]) + more)


def _discard(f, tmp: str) -> None:
    """Close and delete a failed temporary file (the original error is what is reported)."""
    try:
        if f is not None and f.id.valid:
            f.close()
    except Exception:  # noqa: BLE001
        pass
    if os.path.exists(tmp):
        os.remove(tmp)


def _final_path(path, step: int) -> tuple[str, str | None]:
    """(final file, directory to prune or None) for a file path or a checkpoint directory."""
    path = os.fspath(path)
    if is_file_path(path):
        return os.path.abspath(path), None
    return os.path.abspath(os.path.join(path, checkpoint_name(step))), os.path.abspath(path)


def _optimizer_attrs(optimizer) -> dict:
    sd = optimizer.state_dict()
    hyper = {k: v for k, v in vars(optimizer).items()
             if k not in ("lr", "step_count", "names", "params", "state")
             and isinstance(v, (int, float, bool, str, tuple))}
    return {"class": type(optimizer).__name__, "lr": float(sd["lr"]), "step_count": int(sd["step"]),
            "slots": dumps(list(optimizer.slots)), "hyper": dumps(hyper)}


def _write_header(f, *, step, epoch, grid, sig, data_position, extra, config, optimizer,
                  rng_all, entries, key=None, arrays=None):
    a = f.attrs
    a["format"] = FORMAT_NAME
    a["format_version"] = FORMAT_VERSION
    a["step"] = int(step)
    a["epoch"] = int(epoch)
    a["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    from mpifc import __version__
    a["mpifc_version"] = str(__version__)
    layout = {"world": grid.world.size, "dp": grid.dp, "tp": grid.tp}
    a["layout"] = dumps(layout)
    a["model_signature"] = sig
    a["data_position"] = dumps(data_position)
    a["extra"] = dumps(extra)
    f.create_group(PARAMS)
    f.create_group(BUFFERS)
    if optimizer is not None:
        og = f.create_group(OPTIMIZER)
        for k, v in _optimizer_attrs(optimizer).items():
            og.attrs[k] = v
        for slot in optimizer.slots:
            og.create_group(slot)
    rg = f.create_group("rng")
    rg.attrs["world_size"] = grid.world.size
    rg.attrs["layout"] = dumps(layout)
    for r, text in enumerate(rng_all):
        rg.attrs[f"rank_{r:05d}"] = text
    if config is not None:
        f.create_dataset("config", data=config, dtype=h5py.string_dtype())
    for e in entries:
        if e.local is None:
            continue
        if key is not None:      # encryption at rest: AES-256-GCM chunks of whole rows
            ds = arrays[e.path] = crypt.create_array(f, e.path, e.global_shape, e.dtype, key)
        else:
            # contiguous, uncompressed: hyperslab reads of any new layout are plain seeks
            ds = f.create_dataset(e.path, shape=e.global_shape, dtype=e.dtype)
        for k, v in sharding_attrs(e).items():
            ds.attrs[k] = v


def save(path, model, optimizer, grid, *, step: int, epoch: int = 0, data_position=None,
         rng_states=None, config: str | None = None, keep_last: int | None = 3,
         mode: str = "gather", extra=None, sign_key=None, key=None) -> str:
    """Write a checkpoint of ``model`` and ``optimizer`` (collective over ``grid.world``).

    Parameters
    ----------
    path : str or PathLike
        A directory (the file is ``<path>/ckpt-<step:06d>.h5`` and only the last
        ``keep_last`` such files are kept) or a file name ending in ``.h5``/``.hdf5``.
    model : Module
        Parameters (local shards, ``Parameter.sharding`` says how) and buffers.
    optimizer : Optimizer or None
        Its per-parameter state is stored full-size, sharded like its parameter.
    grid : mpifc.comm.Grid or None
        The dp x tp layout; None means pure data parallel over the world.
    step, epoch : int
        Training progress; ``step`` also names the file in directory mode.
    data_position : JSON-able, optional
        E.g. ``DistributedLoader.state_dict()``.
    rng_states : dict, optional
        THIS rank's generators, {name: numpy Generator | BitGenerator | state dict};
        each rank's are stored (``/rng/rank_NNNNN``).
    config : str, optional
        The run's configuration as TOML text.
    keep_last : int or None
        Checkpoints to keep in directory mode (None or 0: all).
    mode : "gather" | "per-rank"
        Gather each tensor to the writer, or let each rank write its own slices.
    extra : JSON-able, optional
        Anything else the trainer needs to resume (schedule state, best metric).
    sign_key : path or Ed25519 private key, optional
        Sign the checkpoint (``mpifc.security.signing``) before it is published under
        its final name; only world rank 0 reads the key.
    key : mpifc.security.crypt.DataKey, optional
        Store every tensor AES-256-GCM encrypted (gather mode only); the file's
        attributes, config and digest (over the stored bytes) stay in the clear.

    Returns
    -------
    str : the path of the checkpoint written (same on every rank).

    Raises
    ------
    CheckpointError on every rank if any rank finds a problem or the write fails.
    """
    from mpifc.comm import Grid, trace, world

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if config is not None and not isinstance(config, str):
        raise TypeError("config must be TOML text (str); see mpifc.config.to_toml")
    if grid is None:
        grid = Grid(world())
    comm = grid.world
    final, directory = _final_path(path, step)

    # 1. everything that can be checked locally is checked before any collective
    problems, entries, sig, rng_text = [], [], "", dumps({})
    try:
        entries = collect(model, optimizer, grid)
        problems = local_problems(entries)
        sig = signature(entries)
        rng_text = dumps({str(k): rng_state(g) for k, g in (rng_states or {}).items()})
        dumps(data_position), dumps(extra)
        if sign_key and comm.rank == 0:          # security: a bad key fails every rank now
            from mpifc.security.signing import private_key
            sign_key = private_key(sign_key)
        if key is not None and mode != "gather":
            problems.append("an encrypted checkpoint is written in mode='gather' only (each "
                            "rank's slabs would cut across encrypted chunks)")
    except Exception as exc:  # noqa: BLE001 - agreed on by all ranks below
        problems = [str(exc) if isinstance(exc, (ValueError, TypeError))
                    else f"{type(exc).__name__}: {exc}"]
    _agree(comm, problems, f"cannot save checkpoint {final}")
    sigs = comm.allgather_obj(sig)
    if len(set(sigs)) != 1:
        raise CheckpointError(f"cannot save checkpoint {final}: ranks hold different models "
                              f"(parameter names/shapes differ between ranks "
                              f"{[r for r, s in enumerate(sigs) if s != sigs[0]][:5]} and 0)")
    # undeclared buffers must really be replicated over the tensor group
    bufs = [e for e in entries if e.kind == BUFFERS and not e.sharded]
    if grid.tp > 1 and bufs:
        mine = [host_digest(e.local) for e in bufs]
        theirs = grid.tp_comm.allgather_obj(mine)
        diff = [bufs[i].name for i in range(len(bufs)) if len({t[i] for t in theirs}) > 1]
        _agree(comm, [f"buffer {n!r} differs across the tensor group but its module declares no "
                      f"buffer_shardings" for n in diff[:3]], f"cannot save checkpoint {final}")

    rng_all = comm.gather_obj(rng_text, root=0)
    root = comm.rank == 0
    tmp = comm.bcast_obj(temporary_path(final) if root else None, root=0)
    error = None

    def attempt(fn, *args):
        # remember the first failure on this rank; keep joining collectives after it
        nonlocal error
        if error is None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                error = f"{type(exc).__name__}: {exc}"

    f = None
    arrays = {}                # path -> EncryptedArray being written (encrypted saves)
    with trace.phase("checkpoint.save"):
        if root:
            def create():
                nonlocal f
                os.makedirs(os.path.dirname(final), exist_ok=True)
                f = h5py.File(tmp, "w")
                _write_header(f, step=step, epoch=epoch, grid=grid, sig=sig,
                              data_position=data_position, extra=extra, config=config,
                              optimizer=optimizer, rng_all=rng_all, entries=entries, key=key,
                              arrays=arrays)
            attempt(create)

        def write(e, arr):
            (arrays[e.path] if e.path in arrays else f[e.path])[...] = arr

        if mode == "gather":
            for e in entries:
                if e.local is None:
                    continue
                if e.sharded:
                    if not in_root_copy(e, grid):
                        continue
                    full = gather_full(e, grid)     # one full tensor at a time, on the root
                    if root:
                        attempt(write, e, full)
                    del full
                elif root:
                    attempt(write, e, to_host(e.local))
        else:
            if root:
                for e in entries:
                    if e.local is not None and not e.sharded:
                        attempt(write, e, to_host(e.local))
                attempt(lambda: f.close())
            first = comm.bcast_obj(error, root=0)    # no file to write into: stop here
            if first is not None:
                if root:
                    _discard(f, tmp)
                raise CheckpointError(f"could not write checkpoint {final}: {first} "
                                      "(the previous checkpoint is untouched)")
            for turn in range(comm.size):             # one writer at a time: HDF5 locks files
                if turn == comm.rank:
                    mine = [e for e in entries if e.local is not None and e.sharded
                            and in_root_copy(e, grid)]
                    if mine:
                        def write_slabs():
                            with h5py.File(tmp, "r+") as g:
                                for e in mine:
                                    g[e.path][e.sharding.local_slice()] = to_host(e.local)
                        attempt(write_slabs)
                comm.barrier()
            errs = comm.allgather_obj(error)
            error = next((f"rank {r}: {m}" for r, m in enumerate(errs) if m), None)
            if root and error is None:
                def reopen():
                    nonlocal f
                    f = h5py.File(tmp, "r+")
                attempt(reopen)

        if root:
            def finish():
                f.flush()
                total, per_dataset = digest.compute(f)
                for p, d in per_dataset.items():
                    f[p].attrs[digest.DATASET_ATTR] = d
                f.attrs[digest.DIGEST_ATTR] = total
                if sign_key:                         # security: signed before it is visible
                    from mpifc.security.signing import sign_open
                    sign_open(f, sign_key, total)
                f.close()
                publish(tmp, final)
                if directory is not None:
                    prune(directory, keep_last, keep=final)
            attempt(finish)
            if error is not None:
                _discard(f, tmp)
        verdict = comm.bcast_obj(error, root=0)
    if verdict is not None:
        raise CheckpointError(f"could not write checkpoint {final}: {verdict} "
                              "(the previous checkpoint is untouched)")
    return final
