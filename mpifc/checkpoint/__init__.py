"""HDF5 checkpoints: full logical tensors + sharding attributes, digest, atomic, reshard on load.

    from mpifc.checkpoint import save, load, describe
    path = save("runs/ckpt", model, opt, grid, step=step, epoch=epoch,
                data_position=loader.state_dict(), rng_states={"dropout": rng},
                config=toml_text, keep_last=3)          # collective; same path on all ranks
    meta = load("runs/ckpt", model, opt, grid)          # latest in the directory, any layout
    print(describe(path))                               # mpifc inspect

The file layout is documented in :mod:`mpifc.checkpoint.format`; the digest in
:mod:`mpifc.checkpoint.digest`; the write protocol in :mod:`mpifc.checkpoint.atomic`.
"""
from mpifc.checkpoint.describe import describe
from mpifc.checkpoint.digest import compute as compute_digest
from mpifc.checkpoint.format import (FORMAT_NAME, FORMAT_VERSION, CheckpointError,
                                     checkpoint_name, latest_checkpoint, list_checkpoints,
                                     rng_state, set_rng_state)
from mpifc.checkpoint.load import load
from mpifc.checkpoint.save import save


def verify(path, verify_key=None) -> str:
    """Check a checkpoint's digest on this process alone; return it or raise CheckpointError.

    With ``verify_key`` (path or Ed25519 public key) its signature is checked too.
    """
    import h5py

    if verify_key:                          # security: digest and signature
        from mpifc.security.signing import verify_file
        return verify_file(path, verify_key)[0]

    from mpifc.checkpoint import digest
    from mpifc.checkpoint.format import resolve

    target = resolve(path)
    try:
        with h5py.File(target, "r") as f:
            return digest.check(f, target)
    except (OSError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{target}: unreadable ({exc}); truncated or damaged") from None
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def newest_valid(directory) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest checkpoint in ``directory`` that verifies, and the newer ones that did not.

    Returns (path or None, [(skipped path, reason), ...] newest first); on this
    process alone (the trainer runs it on rank 0 and broadcasts the choice).
    """
    skipped = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            verify(path)
            return path, skipped
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
    return None, skipped


def stored_config(path, verify_key=None) -> tuple[str, str | None]:
    """(checkpoint file, the run's TOML config text or None), read on this process alone.

    The digest (and with ``verify_key`` the signature) is checked first, so a damaged
    or altered file is refused before its config is used.
    """
    import h5py

    from mpifc.checkpoint.format import as_str, resolve

    verify(path, verify_key)
    target = resolve(path)
    with h5py.File(target, "r") as f:
        return target, (as_str(f["config"][()]) if "config" in f else None)


__all__ = ["save", "load", "describe", "verify", "newest_valid", "stored_config",
           "compute_digest", "CheckpointError",
           "FORMAT_NAME", "FORMAT_VERSION", "checkpoint_name", "list_checkpoints",
           "latest_checkpoint", "rng_state", "set_rng_state"]
