"""Which device each rank computes on: ``train.device`` = "cpu" | "cuda" | "auto".

cpu   NumPy arrays (the default).
cuda  CuPy arrays on one GPU per rank. A rank takes the GPU of its rank among the
      ranks of its node (node-local rank, from ``comm.split_shared``) that see the
      same devices: local rank i uses visible device i -- ``CUDA_VISIBLE_DEVICES``
      decides which devices are visible and numbers them from 0; a launcher that
      binds one GPU per rank (``srun --gpu-bind``) gives every rank its own device 0
      -- unless ``MPIFC_DEVICE_ID`` (set per rank, e.g. from ``SLURM_LOCALID`` by a
      wrapper) names the index. More such ranks on a node than visible GPUs is an
      error unless ``train.share_gpu = true`` (then local rank i uses GPU i mod n).
      Without cupy or a visible GPU: one line naming ``pip install mpifc[gpu]``.
auto  cuda when every rank sees a GPU through cupy, else cpu (every rank the same).

Every decision is agreed over the job (one ``allgather_obj``), so a problem on one
rank is the same one-line error on all of them, and nothing waits. With cuda, the
model, its gradients, the optimizer state, the batches and the loss live on the
GPU for the whole step (the trainer builds them with :attr:`Device.xp`); the loader
copies each host batch array to the device once per step (:mod:`mpifc.data.loader`),
and communication goes straight to a CUDA-aware MPI or through pinned staging
buffers (:mod:`mpifc.comm.staging`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mpifc import backend
from mpifc.errors import UserError

DEVICES = ("cpu", "cuda", "auto")
GPU_EXTRA = "pip install mpifc[gpu]"


class DeviceError(UserError, RuntimeError, all_ranks=True):
    """The requested device cannot be used (raised on every rank, agreed)."""


@dataclass(frozen=True)
class Device:
    """Where this rank computes: ``kind`` "cpu" or "cuda", the GPU index, and ``xp``."""

    kind: str
    index: int | None = None
    local_rank: int = 0
    local_size: int = 1

    @property
    def xp(self):
        return np if self.kind == "cpu" else backend.backend_module("cupy")

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


CPU = Device("cpu")


def _pick_index(local_rank: int, local_size: int, n: int, share: bool) -> tuple[int | None, str]:
    """(GPU index for this rank, or None, and a problem line)."""
    env = os.environ.get("MPIFC_DEVICE_ID", "").strip()
    if env:
        try:
            i = int(env)
        except ValueError:
            return None, f"MPIFC_DEVICE_ID={env!r} is not an integer"
        if not 0 <= i < n:
            return None, (f"MPIFC_DEVICE_ID={i} but this rank sees {n} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        return i, ""
    if local_size > n and not share:
        return None, (f"{local_size} ranks on this node but {n} visible GPU(s): start at most "
                      f"{n} rank(s) per node, or set train.share_gpu = true to share them")
    return local_rank % n, ""


def select_device(requested: str, comm, *, share_gpu: bool = False) -> Device:
    """The :class:`Device` of this rank for ``train.device = requested`` (collective).

    Makes the chosen GPU current (``cupy.cuda.Device(i).use()``)."""
    if requested not in DEVICES:
        raise DeviceError(f"train.device = {requested!r}: expected one of {list(DEVICES)}")
    if requested == "cpu":
        return CPU
    n = backend.device_count()
    if requested == "auto":
        if not all(comm.allgather_obj(n > 0)):
            return CPU
    from mpifc.comm import trace

    with trace.disabled():
        node = comm.split_shared()
    # the ranks of this node that see the same devices share them, in local rank order
    # (all of them, usually; one each when the launcher binds a GPU per rank, e.g.
    # srun --gpu-bind: every rank then sees "its" GPU as device 0)
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    peers = [r for r, v in enumerate(node.allgather_obj(vis)) if v == vis]
    local_rank, local_size = peers.index(node.rank), len(peers)
    if n == 0:
        index, problem = None, (f"train.device = \"cuda\" but cupy "
                                + ("sees no CUDA device" if backend.cupy_importable()
                                   else "is not installed")
                                + f": {GPU_EXTRA} (README: GPUs), or set train.device = \"cpu\"")
    else:
        index, problem = _pick_index(local_rank, local_size, n, share_gpu)
    problems = comm.allgather_obj(problem)
    bad = [r for r, p in enumerate(problems) if p]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DeviceError(f"rank {bad[0]}{more}: {problems[bad[0]]}")
    backend.use_device(index)
    return Device("cuda", index, local_rank, local_size)
