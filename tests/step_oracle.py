"""The trainer's step, traced, against the messages the simulator predicts for it.

Used by the workload tests (tests/sim/test_sim_workload.py, tests/parallel/
test_resnet_sim.py): a real step on every dp x tp layout of the job, its trace's
message keys beside :func:`mpifc.sim.workload.describe_step`'s.
"""
import numpy as np

from mpifc.comm import Grid, balanced_counts, trace
from mpifc.parallel.describe import event_key
from mpifc.sim.workload import describe_step

_GRIDS = {}


def grid_for(comm, dp, tp):
    """One Grid per layout for the whole test session (a split is collective)."""
    if (dp, tp) not in _GRIDS:
        _GRIDS[(dp, tp)] = Grid(comm, dp, tp)
    return _GRIDS[(dp, tp)]


def one_step(cfg, grid, B, bucket_mb, overlap):
    """The trainer's step on one global batch of B rows; returns this rank's events."""
    from mpifc.models import build_model
    from mpifc.optim import SGD, Adam
    from mpifc.parallel import DataParallel, clip_grad_norm_grid
    from mpifc.train import _agree_finite

    net = build_model(cfg["model"], grid, seed=0, dtype=np.float32)
    dp = DataParallel(net, grid.dp_comm, bucket_mb=bucket_mb, overlap=overlap)
    o = cfg["optim"]
    opt = (SGD(net.parameters(), lr=o["lr"], momentum=o["momentum"])
           if o["name"] == "sgd" else Adam(net.parameters(), lr=o["lr"]))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, *cfg["model"]["input"])).astype(np.float32)
    y = rng.integers(0, net.num_classes, B)
    counts, displs = balanced_counts(B, grid.dp)
    sl = slice(displs[grid.dp_rank], displs[grid.dp_rank] + counts[grid.dp_rank])
    x, y = np.ascontiguousarray(x[sl]), y[sl]
    trace.reset()
    dp.zero_grad()
    logits = net.forward(x)
    loss = net.loss.forward(logits, y)
    net.loss.correct()
    dp.backward(net.loss.backward(grid.dp * len(y) / B))
    dp.synchronize()
    if o["clip_norm"]:
        clip_grad_norm_grid(net.parameters(), o["clip_norm"], grid)
    opt.step()
    _agree_finite(grid.world, loss)          # the trainer's per-step check
    return trace.events()


def step_messages(comm, cfg, B, bucket_mb, overlap):
    """For each dp x tp layout of ``comm``: (dp, tp, got keys, predicted keys, prediction)."""
    for tp in range(1, comm.size + 1):
        if comm.size % tp:
            continue
        dp = comm.size // tp
        grid = grid_for(comm, dp, tp)
        events = [e for e in one_step(cfg, grid, B, bucket_mb, overlap)
                  if not e["phase"].startswith("dp.init")]
        want = describe_step(cfg, dp, tp, global_batch=B, dp_rank=grid.dp_rank,
                             tp_rank=grid.tp_rank, bucket_mb=bucket_mb, overlap=overlap)
        yield dp, tp, [event_key(e) for e in events], [c.key() for c in want.collectives], want
