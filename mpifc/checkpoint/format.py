"""The checkpoint file: names, constants, errors, attribute encoding, file naming.

A checkpoint is one HDF5 file holding FULL LOGICAL tensors (the global shape a
serial model would have), whatever the layout it was saved from::

    /                       attrs: format="mpifc-checkpoint", format_version=1,
                                   step, epoch, created (UTC ISO 8601), mpifc_version,
                                   layout (JSON {"world", "dp", "tp"}),
                                   model_signature (sha256 of names, global shapes, dtypes),
                                   data_position (JSON), extra (JSON),
                                   digest ("sha256:<hex>", see mpifc.checkpoint.digest)
    /params/<name>          one dataset per parameter, global shape, its dtype;
                            attrs: sharding_axis (int, -1 = replicated),
                                   sharding_group (str), sharding_counts (int64[P]),
                                   sha256 (hex of this dataset; for error messages)
    /buffers/<name>         non-trainable state (BatchNorm running stats), same attrs
    /optimizer              attrs: class, lr, step_count, hyper (JSON), slots (JSON list)
    /optimizer/<slot>/<name>   per-parameter state (Adam exp_avg ...), global shape,
                            sharded like its parameter (same attrs)
    /rng                    attrs: world_size, layout (JSON);
                            rank_00000, rank_00001, ...: JSON {name: bit_generator.state}
    /config                 scalar string dataset: the run's TOML text (absent if None)

``<name>`` is the qualified name from ``Module.named_parameters()`` / ``buffers()``.
Files in a checkpoint directory are named ``ckpt-<step:06d>.h5`` (steps beyond
999999 just get more digits); a save in progress is ``.ckpt-<step>.h5.tmp-<pid>@<host>``.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from mpifc.errors import UserError

FORMAT_NAME = "mpifc-checkpoint"
FORMAT_VERSION = 1
SUFFIXES = (".h5", ".hdf5")
_CKPT_RE = re.compile(r"^ckpt-(?P<step>[0-9]{6,})\.h5$")
_TMP_RE = re.compile(r"^\.ckpt-[0-9]{6,}\.h5\.tmp-(?P<pid>[0-9]+)(@(?P<host>[^/]+))?$")

#: group of each kind of tensor in the file
PARAMS, BUFFERS, OPTIMIZER = "params", "buffers", "optimizer"


class CheckpointError(UserError, RuntimeError, all_ranks=True):
    """A checkpoint cannot be written, found, verified or loaded into this model.

    Raised with the same message on every rank of the job.
    """


# ---------------------------------------------------------------- file naming

def checkpoint_name(step: int) -> str:
    """``ckpt-000123.h5`` for step 123."""
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"ckpt-{int(step):06d}.h5"


def is_file_path(path) -> bool:
    """True when ``path`` names a checkpoint file (ends in .h5/.hdf5), not a directory."""
    return os.fspath(path).endswith(SUFFIXES)


def list_checkpoints(directory) -> list[tuple[int, str]]:
    """(step, path) of the finished checkpoints in ``directory``, oldest step first.

    Temporary files of saves in progress (or killed) are not listed.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        m = _CKPT_RE.match(name)
        if m:
            out.append((int(m["step"]), os.path.join(directory, name)))
    return sorted(out)


def stale_temporaries(directory) -> list[str]:
    """Temporary files left by saves that were killed before their rename."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if _TMP_RE.match(n))


def temporary_owner(path) -> tuple[int | None, str | None]:
    """(pid, host or None for the older ``.tmp-<pid>`` names) of a save's temporary file."""
    m = _TMP_RE.match(os.path.basename(os.fspath(path)))
    return (int(m["pid"]), m["host"]) if m else (None, None)


def latest_checkpoint(directory) -> str | None:
    """Path of the checkpoint with the highest step in ``directory`` (None if none)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def resolve(path) -> str:
    """The checkpoint file ``path`` refers to: itself, or the latest one in a directory.

    Raises CheckpointError when there is no such file or no checkpoint in the directory.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: directory holds no checkpoint (ckpt-NNNNNN.h5)")
        return latest
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


# ---------------------------------------------------------------- attribute values

def _to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        # bit generator keys (MT19937) are arrays: keep dtype so they round-trip exactly
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_jsonable(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__", "dtype"}:
            try:                         # security: no crafted S1000000000 / object arrays
                dt = np.dtype(obj["dtype"])
            except TypeError:
                dt = np.dtype("O")
            if dt.kind not in "biuf" or dt.itemsize > 16:
                raise ValueError(f"array attribute of dtype {obj['dtype']!r} refused "
                                 "(numbers only)")
            return np.asarray(obj["__ndarray__"], dtype=dt)
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def dumps(obj) -> str:
    """JSON text for an attribute (NumPy arrays and scalars allowed, keys sorted)."""
    return json.dumps(_to_jsonable(obj), sort_keys=True)


def loads(text):
    """Inverse of :func:`dumps`."""
    if isinstance(text, bytes):
        text = text.decode()
    return _from_jsonable(json.loads(text))


def as_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def layout_attr(a, path: str) -> dict:
    """The ``layout`` attribute as {"world", "dp", "tp"} of ints, or CheckpointError."""
    try:
        lay = loads(a["layout"])
        if not isinstance(lay, dict) or not all(isinstance(lay.get(k), int) and lay[k] >= 1
                                                for k in ("world", "dp", "tp")):
            raise ValueError("expected world, dp and tp as positive integers, got "
                             + repr(lay)[:120])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: attribute 'layout' is missing or malformed ({exc}); the "
                              "file is damaged or was not written by mpifc") from None
    return lay


# ---------------------------------------------------------------- RNG states

def rng_state(gen) -> dict:
    """The state of a numpy Generator or BitGenerator (a state dict passes through)."""
    if isinstance(gen, np.random.Generator):
        return gen.bit_generator.state
    if isinstance(gen, np.random.BitGenerator):
        return gen.state
    if isinstance(gen, dict):
        return gen
    raise TypeError(f"rng state: expected numpy Generator, BitGenerator or state dict, got "
                    f"{type(gen).__name__}")


def set_rng_state(gen, state: dict) -> None:
    """Restore ``state`` (from :func:`rng_state` or ``load()['rng_states']``) into ``gen``."""
    bg = gen.bit_generator if isinstance(gen, np.random.Generator) else gen
    bg.state = state
