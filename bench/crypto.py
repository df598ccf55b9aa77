"""The cost of encryption at rest, side by side: loader rows/s and checkpoint seconds.

    python bench/crypto.py [--quick] [--repeats 5] [--chunk-kib 1024]
    mpiexec -n 2 python bench/crypto.py        # the loader on 2 dp ranks (slice mode)

Data: the cifar-cnn synthetic set (4096 train rows of 3x32x32 uint8, as
``data.dataset = "synthetic-images"`` prepares it), written twice -- clear and AES-256-GCM
encrypted -- with chunks of about ``--chunk-kib`` of whole rows (1 MiB: the clear files'
chunking). Clear and encrypted runs alternate, repeat by repeat (shared cores: both see
the same load); figures are medians.

  loader, per batch   one shuffled epoch, batch 64, slice mode, no row cache: every
                      batch reads its rows from the file (the encrypted reader decrypts
                      each chunk that holds one of them)
  loader, cached      the trainer's setting (cache=True): opening the split, reading
                      (decrypting) it once, and one epoch from memory
  checkpoint          save / load of the cifar-cnn model + SGD momentum (gather mode),
                      and of one 64 MiB float32 tensor (throughput): clear, signed
                      (Ed25519 on save, verified on load) and encrypted, interleaved

Target (issue 17): encrypted loading within 1.3x of clear (rows/s ratio clear/encrypted).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from mpifc.comm import Grid, world
from mpifc.config import load_config
from mpifc.data import DistributedLoader, prepare
from mpifc.models import build_model
from mpifc.optim import SGD
from mpifc.security.crypt import read_key_file
from mpifc.security.keys import generate
from mpifc.security.keys_data import generate_data_key

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--quick", action="store_true", help="2 repeats")
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--chunk-kib", type=int, default=1024, help="target chunk size of both files")
p.add_argument("--batch", type=int, default=64)
args = p.parse_args()
if args.quick:
    args.repeats = 2
comm = world()
root = comm.rank == 0
tmp = comm.bcast_obj(tempfile.mkdtemp(prefix="mpifc-crypto-") if root else None)
files = {"clear": f"{tmp}/clear.h5", "encrypted": f"{tmp}/enc.h5"}
if root:
    from mpifc.data import read_split, write_dataset

    generate_data_key(f"{tmp}/k")
    src = prepare.prepare_synthetic(f"{tmp}/src.h5", n_train=4096, n_test=1024, shape=(3, 32, 32),
                                    num_classes=10, seed=0)
    train, test = read_split(src, "train"), read_split(src, "test")
    for name, path in files.items():
        write_dataset(path, train, test, class_names=[f"class{k}" for k in range(10)],
                      source="cifar-cnn synthetic set", chunk_bytes=args.chunk_kib << 10,
                      encrypt_key=read_key_file(f"{tmp}/k") if name == "encrypted" else None)
comm.barrier()
key = read_key_file(f"{tmp}/k")
keys = {"clear": None, "encrypted": key}


def median(v):
    return float(np.median(v))


def loader_epoch(name, cache):
    """Seconds for (open +) one epoch on every rank (the slowest rank's)."""
    comm.barrier()
    t0 = time.perf_counter()
    ld = DistributedLoader(files[name], comm, batch_size=args.batch, seed=1, cache=cache,
                           key=keys[name])
    rows = sum(int(b.y.shape[0]) for b in ld)
    ld.close()
    dt = time.perf_counter() - t0
    return comm.allreduce(np.array([dt]), op="max")[0], comm.allreduce(np.array([float(rows)]))[0]


results = {}
for _ in range(args.repeats):
    for cache in (False, True):
        for name in files:
            dt, rows = loader_epoch(name, cache)
            results.setdefault(("loader", cache, name), []).append(rows / dt)

# checkpoints: the cifar-cnn model under this job's layout (pure dp), and one big tensor
cfg = load_config("cifar-cnn")
grid = Grid(comm, dp=comm.size, tp=1)
model = build_model(cfg["model"], grid, seed=0)
opt = SGD(model.named_parameters(), lr=0.01, momentum=0.9)
for prm in model.parameters():
    prm.grad[...] = 0.01
opt.step()                                      # momentum buffers exist: saved too


class Big:
    """One 64 MiB float32 tensor as a tiny 'model' (replicated)."""

    def __init__(self):
        from mpifc.nn.module import Module, Parameter

        m = Module()
        m.w = Parameter(np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32),
                        "w")
        m._params.append(m.w)
        self.model = m


big = Big().model
from mpifc.checkpoint import load, save  # noqa: E402

priv, pub = comm.bcast_obj(generate(f"{tmp}/sign")[:2] if root else None)   # Ed25519 pair
kinds = ("clear", "signed", "encrypted")
for _ in range(args.repeats):
    for what, (m, o) in (("cifar-cnn", (model, opt)), ("64 MiB tensor", (big, None))):
        for name in kinds:
            path = f"{tmp}/ck-{name}.h5"
            signed = name == "signed"
            comm.barrier()
            t0 = time.perf_counter()
            save(path, m, o, grid, step=1, key=keys.get(name), sign_key=priv if signed else None)
            t1 = time.perf_counter()
            load(path, m, o, grid, key=keys.get(name), verify_key=pub if signed else None)
            t2 = time.perf_counter()
            results.setdefault(("save", what, name), []).append(t1 - t0)
            results.setdefault(("load", what, name), []).append(t2 - t1)

if root:
    mib = os.path.getsize(files["clear"]) / 2**20
    print(f"bench/crypto.py: {comm.size} rank(s), cifar-cnn synthetic set {mib:.1f} MiB, chunks "
          f"~{args.chunk_kib} KiB, batch {args.batch}, {args.repeats} repeats (medians)")
    print(f"{'':<34}{'clear':>12}{'encrypted':>12}{'ratio':>8}")
    for cache, label in ((False, "loader, per batch (rows/s)"), (True, "loader, cached (rows/s)")):
        c = median(results["loader", cache, "clear"])
        e = median(results["loader", cache, "encrypted"])
        print(f"{label:<34}{c:>12.0f}{e:>12.0f}{c / e:>7.2f}x")
    print(f"{'':<34}{'clear':>12}{'signed':>12}{'ratio':>8}{'encrypted':>12}{'ratio':>8}")
    for op in ("save", "load"):
        for what in ("cifar-cnn", "64 MiB tensor"):
            c, g, e = (median(results[op, what, k]) for k in kinds)
            print(f"{f'checkpoint {op}, {what} (s)':<34}{c:>12.4f}{g:>12.4f}{g / c:>7.2f}x"
                  f"{e:>12.4f}{e / c:>7.2f}x")
    ratio = median(results["loader", False, "clear"]) / median(results["loader", False, "encrypted"])
    cached = median(results["loader", True, "clear"]) / median(results["loader", True, "encrypted"])
    print(f"target: encrypted loading within 1.3x of clear: per batch {ratio:.2f}x "
          f"({'met' if ratio <= 1.3 else 'MISSED'}), cached {cached:.2f}x "
          f"({'met' if cached <= 1.3 else 'MISSED'})")
    shutil.rmtree(tmp, ignore_errors=True)
sys.exit(0)
