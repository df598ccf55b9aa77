"""Human-readable summaries of checkpoint and dataset files (``mpifc inspect FILE``)."""
from __future__ import annotations

import os

import h5py
import numpy as np

from mpifc.checkpoint import digest
from mpifc.checkpoint.format import (BUFFERS, FORMAT_NAME, OPTIMIZER, PARAMS, CheckpointError,
                                     as_str, layout_attr, list_checkpoints, resolve)
from mpifc.security import crypt


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _sharding(ds) -> str:
    ax = int(ds.attrs.get("sharding_axis", -1))
    if ax < 0:
        return "replicated"
    counts = [int(c) for c in np.atleast_1d(ds.attrs.get("sharding_counts", []))]
    return f"axis {ax} over {as_str(ds.attrs.get('sharding_group', '?'))} {counts}"


def _tensor_lines(g, indent="  ") -> list[str]:
    rows = []
    g.visititems(lambda n, o: rows.append((n, o)) if isinstance(o, h5py.Dataset) else None)
    width = max((len(n) for n, _ in rows), default=0)
    return [f"{indent}{n:<{width}}  {str(crypt.logical_shape(o)):<16} "
            f"{crypt.logical_dtype(o).name:<8} {_sharding(o)}"
            + (" (encrypted)" if crypt.is_encrypted(o) else "") for n, o in rows]


def _signature_line(f, verified: str | None) -> str:
    """What ``inspect`` says about a signature: verified, or claimed but not checked."""
    if verified:
        return f"  signature: OK, signed by {verified} (verified with the given public key)"
    sig = as_str(f.attrs["signed_by"]) if "signature" in f.attrs else None
    if sig is None:
        return "  signature: not signed"
    return f"  signature: signed by {sig}, not verified (pass --pubkey to verify)"


def describe_checkpoint(path: str, verified: str | None = None) -> str:
    """Step, epoch, layout, tensors with global shapes and sharding, digest OK/BAD."""
    return _checkpoint_summary(path, verified)[0]


def _checkpoint_summary(path: str, verified: str | None = None) -> tuple[str, str | None]:
    """(summary, the digest problem or None)."""
    with h5py.File(path, "r") as f:
        a = f.attrs
        problem = None
        try:
            digest.check(f, path)
            verdict = f"OK ({as_str(a[digest.DIGEST_ATTR])[:23]}...)"
        except (ValueError, OSError, RuntimeError, KeyError) as exc:
            verdict = f"BAD: {exc}"
            problem = f"{path}: digest does not match: the checkpoint is damaged or was altered"
        lay = layout_attr(a, path)
        n_params = (sum(int(np.prod(crypt.logical_shape(o))) for o in f[PARAMS].values())
                    if PARAMS in f else 0)
        lines = [f"mpifc checkpoint {path} ({_fmt_bytes(os.path.getsize(path))})",
                 f"  step {int(a.get('step', -1))}, epoch {int(a.get('epoch', -1))}, saved "
                 f"{as_str(a.get('created', '?'))} by mpifc {as_str(a.get('mpifc_version', '?'))}",
                 f"  layout at save: world {lay.get('world')} = dp {lay.get('dp')} x tp {lay.get('tp')}",
                 f"  data position: {as_str(a.get('data_position', 'null'))}",
                 f"  digest: {verdict}",
                 _signature_line(f, verified),
                 f"  encryption: {crypt.describe_file(f) or 'none (tensors stored in the clear)'}",
                 f"parameters ({len(f[PARAMS]) if PARAMS in f else 0} tensors, {n_params:,} values):"]
        if PARAMS in f:
            lines += _tensor_lines(f[PARAMS])
        if BUFFERS in f and len(f[BUFFERS]):
            lines.append("buffers:")
            lines += _tensor_lines(f[BUFFERS])
        if OPTIMIZER in f:
            oa = f[OPTIMIZER].attrs
            lines.append(f"optimizer: {as_str(oa.get('class'))} lr={float(oa.get('lr')):g} "
                         f"steps={int(oa.get('step_count'))} {as_str(oa.get('hyper', ''))}")
            for slot in f[OPTIMIZER]:
                lines.append(f"  {slot}: {len(f[OPTIMIZER][slot])} tensors")
        if "rng" in f:
            lines.append(f"rng states: {sum(1 for k in f['rng'].attrs if k.startswith('rank_'))} ranks")
        if "config" in f:
            cfg = as_str(f["config"][()])
            lines.append(f"config: {len(cfg.splitlines())} lines of TOML")
    return "\n".join(lines), problem


