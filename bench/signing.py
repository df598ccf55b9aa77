"""The cost of signing and verifying a checkpoint, beside the save and load it rides on.

    [mpiexec -n N] python bench/signing.py [--repeats 5] [--preset cifar-cnn] [--dir DIR]

The cifar-cnn preset's model and SGD-momentum state (one step taken, so every slot
exists), saved as a directory checkpoint. Modes, interleaved repeat by repeat (a
shared machine: all see the same load):
  save          checkpoint.save, digest only
  save+sign     the same with sign_key: rank 0 signs the digest before publication
  load          checkpoint.load, root recomputes the digest
  load+verify   the same with verify_key: the signature is checked on the digest
  sign alone    signing.sign_open on a digest already computed (the Ed25519 part)
  verify alone  signing.check_open on a digest already computed
Figures are medians (seconds). Signing and verifying add one Ed25519 operation on a
32-byte digest: microseconds; the digest (SHA-256 over every byte) is what save and
load already pay. Target: save+sign / save and load+verify / load within 1.05x.
(A bench/crypto.py with encryption rows is another helper's; this file holds signing.)
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import h5py
import numpy as np

from mpifc.checkpoint import digest, load, save
from mpifc.comm import Grid, world
from mpifc.config import load_config
from mpifc.models import build_model
from mpifc.security import signing
from mpifc.security.keys import generate
from mpifc.train import build_optimizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="cifar-cnn")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    a = ap.parse_args()
    comm = world()
    root = comm.rank == 0
    d = comm.bcast_obj((a.dir or tempfile.mkdtemp(prefix="mpifc-bench-sign-")) if root else None)
    if root:
        priv, pub, fp = generate(os.path.join(d, f"keys-{os.getpid()}"))
    priv, pub = comm.bcast_obj((priv, pub) if root else None)
    cfg = load_config(a.preset)
    grid = Grid(comm, tp=1)
    model = build_model(cfg["model"], grid, seed=0, dtype=np.float32)
    opt = build_optimizer(cfg, model.parameters())
    for p in model.parameters():
        p.grad[...] = 0.001
    opt.step()                                     # momentum slots exist: a real checkpoint
    n_values = sum(p.data.size for p in model.parameters())

    t = {k: [] for k in ("save", "save+sign", "load", "load+verify", "sign alone",
                         "verify alone")}
    for r in range(a.repeats):
        for mode in ("save", "save+sign"):
            comm.barrier()
            t0 = time.perf_counter()
            path = save(os.path.join(d, mode.replace("+", "-")), model, opt, grid, step=r,
                        keep_last=1, sign_key=priv if mode == "save+sign" else None)
            t[mode].append(comm.allreduce(np.array([time.perf_counter() - t0]), op="max")[0])
        for mode, src in (("load", "save"), ("load+verify", "save-sign")):
            comm.barrier()
            t0 = time.perf_counter()
            load(os.path.join(d, src), model, opt, grid,
                 verify_key=pub if "verify" in mode else None)
            t[mode].append(comm.allreduce(np.array([time.perf_counter() - t0]), op="max")[0])
        if root:
            with h5py.File(path, "r") as f:
                total = digest.check(f, path)
                key, pubkey = signing.private_key(priv), signing.public_key(pub)
                t0 = time.perf_counter()
                signing.check_open(f, path, pubkey, total)
                t["verify alone"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            key.sign(signing.message(total, fp))
            t["sign alone"].append(time.perf_counter() - t0)
    if root:
        size = os.path.getsize(path)
        print(f"{a.preset}: {n_values:,} parameters, checkpoint {size / 2**20:.1f} MiB, "
              f"{comm.size} rank(s), {a.repeats} repeats (median seconds)")
        med = {k: statistics.median(v) for k, v in t.items() if v}
        for k, v in med.items():
            print(f"  {k:<13} {v:10.6f} s")
        print(f"  save+sign / save     {med['save+sign'] / med['save']:.3f}x  (target <= 1.05)")
        print(f"  load+verify / load   {med['load+verify'] / med['load']:.3f}x  (target <= 1.05)")


if __name__ == "__main__":
    sys.exit(main())
