"""The resnet-small preset (residual blocks with out/in sharded conv pairs inside) on
every dp x tp layout of the job against the same model on one rank.

Every rank builds the preset on a 1x1 grid of its own (the reference) and on each
layout; on the same global batch (10 rows, uneven over 3 or 4 dp ranks) the layout's
logits, every parameter's gradient, and after 3 SGD(momentum) steps with clipping
every parameter shard and BatchNorm buffer equal their block of the reference.
The trace of one step holds exactly the predicted collectives (the blocks'
``collectives()`` see inside both branches), and a checkpoint saved under each
layout loads under each other one (dp=2 <-> tp=2 at 2 ranks).
"""
import numpy as np
import pytest

from mpifc.checkpoint import load, save
from mpifc.comm import trace
from mpifc.config import load_config
from mpifc.models import build_model
from mpifc.optim import SGD, clip_grad_norm
from mpifc.parallel import DataParallel, match_trace
from mpifc.parallel.data import clip_collectives

from test_models import B, CLIP, LR, _rel, batch, grid_of, layouts, local_block, rows, self_grid, \
    train_step

CFG = load_config("resnet-small")["model"]
STEPS = 3
TOL = 1e-9


def buffer_shardings(module, prefix=""):
    """{qualified buffer name: Sharding} over nested children (split BatchNorm stats)."""
    out = {prefix + a: sh for a, sh in (getattr(module, "buffer_shardings", None) or {}).items()}
    for cname, child in zip(module._names_of_children(), module._children):
        out.update(buffer_shardings(child, prefix + cname + "."))
    return out


def reference(comm, steps):
    sg = self_grid(comm)
    ref = build_model(CFG, sg, seed=7, dtype=np.float64)
    opt = SGD(ref.named_parameters(), lr=LR, momentum=0.9)
    logits0 = grads0 = None
    for s in range(steps):
        x, y = batch(CFG, s, np.float64)
        ref.zero_grad()
        logits = ref.forward(x)
        ref.loss.forward(logits, y)
        ref.backward(ref.loss.backward(1.0))
        if s == 0:
            logits0 = logits.copy()
            grads0 = {n: p.grad.copy() for n, p in ref.named_parameters()}
        clip_grad_norm(ref.parameters(), CLIP)
        opt.step()
    return ref, logits0, grads0


def logits_block(net, grid, full):
    counts_rows = rows(grid, full, np.zeros(B, int))[0]
    if not net.logits_sharded:
        return counts_rows
    sh = net.layers[-1].weight.sharding            # class-split logits follow the weight rows
    return counts_rows[:, sh.offset: sh.offset + sh.counts[sh.index]]


@pytest.mark.mpi(min_size=1)
def test_resnet_small_matches_one_rank(comm):
    ref, logits0, grads0 = reference(comm, STEPS)
    want = dict(ref.named_parameters())
    want_buf = dict(ref.buffers())
    bad = []
    for dp_, tp_ in layouts(comm.size):
        grid = grid_of(comm, dp_, tp_)
        net = build_model(CFG, grid, seed=7, dtype=np.float64)
        assert [n for n, _ in net.named_parameters()] == list(want)
        dp = DataParallel(net, grid.dp_comm, bucket_mb=0.01)       # several buckets
        opt = SGD(net.named_parameters(), lr=LR, momentum=0.9)
        for s in range(STEPS):
            x, y = rows(grid, *batch(CFG, s, np.float64))
            if s == 0:
                dp.zero_grad()
                logits = net.forward(x)
                e = _rel(logits, logits_block(net, grid, logits0))
                if e > TOL:
                    bad.append(f"dp={dp_} tp={tp_} logits: rel err {e:.3e}")
                net.loss.forward(logits, y)
                dp.backward(net.loss.backward(grid.dp * len(y) / B))
                dp.synchronize()
                for name, p in net.named_parameters():
                    e = _rel(p.grad, local_block(grads0[name], p.sharding))
                    if e > TOL:
                        bad.append(f"dp={dp_} tp={tp_} grad {name}: rel err {e:.3e}")
            train_step(net, dp, opt, grid, x, y) if s else _finish_step(net, opt, grid)
        for name, p in net.named_parameters():
            e = _rel(p.data, local_block(want[name].data, p.sharding))
            if e > TOL:
                bad.append(f"dp={dp_} tp={tp_} {name}: rel err {e:.3e}")
        shardings = buffer_shardings(net)
        if tp_ > 1:       # the blocks' inner BatchNorms really are split over tp
            assert "res1.body.bn1.running_mean" in shardings
        for name, arr in net.buffers():
            e = _rel(arr, local_block(want_buf[name], shardings.get(name)))
            if e > TOL:
                bad.append(f"dp={dp_} tp={tp_} buffer {name}: rel err {e:.3e}")
        print(f"dp={dp_} tp={tp_}: {'OK' if not bad else bad[:3]}")
    assert not bad, bad[:10]


def _finish_step(net, opt, grid):
    """Step 0's gradients are already synchronised: clip and step like train_step."""
    from mpifc.parallel import clip_grad_norm_grid

    clip_grad_norm_grid(net.parameters(), CLIP, grid)
    opt.step()


