"""The simulator's analytic step of residual models equals a real step's trace.

For every dp x tp layout of the job: build the model (resnet-small, and a small
residual MLP/CNN mix with a linear layer inside a block, an inner block, a
layernorm and an identity shortcut), run the trainer's step, and compare every
rank's trace, in order, with mpifc.sim.workload.describe_step for that rank: the
sharded convs inside the blocks (named res2.body.conv1 ...), SyncBatchNorm inside
both branches, and the data-parallel buckets started in DataParallel's order
(a block's conv/BN gradients are final when the whole block is done).
"""
import copy

import pytest

from mpifc.comm import Grid, world
from mpifc.config import load_config
from mpifc.parallel import describe as D
from mpifc.sim.workload import WorkloadError, describe_step
from step_oracle import step_messages

MIX = {"input": [2, 6, 6], "layers": [
    {"type": "conv2d", "out": 4, "kernel": 3, "padding": 1, "shard": "out"},
    {"type": "residual", "layers": [
        {"type": "batchnorm2d"},
        {"type": "conv2d", "out": 5, "kernel": 3, "padding": 1, "shard": "out"},
        {"type": "relu"},
        {"type": "conv2d", "out": 4, "kernel": 3, "padding": 1, "shard": "in"},
        {"type": "residual", "layers": [{"type": "layernorm"}, {"type": "tanh"}]},
    ]},
    {"type": "flatten"},
    {"type": "linear", "out": 12, "shard": "column"},
    {"type": "residual", "layers": [
        {"type": "linear", "out": 12, "shard": "column"},
        {"type": "gelu"},
        {"type": "linear", "out": 12, "shard": "row"},
        {"type": "dropout", "p": 0.2},
    ], "projection": {"type": "linear", "out": 12}},
    {"type": "linear", "out": 7, "shard": "column"},
]}


def configs():
    out = {"resnet-small": load_config("resnet-small", ["optim.clip_norm=1.0"])}
    mix = load_config("digits-mlp", ["optim.clip_norm=1.0"])
    mix["model"] = copy.deepcopy(MIX)
    mix["name"] = "residual-mix"
    out["residual-mix"] = mix
    return out


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("name", ["resnet-small", "residual-mix"])
def test_analytic_messages_equal_a_real_residual_step(comm, name, overlap):
    cfg = configs()[name]
    B, bucket_mb = 10, 0.004
    failures = []
    for dp, tp, got_keys, want_keys, want in step_messages(comm, cfg, B, bucket_mb, overlap):
        if got_keys != want_keys:
            failures.append((dp, tp, [k for k in want_keys if k not in got_keys],
                             [k for k in got_keys if k not in want_keys], got_keys, want_keys))
        if tp > 1:
            assert any(k[0].startswith("res") and k[2] == "tp" for k in got_keys), got_keys
        if dp > 1:
            assert sum(k[0].startswith("dp.grad_bucket") for k in got_keys) >= 2
    assert not failures, failures[0]


@pytest.mark.skipif(world().size != 1, reason="serial")
@pytest.mark.parametrize("name", ["resnet-small", "residual-mix"])
def test_residual_flops_params_and_names_equal_the_built_model(name):
    from mpifc.models import build_model

    cfg = configs()[name]
    net = build_model(cfg["model"], Grid(world(), 1, 1), seed=0)
    rows = 8
    d = describe_step(cfg, 1, 1, global_batch=rows)
    assert d.names == net.names
    assert d.params == sum(p.size for p in net.parameters())
    gemm = sum(p.flops for p in d.workload.phases
               if p.kind == "compute" and p.label.endswith(".forward") and p.op_kind in ("gemm", "conv"))
    want = 0
    for layer, shape in zip(net.layers, net.shapes(rows)):
        want += _gemm_flops(layer, shape)
    assert gemm == want


def _gemm_flops(layer, shape):
    """Forward flops of the linear and conv layers in ``layer`` (nested blocks walked)."""
    if type(layer).__name__ == "Residual":
        f = _gemm_flops(layer.body, shape)
        return f + (_gemm_flops(layer.shortcut, shape) if layer.shortcut is not None else 0)
    if type(layer).__name__ == "Sequential":
        f = 0
        for sub in layer.layers:
            f += _gemm_flops(sub, shape)
            shape = D.output_shape(sub, shape)
        return f
    if type(layer).__name__ in ("Linear", "Conv2d"):
        return D.flops(layer, shape)[0]
    return 0


def test_residual_first_layer_with_parameters_is_refused():
    cfg = load_config("digits-mlp")
    cfg["model"] = {"input": [4], "layers": [
        {"type": "residual", "layers": [{"type": "linear", "out": 4}]},
        {"type": "linear", "out": 3}]}
    with pytest.raises(WorkloadError, match=r"model\.layers\[0\]\.layers\[0\]: a residual block"):
        describe_step(cfg, 1, 1, global_batch=4)


@pytest.mark.skipif(world().size != 1, reason="serial")
def test_block_gradients_reduce_after_the_block():
    """DataParallel marks a block's conv/BN gradients final when the whole block's
    backward is done: no bucket of the last block starts inside it, and the first
    starts right after its add."""
    cfg = configs()["resnet-small"]
    d = describe_step(cfg, 2, 1, global_batch=8, bucket_mb=0.004, overlap=True)
    labels = [p.label for p in d.workload.phases if p.stage == "backward"]
    start = next(i for i, lb in enumerate(labels) if lb.startswith("res3."))
    end = labels.index("res3.backward")
    inside = [lb for lb in labels[start:end] if lb.startswith("dp.grad_bucket")]
    assert not inside, inside
    assert labels[end + 1].startswith("dp.grad_bucket0"), labels[end: end + 3]
