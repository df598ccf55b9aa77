"""``mpifc export``: a checkpoint's model as plain tensors for use outside mpifc.

    mpifc export runs/digits-mlp --format safetensors --out digits-mlp.safetensors
    mpifc export runs/digits-mlp/checkpoints/ckpt-000420.h5 --format npz --out model.npz

The checkpoint already holds full logical tensors (whatever layout saved it), so
export reads them, after checking the digest (and with ``--pubkey`` the signature):
every parameter and buffer under its name in the model (``fc1.weight``,
``bn1.running_mean``; a linear weight is (out, in), y = x @ W.T + b), no optimizer
state. Metadata: the run's TOML config (``config``), ``step``, ``checkpoint``
(path), ``format = "mpifc-export"``.

* safetensors: written with the ``safetensors`` package when installed (the
  ``export`` extra), else by :func:`write_safetensors`, the documented format: an
  8-byte little-endian header length, a JSON header ({name: {dtype, shape,
  data_offsets}}, ``__metadata__``: str -> str), then the raw little-endian bytes.
* npz: ``numpy.savez`` of the tensors; the metadata as a 0-d string array
  ``__metadata__`` holding JSON.

Both are written to a temporary name and renamed into place. One process does the
work; under ``mpiexec`` rank 0 does, and every rank exits with its verdict.
"""
from __future__ import annotations

import json
import os

import numpy as np

FORMATS = ("safetensors", "npz")
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def read_tensors(checkpoint: str, verify_key=None) -> tuple[dict, dict]:
    """({name: full array}, metadata) of a checkpoint's parameters and buffers (verified)."""
    import h5py

    from mpifc.checkpoint import stored_config
    from mpifc.checkpoint.format import BUFFERS, PARAMS

    path, text = stored_config(checkpoint, verify_key=verify_key)   # digest checked first
    tensors = {}
    with h5py.File(path, "r") as f:
        for group in (PARAMS, BUFFERS):
            if group in f:
                for name in sorted(f[group]):
                    tensors[name] = np.ascontiguousarray(f[group][name][...])
        step = int(f.attrs.get("step", -1))
    meta = {"format": "mpifc-export", "checkpoint": os.path.abspath(path), "step": str(step),
            "config": text or ""}
    return tensors, meta


def write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """The safetensors format by hand: u64 header length, JSON header, raw bytes (LE)."""
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.name not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {a.dtype} has no safetensors name")
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                 # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for raw in blobs:
            f.write(raw)


def _write(fmt: str, path: str, tensors: dict, meta: dict) -> None:
    if fmt == "npz":
        with open(path, "wb") as f:       # a file object: savez adds no ".npz" to the name
            np.savez(f, **tensors, __metadata__=np.array(json.dumps(meta)))
        return
    try:
        from safetensors.numpy import save_file
    except ImportError:
        write_safetensors(path, tensors, meta)
        return
    save_file(tensors, path, metadata=meta)


def export(checkpoint: str, out: str, fmt: str = "safetensors", verify_key=None) -> dict:
    """Write ``checkpoint``'s model tensors to ``out`` in ``fmt``; returns {name: shape}.

    Raises CheckpointError (a missing, damaged or unsigned checkpoint), ValueError
    (an unknown format), OSError (``out`` cannot be written).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    tensors, meta = read_tensors(checkpoint, verify_key)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        _write(fmt, tmp, tensors, meta)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _cmd_export(args):
    from mpifc.checkpoint import CheckpointError
    from mpifc.cli import _eval_target
    from mpifc.comm import world

    comm = world()
    err, shapes = None, None
    if comm.rank == 0:
        try:
            shapes = export(_eval_target(args.checkpoint, False), args.out, args.format,
                            verify_key=args.pubkey)
        except (CheckpointError, ValueError, OSError) as e:
            err = str(e)
    err = comm.bcast_obj(err)          # every rank exits with rank 0's verdict
    if err:
        raise SystemExit(f"mpifc export: {err}")
    if comm.rank == 0:
        n = sum(int(np.prod(s)) for s in shapes.values())
        print(f"wrote {args.out} ({args.format}: {len(shapes)} tensors, {n} values)", flush=True)


def add_export(sub) -> None:
    """Register ``mpifc export`` on the CLI's subparsers."""
    p = sub.add_parser("export", help="write a checkpoint's model tensors as safetensors or npz")
    p.add_argument("checkpoint", help="checkpoint file, or a checkpoint or run directory "
                   "(its latest)")
    p.add_argument("--format", choices=FORMATS, default="safetensors")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--pubkey", metavar="PUB", help="refuse a checkpoint not signed by this "
                   "public key")
    p.set_defaults(func=_cmd_export)
