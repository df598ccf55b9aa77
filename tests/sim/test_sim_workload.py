"""Analytic workload: its messages are exactly a real training step's trace.

The oracle (MPI, 1-4 ranks): for every dp x tp layout of the job, build the model of
a config with mpifc.models.build_model + DataParallel, run one training step as the
trainer does (mpifc.train.Trainer.train_step and its finite-loss check), and compare every rank's trace with describe_step() for that rank
(op, communicator, count, bytes, phase; the blocking messages also in order).
Serial tests: FLOPs equal the built layers' own description, infeasible layouts,
memory shrinks with tp, buckets, and 16384 ranks in well under a second.

    timeout 300 mpiexec -n 4 python -m mpi4py -m pytest --with-mpi --only-mpi tests/sim
"""
import copy

import pytest

from mpifc.comm import Grid, world
from mpifc.config import load_config
from mpifc.parallel import describe as D
from mpifc.sim.cluster import preset
from mpifc.sim.engine import simulate
from mpifc.sim.planner import LayoutInfeasible, plan, workload_cost
from mpifc.sim.workload import WorkloadError, describe_step, workload_builder
from step_oracle import step_messages

# a config exercising what the presets do not: BN1d on split features, dropout,
# gelu, a whole-input row layer (allgather in backward), clipping, adam
MIXED = {
    "input": [1, 6, 6],
    "layers": [
        {"type": "conv2d", "out": 5, "kernel": 3, "padding": 1, "shard": "out"},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "conv2d", "out": 4, "kernel": 3, "shard": "none"},
        {"type": "flatten"},
        {"type": "linear", "out": 11, "shard": "row"},
        {"type": "gelu"},
        {"type": "linear", "out": 9, "shard": "column"},
        {"type": "batchnorm1d"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out": 7, "shard": "column"},
    ],
}


def configs():
    out = {name: load_config(name) for name in ("digits-mlp", "digits-cnn")}
    mixed = load_config("digits-mlp", ["optim.clip_norm=1.0"])
    mixed["model"] = copy.deepcopy(MIXED)
    mixed["name"] = "mixed"
    out["mixed"] = mixed
    return out


# --------------------------------------------------------------------------- oracle (MPI)

@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "mixed"])
def test_analytic_messages_equal_a_real_step(comm, name, overlap):
    cfg = configs()[name]
    B, bucket_mb = 10, 0.004          # uneven rows over 3, 4 ranks; several buckets
    failures = []
    for dp, tp, got_keys, want_keys, want in step_messages(comm, cfg, B, bucket_mb, overlap):
        ok = got_keys == want_keys
        print(f"{'OK ' if ok else 'BAD'} {name} dp={dp} tp={tp} rank {comm.rank}: "
              f"{len(got_keys)} messages")
        if not ok:
            failures.append((dp, tp, [k for k in want_keys if k not in got_keys],
                             [k for k in got_keys if k not in want_keys], got_keys, want_keys))
        # the engine phases carry the same messages (bytes in the cost model's convention)
        comm_ph = [p for p in want.workload.phases if p.kind == "comm"]
        assert len(comm_ph) == len(want.collectives)
    assert not failures, failures[0]


# --------------------------------------------------------------------------- serial
@pytest.mark.skipif(world().size != 1, reason="serial")
@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "cifar-cnn"])
def test_flops_equal_the_built_layers(name):
    """Forward FLOPs of every GEMM / conv phase equal the built layer's own flops()."""
    from mpifc.models import build_model

    cfg = load_config(name)
    comm = world()
    net = build_model(cfg["model"], Grid(comm, 1, 1), seed=0)
    rows = 8
    d = describe_step(cfg, 1, 1, global_batch=rows)
    assert d.names == net.names
    shapes = net.shapes(rows)
    by_label = {p.label: p for p in d.workload.phases}
    for layer, nm, shape in zip(net.layers, net.names, shapes):
        if nm.startswith(("fc", "conv")):
            f, _ = D.flops(layer, shape)
            assert by_label[f"{nm}.forward"].flops == f, nm
    assert d.params == sum(p.size for p in net.parameters())
    # 1 rank: no layer message, only the trainer's finite-loss check on the world
    assert [c.phase for c in d.collectives] == ["check.finite"]


def test_shapes_layout_and_batch():
    cfg = load_config("digits-mlp")
    d1 = describe_step(cfg, 1, 1)
    d4 = describe_step(cfg, 1, 4)
    assert d4.params < d1.params / 2                     # the hidden layers are split
    assert d4.workload.memory_bytes_per_rank < d1.workload.memory_bytes_per_rank
    with pytest.raises(LayoutInfeasible):
        describe_step(cfg, 128, 1)                       # 64 samples over 128 replicas
    weak = describe_step(cfg, 128, 1, local_batch=64)
    assert weak.workload.samples_per_step == 128 * 64
    bad = copy.deepcopy(cfg)
    bad["model"]["layers"].insert(0, {"type": "linear", "out": 4})   # before flatten
    with pytest.raises(WorkloadError, match="flatten"):
        describe_step(bad, 1, 2)


def test_buckets_follow_the_cap_and_overlap():
    cfg = load_config("digits-mlp")
    # params in reverse: fc3 (10x256 + 10), fc2 (256x256 + 256), fc1 (256x64 + 256)
    d = describe_step(cfg, 2, 1, bucket_mb=0.1)          # 104857 B: fc3+fc2 bias / fc2 W ...
    buckets = [c for c in d.collectives if c.group == "dp"]
    assert sum(c.count for c in buckets) == d.params
    assert all(c.bytes <= 0.1 * 2 ** 20 or c.count in (256 * 256, 256 * 64) for c in buckets)
    ph = [p for p in d.workload.phases if p.group == "dp" and p.kind == "comm"]
    assert all(p.overlappable for p in ph)
    r = simulate(d.workload, preset("eth25"))
    assert r.overlapped_comm_s > 0                       # buckets hide behind backward
    blocking = describe_step(cfg, 2, 1, bucket_mb=0.1, overlap=False)
    rb = simulate(blocking.workload, preset("eth25"))
    assert rb.step_s > r.step_s
    assert all(c.group != "dp" for c in describe_step(cfg, 1, 2).collectives)   # dp = 1: no bucket


def test_blocking_mode_describes_one_bucket_as_dataparallel_builds():
    # DataParallel cuts the gradients in MIN_BUCKETS buckets only with overlap
    cfg = load_config("cifar-cnn")
    dp_buckets = lambda d: [c for c in d.collectives if c.phase.startswith("dp.grad_bucket")]  # noqa: E731
    assert len(dp_buckets(describe_step(cfg, 2, 1))) > 1
    assert len(dp_buckets(describe_step(cfg, 2, 1, overlap=False))) == 1
    assert len(dp_buckets(describe_step(cfg, 2, 1, overlap=False, min_buckets=4))) > 1


def test_16384_ranks_fast_and_plannable():
    cfg = load_config("digits-cnn")
    cl = preset("ib-hdr100")
    # how fast is a bench line (bench/sim_speed.py); here: it answers, and ranks 15 layouts
    r = simulate(describe_step(cfg, 4096, 4, local_batch=64).workload, cl)
    assert r.step_s > 0 and r.ranks == 16384
    ranked = plan(16384, workload_cost(workload_builder(cfg, local_batch=64), cl))
    assert len(ranked) == 15 and ranked[0].step_s <= ranked[-1].step_s
