"""2-rank data-parallel training step: mpifc DataParallel vs PyTorch DDP (gloo), same model.

    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/ddp_compare.py [--steps 5] [--repeats 6]

Both sides run in the same 2 processes (the MPI ranks; torch.distributed joins them
over gloo on localhost), one BLAS/torch thread per rank, the same model, per-rank
batch and SGD-momentum step: forward, softmax cross-entropy, backward with the
gradient allreduce (averaged over the 2 ranks), optimizer step. Models:
  MLP         784-1024-1024-10, batch 256 per rank
  classifier  conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, dense64, dense10 on 3x32x32,
              batch 64 per rank (BatchNorm local to each rank on both sides, as DDP)
Blocks of --steps steps alternate between the two sides --repeats times (the cores
are shared with whatever else runs: both sides see the same load). A step's time is
the slower rank's; the figure is the minimum over blocks of the block's median step.
ratio = mpifc / torch (targets, issue 14: MLP <= 0.8, classifier <= 0.9).
Needs torch (pip install 'mpifc[compare]').
"""
import argparse
import os
import socket
import sys
import time

import mpifc  # noqa: F401 - before NumPy: sets OPENBLAS_THREAD_TIMEOUT (mpifc.threads)
import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _scaling import soft_barrier  # noqa: E402
from _steps import mpifc_net, torch_net, torch_sgd_step  # noqa: E402
import mpifc.nn as nn  # noqa: E402
from mpifc.comm import trace, world  # noqa: E402
from mpifc.optim import SGD  # noqa: E402
from mpifc.parallel import DataParallel  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
ap.add_argument("--repeats", type=int, default=6, help="blocks per side")
args = ap.parse_args()
comm = world()
if comm.size != 2:
    raise SystemExit(f"bench/ddp_compare.py runs on exactly 2 ranks (got {comm.size})")
try:
    import torch
    import torch.distributed as dist
except ImportError:
    raise SystemExit("bench/ddp_compare.py needs torch: pip install 'mpifc[compare]'") from None
threadpool_limits(limits=1)
torch.set_num_threads(1)

port = None
if comm.rank == 0:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
port = comm.bcast_obj(port)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank,
                        world_size=comm.size)
rng = np.random.default_rng(comm.rank)


def mpifc_model(kind):
    return mpifc_net("mlp" if kind == "mlp" else "cnn", rng=np.random.default_rng(0))


def torch_model(kind):
    torch.manual_seed(0)
    return torch_net("mlp" if kind == "mlp" else "cnn")


def mpifc_step(kind, x, y):
    net = mpifc_model(kind)
    with trace.disabled():
        dp = DataParallel(net, comm)
    opt, loss = SGD(net.parameters(), lr=0.01, momentum=0.9), nn.SoftmaxCrossEntropy()

    def step():
        dp.zero_grad()
        loss.forward(net.forward(x), y)
        dp.backward(loss.backward())
        dp.synchronize()
        opt.step()
    return step


def torch_step(kind, x, y):
    return torch_sgd_step(torch.nn.parallel.DistributedDataParallel(torch_model(kind)), x, y)


def block(step, n):
    ts = []
    with trace.disabled():
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
    return ts


rows = []
for kind, shape, target in [("mlp", (256, 784), 0.8), ("classifier", (64, 3, 32, 32), 0.9)]:
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 10, shape[0])
    sides = [mpifc_step(kind, x, y), torch_step(kind, x, y)]
    for s in sides:                                     # warm-up
        block(s, 2)
    best = [np.inf, np.inf]
    for _ in range(args.repeats):
        for i, s in enumerate(sides):
            soft_barrier(comm)
            ts = np.asarray(block(s, args.steps))
            slow = np.max(comm.allgather_obj(ts.tolist()), axis=0)     # the slower rank, per step
            best[i] = min(best[i], float(np.median(slow)))
    rows.append((kind, shape, best[0], best[1], target))

if comm.rank == 0:
    print(f"bench/ddp_compare.py: 2 ranks x 1 thread, torch {torch.__version__} DDP (gloo, localhost), "
          f"min over {args.repeats} blocks of the median of {args.steps} steps (slower rank)")
    hdr = f"{'model':<40s} {'mpifc ms':>9s} {'torch ms':>9s} {'ratio':>6s} {'target':>7s}"
    print(hdr)
    print("-" * len(hdr))
    for kind, shape, tm, tt, target in rows:
        name = (f"MLP 784-1024-1024-10, b{shape[0]}/rank" if kind == "mlp"
                else f"classifier 3x32x32, b{shape[0]}/rank")
        print(f"{name:<40s} {tm * 1e3:9.2f} {tt * 1e3:9.2f} {tm / tt:6.2f} {f'<={target}':>7s}")
dist.destroy_process_group()
