"""Models built from a config on every dp x tp layout of the job against the 1-rank run.

Every rank also builds the same model on a 1x1 grid of its own (serial layers, no
messages) and trains it on the whole global batch: the reference. The layout under
test trains the same 5 SGD(momentum) steps on the same global batch, each dp rank
on its balanced block of rows (uneven: 10 rows over 3 or 4 ranks), with gradient
clipping active; every parameter shard and BatchNorm buffer must end equal to its
block of the reference. Two models: an MLP whose logits are class-split over tp
(column -> BN1d on split features -> row -> column) and the digits classifier
(conv-out -> BN -> pool -> conv-in -> BN -> pool -> flatten -> column -> row). Its
convolutions have no bias: BatchNorm removes it, so its gradient is rounding noise
and its values could not be compared on their own scale (the same for
the MLP's first linear layer, followed by BatchNorm).

The trace of one training step must hold exactly the predicted collectives: the
layers' ``collectives()``, the loss's, the data-parallel buckets' and clipping's.
"""
import numpy as np
import pytest

from mpifc.comm import Grid, balanced_counts, trace, world
from mpifc.config import ConfigError
from mpifc.models import build_model
from mpifc.optim import SGD, clip_grad_norm
from mpifc.parallel import DataParallel, clip_grad_norm_grid, match_trace
from mpifc.parallel.data import clip_collectives

MLP = {"input": [12], "layers": [
    {"type": "linear", "out": 20, "shard": "column", "bias": False},
    {"type": "batchnorm1d"},
    {"type": "relu"},
    {"type": "linear", "out": 14, "shard": "row"},
    {"type": "relu"},
    {"type": "linear", "out": 10, "shard": "column"},
]}
CNN = {"input": [1, 8, 8], "layers": [
    {"type": "conv2d", "out": 6, "kernel": 3, "padding": 1, "shard": "out", "bias": False},
    {"type": "batchnorm2d"},
    {"type": "relu"},
    {"type": "maxpool2d", "kernel": 2},
    {"type": "conv2d", "out": 8, "kernel": 3, "padding": 1, "shard": "in", "bias": False},
    {"type": "batchnorm2d"},
    {"type": "relu"},
    {"type": "maxpool2d", "kernel": 2},
    {"type": "flatten"},
    {"type": "linear", "out": 16, "shard": "column"},
    {"type": "relu"},
    {"type": "linear", "out": 10, "shard": "row"},
]}
MODELS = {"mlp": MLP, "cnn": CNN}
TOL_TRAIN = {np.float64: 1e-10, np.float32: 1e-5}
B, STEPS, LR, CLIP = 10, 5, 0.05, 1.0

_GRIDS = {}


def grid_of(comm, dp, tp):
    """Grids are cached: each one splits two communicators, which MPI never gets back here."""
    key = (dp, tp)
    if key not in _GRIDS:
        _GRIDS[key] = Grid(comm, dp, tp)
    return _GRIDS[key]


def self_grid(comm):
    if "self" not in _GRIDS:
        _GRIDS["self"] = Grid(comm.split(comm.rank, name="self"), 1, 1)
    return _GRIDS["self"]