@pytest.mark.mpi(min_size=1)
def test_resnet_step_trace_is_exactly_predicted(comm):
    for dp_, tp_ in layouts(comm.size):
        grid = grid_of(comm, dp_, tp_)
        net = build_model(CFG, grid, seed=3, dtype=np.float32)
        dp = DataParallel(net, grid.dp_comm, bucket_mb=0.01)
        opt = SGD(net.parameters(), lr=LR, momentum=0.9)
        x, y = rows(grid, *batch(CFG, 0, np.float32))
        trace.reset()
        train_step(net, dp, opt, grid, x, y, accuracy=True)
        events = trace.events()
        expected = net.collectives(len(y), accuracy=True) + dp.collectives() + clip_collectives(grid)
        missing, extra = match_trace(expected, events)
        assert not missing and not extra, (dp_, tp_, missing, extra)
        groups = {e["comm"] for e in events}
        assert ("dp" in groups) == (dp_ > 1) and ("tp" in groups) == (tp_ > 1), groups
        if tp_ > 1:       # the sharded convs inside the blocks communicate, named by path
            phases = {e["phase"] for e in events if e["comm"] == "tp"}
            assert any(p.startswith("res2.body.conv2") for p in phases), sorted(phases)


@pytest.mark.mpi(min_size=2)
def test_resnet_checkpoint_reshards(comm, mpi_tmp_path):
    """Save under each layout, load under each (dp=2 <-> tp=2 at 2 ranks): the loaded
    parameters and BatchNorm buffers are the reference's blocks."""
    ref, _, _ = reference(comm, 2)
    want = {n: p.data for n, p in ref.named_parameters()}
    want.update(dict(ref.buffers()))
    bad = []
    for dps, tps in layouts(comm.size):
        gs = grid_of(comm, dps, tps)
        net = build_model(CFG, gs, seed=7, dtype=np.float64)
        dp = DataParallel(net, gs.dp_comm)
        opt = SGD(net.named_parameters(), lr=LR, momentum=0.9)
        for s in range(2):
            train_step(net, dp, opt, gs, *rows(gs, *batch(CFG, s, np.float64)))
        path = save(mpi_tmp_path / f"dp{dps}-tp{tps}", net, opt, gs, step=2)
        for dpl, tpl in layouts(comm.size):
            gl = grid_of(comm, dpl, tpl)
            net2 = build_model(CFG, gl, seed=99, dtype=np.float64)
            opt2 = SGD(net2.named_parameters(), lr=LR, momentum=0.9)
            load(path, net2, opt2, gl)
            sh = {n: p.sharding for n, p in net2.named_parameters()}
            sh.update(buffer_shardings(net2))
            got = {n: p.data for n, p in net2.named_parameters()}
            got.update(dict(net2.buffers()))
            assert set(got) == set(want)
            for n, arr in got.items():
                e = _rel(arr, local_block(want[n], sh.get(n)))
                if e > TOL:
                    bad.append(f"dp{dps}xtp{tps} -> dp{dpl}xtp{tpl} {n}: rel err {e:.3e}")
    assert not bad, bad[:10]


def _python_block_model(grid, sharded):
    """A model built by hand from Python: stem conv, Residual(out-conv, ReLU, in-conv)
    with an identity shortcut, global average pool, linear. ``sharded`` uses the
    tensor-parallel convs on ``grid``'s tensor group (the same global weights)."""
    import mpifc.nn as nn
    from mpifc.parallel.conv import InChannelParallelConv2d, OutChannelParallelConv2d

    kw = dict(padding=1, bias=False, dtype=np.float64)
    rng = lambda k: np.random.default_rng([11, k])       # noqa: E731
    if sharded:
        tpc = grid.tp_comm
        c1 = OutChannelParallelConv2d(4, 6, 3, tpc, gather_output=False, name="blk.c1", rng=rng(1), **kw)
        c2 = InChannelParallelConv2d(6, 4, 3, tpc, input_is_sharded=True, name="blk.c2", rng=rng(2), **kw)
    else:
        c1, c2 = nn.Conv2d(4, 6, 3, rng=rng(1), **kw), nn.Conv2d(6, 4, 3, rng=rng(2), **kw)
    return nn.Sequential(nn.Conv2d(2, 4, 3, rng=rng(0), **kw),
                         nn.Residual(nn.Sequential(c1, nn.ReLU(), c2)),
                         nn.GlobalAvgPool2d(),
                         nn.Linear(4, 5, dtype=np.float64, rng=rng(3)), input_grad=False)


@pytest.mark.mpi(min_size=1)
def test_python_residual_with_sharded_convs_and_data_parallel(comm):
    """mpifc.nn.Residual built from Python, sharded convs inside, under DataParallel on
    every layout: the gradients equal the serial model's on the whole batch."""
    from mpifc.nn import SoftmaxCrossEntropy

    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((B, 2, 6, 6)), rng.integers(0, 5, B)
    ref = _python_block_model(self_grid(comm), False)
    ce = SoftmaxCrossEntropy()
    ce.forward(ref.forward(x), y)
    ref.backward(ce.backward(1.0))
    want = {n: p.grad for n, p in ref.named_parameters()}
    for dp_, tp_ in layouts(comm.size):
        grid = grid_of(comm, dp_, tp_)
        net = _python_block_model(grid, True)
        dp = DataParallel(net, grid.dp_comm, bucket_mb=0.0005)
        xl, yl = rows(grid, x, y)
        dp.zero_grad()
        ce.forward(net.forward(xl), yl)
        dp.backward(ce.backward(grid.dp * len(yl) / B))
        dp.synchronize()
        names = [n for n, _ in net.named_parameters()]
        assert names == ["0.weight", "1.body.0.weight", "1.body.2.weight", "3.weight", "3.bias"]
        for n, p in net.named_parameters():
            e = _rel(p.grad, local_block(want[n], p.sharding))
            assert e < TOL, (dp_, tp_, n, e)