def describe_dataset(path: str) -> str:
    """Splits, shapes, classes and normalisation of an mpifc dataset (via mpifc.data)."""
    from mpifc.data import read_info

    info = read_info(path)
    lines = [f"mpifc dataset {path} ({_fmt_bytes(os.path.getsize(path))}), format version "
             f"{info.version}", f"  source: {info.source}",
             f"  classes ({info.num_classes}): {', '.join(info.class_names[:10])}"
             + (" ..." if info.num_classes > 10 else ""),
             f"  normalisation: {info.normalisation.describe()}",
             f"  encryption: {info.encryption or 'none'}"]
    if info.layout == "text":                   # issue 13: ragged token ids
        from mpifc.data.textformat import describe_text
        return "\n".join(lines[:3] + describe_text(info, path))
    for name, s in info.splits.items():
        comp = f", {s.compression}" if s.compression else ""
        lines.append(f"  {name}: {s.n} samples of {s.sample_shape} {np.dtype(s.dtype).name}, "
                     f"chunks {s.chunks}{comp}")
    return "\n".join(lines)


def describe(path, verify_key=None) -> str:
    """The summary of :func:`inspect` (a damaged checkpoint is still described)."""
    return inspect(path, verify_key)[0]


def inspect(path, verify_key=None) -> tuple[str, str | None]:
    """Summarise a checkpoint, a checkpoint directory, or a dataset file.

    Parameters
    ----------
    path : str or PathLike
        A checkpoint (``ckpt-*.h5``), a directory of them (all are listed, the
        latest is described), or an mpifc HDF5 dataset.
    verify_key : path or Ed25519 public key, optional
        Verify a checkpoint's signature first; refuse (SignatureError) when it fails.

    Returns
    -------
    (text, problem) : several lines, ready to print, and None or a one-line problem.
    A damaged checkpoint is still described, with ``digest: BAD`` and the reason, and
    ``problem`` says its digest does not match (``mpifc inspect`` then exits 1).

    Raises
    ------
    CheckpointError for a missing path or a file that is neither kind.
    """
    path = os.fspath(path)
    head = ""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        best = os.path.join(path, "best.h5")
        head = (f"checkpoint directory {path}: "
                + ", ".join(f"step {s}" for s, _ in found)
                + (", best.h5" if os.path.exists(best) else "") + "\n") if found else ""
    target = resolve(path)
    try:
        with h5py.File(target, "r") as f:
            fmt = as_str(f.attrs.get("format", ""))
    except OSError as exc:
        raise CheckpointError(f"{target}: cannot be read as HDF5 ({exc}); truncated, damaged, or "
                              "not an HDF5 file") from None
    if fmt == FORMAT_NAME:
        verified = None
        if verify_key:                              # security: refuse what does not verify
            from mpifc.security.signing import verify_file
            verified = verify_file(target, verify_key)[1]
        text, problem = _checkpoint_summary(target, verified)
        return head + text, problem
    if verify_key:
        raise CheckpointError(f"{target}: --pubkey verifies checkpoints; this is not one")
    from mpifc.data import DatasetError
    try:
        return head + describe_dataset(target), None
    except DatasetError as exc:
        raise CheckpointError(f"{target}: neither an mpifc checkpoint nor an mpifc dataset "
                              f"({exc})") from None