def layouts(size):
    return [(size // tp, tp) for tp in range(1, size + 1) if size % tp == 0]


def batch(model_cfg, step, dtype):
    rng = np.random.default_rng(100 + step)
    x = rng.standard_normal((B, *model_cfg["input"])).astype(dtype)
    y = rng.integers(0, 10, B)
    return x, y


def rows(grid, x, y):
    counts, displs = balanced_counts(B, grid.dp)
    sl = slice(displs[grid.dp_rank], displs[grid.dp_rank] + counts[grid.dp_rank])
    return np.ascontiguousarray(x[sl]), y[sl]


def train_step(net, dp, opt, grid, x, y, clip=CLIP, accuracy=False):
    """The trainer's step: local loss scaled by dp * b / B, so dp's mean is the global mean."""
    dp.zero_grad()
    logits = net.forward(x)
    loss = net.loss.forward(logits, y)
    if accuracy:
        net.loss.correct()
    dp.backward(net.loss.backward(grid.dp * len(y) / B))
    dp.synchronize()
    norm = clip_grad_norm_grid(net.parameters(), clip, grid) if clip else None
    opt.step()
    return loss, norm


def local_block(global_arr, sharding):
    if sharding is None or sharding.axis is None:
        return global_arr
    return global_arr[sharding.local_slice()]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_training_matches_one_rank(comm, model, dtype):
    cfg = MODELS[model]
    # the reference: the whole global batch on this rank alone
    sg = self_grid(comm)
    ref = build_model(cfg, sg, seed=7, dtype=dtype)
    ref_dp = DataParallel(ref, sg.dp_comm)
    ref_opt = SGD(ref.named_parameters(), lr=LR, momentum=0.9)
    ref_norms = []
    for s in range(STEPS):
        x, y = batch(cfg, s, dtype)
        ref_dp.zero_grad()
        ref.loss.forward(ref.forward(x), y)
        ref.backward(ref.loss.backward(1.0))
        ref_norms.append(clip_grad_norm(ref.parameters(), CLIP))
        ref_opt.step()
    want = dict(ref.named_parameters())
    want_buf = dict(ref.buffers())
    assert max(ref_norms) > CLIP, "clipping should be active in this test"

    bad = []
    for dp_, tp_ in layouts(comm.size):
        grid = grid_of(comm, dp_, tp_)
        net = build_model(cfg, grid, seed=7, dtype=dtype)
        dp = DataParallel(net, grid.dp_comm, bucket_mb=0.001)     # ~1 KiB: several buckets
        opt = SGD(net.named_parameters(), lr=LR, momentum=0.9)
        for s in range(STEPS):
            x, y = rows(grid, *batch(cfg, s, dtype))
            _, norm = train_step(net, dp, opt, grid, x, y)
            if abs(norm - ref_norms[s]) > TOL_TRAIN[dtype] * 10 * ref_norms[s]:
                bad.append(f"dp={dp_} tp={tp_} step {s}: norm {norm} != {ref_norms[s]}")
        assert [n for n, _ in net.named_parameters()] == list(want)
        for name, p in net.named_parameters():
            e = _rel(p.data, local_block(want[name].data, p.sharding))
            print(f"{'OK ' if e <= TOL_TRAIN[dtype] else 'BAD'} dp={dp_} tp={tp_} {name}: maxdiff = {e:.3e}")
            if e > TOL_TRAIN[dtype]:
                bad.append(f"dp={dp_} tp={tp_} {name}: rel err {e:.3e}")
        shardings = _buffer_shardings(net)
        for name, arr in net.buffers():
            w = local_block(want_buf[name], shardings.get(name))
            if _rel(arr, w) > TOL_TRAIN[dtype]:
                bad.append(f"dp={dp_} tp={tp_} buffer {name}: rel err {_rel(arr, w):.3e}")
    assert not bad, bad


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if b.size else 0.0


def _buffer_shardings(net):
    out = {}
    for cname, layer in zip(net.names, net.layers):
        for attr, sh in (getattr(layer, "buffer_shardings", None) or {}).items():
            out[f"{cname}.{attr}"] = sh
    return out


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_step_trace_is_exactly_predicted(comm, model, overlap):
    """A silent extra or missing message in any layer, the loss, a bucket or clipping fails."""
    cfg = MODELS[model]
    for dp_, tp_ in layouts(comm.size):
        grid = grid_of(comm, dp_, tp_)
        net = build_model(cfg, grid, seed=3, dtype=np.float32)
        dp = DataParallel(net, grid.dp_comm, bucket_mb=0.0002, overlap=overlap)   # ~200 B
        opt = SGD(net.parameters(), lr=LR, momentum=0.9)
        x, y = rows(grid, *batch(cfg, 0, np.float32))
        trace.reset()
        train_step(net, dp, opt, grid, x, y, accuracy=True)
        events = trace.events()
        expected = (net.collectives(len(y), accuracy=True) + dp.collectives()
                    + clip_collectives(grid))
        missing, extra = match_trace(expected, events)
        per_phase = {}
        for e in events:
            per_phase[(e["phase"], e["op"], e["comm"])] = per_phase.get((e["phase"], e["op"], e["comm"]), 0) + 1
        print(f"dp={dp_} tp={tp_}: {len(events)} messages {sorted(per_phase.items())}")
        assert not missing and not extra, (dp_, tp_, missing, extra)
        # the expectation is not empty where there is something to say
        groups = {e["comm"] for e in events}
        assert ("dp" in groups) == (dp_ > 1) and ("tp" in groups) == (tp_ > 1), groups
        if dp_ > 1:
            assert len(dp.collectives()) == len(dp.buckets) > 1
            assert all(e["op"] == ("iallreduce" if overlap else "allreduce")
                       for e in events if e["comm"] == "dp" and e["phase"].startswith("dp.grad"))


@pytest.mark.mpi(min_size=1)
def test_gather_only_where_needed(comm):
    """Producers keep their output split before a consumer of split input and at the end."""
    tp = comm.size
    grid = grid_of(comm, 1, tp)
    cfg = {"input": [6], "layers": [
        {"type": "linear", "out": 8, "shard": "column"},     # -> row: stays split
        {"type": "relu"},
        {"type": "linear", "out": 8, "shard": "row"},
        {"type": "linear", "out": 9, "shard": "column"},     # -> unsharded linear: gathers
        {"type": "tanh"},
        {"type": "linear", "out": 5},
        {"type": "linear", "out": 4, "shard": "column"},     # last: class-split logits
    ]}
    net = build_model(cfg, grid, seed=0, dtype=np.float64)
    if tp > 1:
        assert [getattr(l, "gather_output", None) for l in net.layers] == \
            [False, None, None, True, None, None, False]
        assert net.logits_sharded and type(net.loss).__name__ == "ClassParallelLoss"
    else:
        assert not net.logits_sharded and type(net.loss).__name__ == "LocalLoss"
    assert net.names == ["fc1", "relu1", "fc2", "fc3", "tanh1", "fc4", "fc5"]
    x = np.random.default_rng(0).standard_normal((3, 6))
    logits = net.forward(x)
    assert logits.shape == (3, net.shapes(3)[-1][1])
    assert net.num_classes == 4


def test_config_errors():
    grid = Grid(world(), 1, 1) if world().size == 1 else None
    if grid is None:
        pytest.skip("serial test")
    bad = [
        ({"input": [4], "layers": [{"type": "dense", "out": 3}]}, "unknown type"),
        ({"input": [4], "layers": [{"type": "linear", "out": 3, "shard": "out"}]}, "shard"),
        ({"input": [4], "layers": [{"type": "linear", "out": 3, "size": 2}]}, "unknown keys"),
        ({"input": [1, 4, 4], "layers": [{"type": "linear", "out": 3}]}, "flatten"),
        ({"input": [4], "layers": [{"type": "relu"}]}, "last layer with parameters"),
        ({"input": [1, 4, 4], "layers": [{"type": "conv2d", "out": 3}]}, "kernel"),
        ({"input": [1, 2, 2], "layers": [{"type": "conv2d", "out": 3, "kernel": 5},
                                         {"type": "flatten"}, {"type": "linear", "out": 2}]}, "empty"),
        ({"input": [], "layers": [{"type": "linear", "out": 3}]}, "input"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            build_model(cfg, grid, seed=0)


def test_presets_build_and_name_parameters():
    if world().size != 1:
        pytest.skip("serial test")
    from mpifc.config import load_config

    grid = Grid(world(), 1, 1)
    for preset, classes in [("digits-mlp", 10), ("digits-cnn", 10), ("cifar-cnn", 10)]:
        net = build_model(load_config(preset)["model"], grid, seed=0)
        assert net.num_classes == classes
        names = [n for n, _ in net.named_parameters()]
        assert len(names) == len(set(names)) and all("." in n for n in names)
        x = np.zeros((2, *net.input_shape), np.float32)
        assert net.forward(x).shape == (2, classes)
    with pytest.raises(ValueError, match="model expects input"):
        net.forward(np.zeros((2, 1, 8, 8), np.float32))


@pytest.mark.mpi(min_size=2)
def test_cnn_with_empty_data_rank_matches_one_rank(comm):
    """A global batch of 1 over dp = P: every rank but one has 0 rows (BN, flatten, loss)."""
    cfg = MODELS["cnn"]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, *cfg["input"]))
    y = np.array([3])
    sg = self_grid(comm)
    ref = build_model(cfg, sg, seed=7, dtype=np.float64)
    ref_dp = DataParallel(ref, sg.dp_comm)
    ref_dp.zero_grad()
    ref.loss.forward(ref.forward(x), y)
    ref_dp.backward(ref.loss.backward(1.0))
    ref_dp.synchronize()
    grid = grid_of(comm, comm.size, 1)
    net = build_model(cfg, grid, seed=7, dtype=np.float64)
    dp = DataParallel(net, grid.dp_comm)
    mine = slice(0, 1) if grid.dp_rank == 0 else slice(0, 0)
    dp.zero_grad()
    net.loss.forward(net.forward(np.ascontiguousarray(x[mine])), y[mine])
    dp.backward(net.loss.backward(grid.dp * len(y[mine]) / 1))
    dp.synchronize()
    want = dict(ref.named_parameters())
    bad = [n for n, p in net.named_parameters()
           if not np.allclose(p.grad, want[n].grad, rtol=1e-10, atol=1e-12)]
    assert not bad, bad
