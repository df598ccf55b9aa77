"""DataParallel: buckets, overlap vs blocking, accumulation, start-up bcast, 1-rank groups.

Each test runs on every dp x tp layout of the job (dp = world size, tensor
parallel, and both at 4 ranks) unless it says otherwise. The model is a small MLP
(column -> row -> column, class-split logits over tp) in float64.
"""
import numpy as np
import pytest

from mpifc import nn
from mpifc.comm import Grid, balanced_counts, trace
from mpifc.models import build_model
from mpifc.nn.module import Module
from mpifc.parallel import DataParallel
from mpifc.parallel import data as data_mod
from mpifc.parallel.data import MIN_BUCKET_MB, bucket_cap, plan_buckets

MLP = {"input": [12], "layers": [
    {"type": "linear", "out": 20, "shard": "column"},
    {"type": "relu"},
    {"type": "linear", "out": 14, "shard": "row"},
    {"type": "relu"},
    {"type": "linear", "out": 10, "shard": "column"},
]}
B = 12
_GRIDS = {}


def grid_of(comm, dp, tp):
    if (dp, tp) not in _GRIDS:       # cached: every Grid splits two communicators
        _GRIDS[(dp, tp)] = Grid(comm, dp, tp)
    return _GRIDS[(dp, tp)]


def layouts(size):
    return [(size // tp, tp) for tp in range(1, size + 1) if size % tp == 0]


def my_rows(grid, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((B, 12)), rng.integers(0, 10, B)
    counts, displs = balanced_counts(B, grid.dp)
    sl = slice(displs[grid.dp_rank], displs[grid.dp_rank] + counts[grid.dp_rank])
    return np.ascontiguousarray(x[sl]), y[sl]


def grads(net):
    return {n: p.grad.copy() for n, p in net.named_parameters()}


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if b.size else 0.0


def gradient_step(net, dp, grid, x, y):
    dp.zero_grad()
    net.loss.forward(net.forward(x), y)
    dp.backward(net.loss.backward(grid.dp * len(y) / B))
    dp.synchronize()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("bucket_mb,min_buckets", [(0.0, 4), (0.0004, 1), (0.002, 1), (25.0, 1), (25.0, 4)])
def test_buckets_respect_cap_and_hold_the_grads(comm, bucket_mb, min_buckets, monkeypatch):
    # the split logic on a small model: no floor under the min_buckets cut here
    monkeypatch.setattr(data_mod, "MIN_BUCKET_MB", 0.0)
    for dp_, tp_ in layouts(comm.size):
        grid = grid_of(comm, dp_, tp_)
        net = build_model(MLP, grid, seed=1, dtype=np.float64)
        params = net.parameters()
        dp = DataParallel(net, grid.dp_comm, bucket_mb=bucket_mb, min_buckets=min_buckets)
        total = sum(p.grad.nbytes for p in params)
        cap = min(bucket_mb * 2**20, -(-total // min_buckets))
        # the pieces, bucket after bucket, are the parameters in reverse order, each
        # cut in ascending row blocks that match its grad_rows
        flat = [(p, i, r0, r1) for b in dp.buckets for p, i, r0, r1 in b.pieces]
        whole = []
        for p, i, r0, r1 in flat:
            if i == 0:
                whole.append(p)
            if dp_ > 1:         # a one-rank group computes every gradient in one block
                assert (r0, r1) == p.row_blocks()[i]
        assert [id(p) for p in whole] == [id(p) for p in reversed(params)]     # reverse order, once each
        row_b = {id(p): p.grad.nbytes // max(p.shape[0], 1) for p in params}
        for b in dp.buckets:
            one_row = len(b.pieces) == 1 and b.pieces[0][3] - b.pieces[0][2] == 1
            assert b.nbytes <= cap or one_row or (bucket_mb == 0 and len(b.params) == 1), \
                (bucket_mb, b.nbytes, b.pieces)
            off = 0
            for p, i, r0, r1 in b.pieces:      # grads are views of the bucket buffers
                n = p.grad[r0:r1].size
                assert np.shares_memory(p.grad[r0:r1], b.buffer[off: off + n]) or n == 0
                p.grad[r0:r1] = 1.0 + off
                assert (b.buffer[off: off + n] == 1.0 + off).all()
                off += n
            assert off == b.numel
        dp.zero_grad()
        # a bucket closes only when the next row would overflow it
        if bucket_mb > 0:
            for b, nxt in zip(dp.buckets, dp.buckets[1:]):
                assert b.nbytes + row_b[id(nxt.pieces[0][0])] > cap
        else:
            assert len(dp.buckets) == len(params)
        if bucket_mb == 25.0 and min_buckets == 1:
            assert len(dp.buckets) == 1
        if bucket_mb == 25.0 and min_buckets == 4:
            assert 4 <= len(dp.buckets) <= 5
        # the trace of a step: one message per non-empty bucket, of the bucket's size
        x, y = my_rows(grid)
        trace.reset()
        gradient_step(net, dp, grid, x, y)
        ev = [e for e in trace.events() if e["phase"].startswith("dp.grad")]
        want = [(b.phase, b.numel, b.nbytes) for b in dp.buckets if b.numel] if dp_ > 1 else []
        assert [(e["phase"], e["count"], e["bytes"]) for e in ev] == want


def test_bucket_cap_floor():
    """min_buckets cuts a large model, never below MIN_BUCKET_MB, never above bucket_mb."""
    mib = 2**20
    assert bucket_cap(25.0, 80 * mib, 8) == 10 * mib                 # the min_buckets cut
    assert bucket_cap(25.0, 336 * 1024, 8) == int(MIN_BUCKET_MB * mib)  # a small model: the floor
    assert bucket_cap(0.5, 336 * 1024, 8) == mib // 2                # the user's cap wins
    assert bucket_cap(25.0, 80 * mib, 1) == 25 * mib
    assert bucket_cap(0.0, 80 * mib, 8) == 0                         # one bucket per parameter



@pytest.mark.mpi(min_size=2)
def test_buckets_start_in_order_while_the_weight_gradient_is_computed(comm):
    """A weight cut over several buckets: each bucket starts as soon as its rows are in,
    before the layer computes its later row blocks; buckets start in index order."""
    grid = grid_of(comm, comm.size, 1)
    net = build_model(MLP, grid, seed=1, dtype=np.float64)
    w = net.layers[0].weight                                   # (20, 12): 1920 bytes
    dp = DataParallel(net, grid.dp_comm, bucket_mb=500 / 2**20, min_buckets=1)
    spans = [b.index for b in dp.buckets if any(p is w for p, *_ in b.pieces)]
    assert len(spans) >= 3 and len(w.row_blocks()) == len(spans)
    started = []
    reduce = dp._reduce

    def spy(b):
        done = int((np.abs(w.grad).sum(axis=1) != 0).sum())    # rows of fc1's dW computed
        started.append((b.index, done))
        reduce(b)
    dp._reduce = spy
    x, y = my_rows(grid)
    gradient_step(net, dp, grid, x, y)
    assert [i for i, _ in started] == list(range(len(dp.buckets)))
    for i, done in started:
        if i in spans[:-1]:                                    # not the last block of fc1
            assert done < w.shape[0], (i, done, started)
    # the same gradients as without row blocks (one bucket), to 1e-12
    ref = build_model(MLP, grid, seed=1, dtype=np.float64)
    gradient_step(ref, DataParallel(ref, grid.dp_comm, bucket_mb=25.0, min_buckets=1), grid, x, y)
    for n, g in grads(ref).items():
        e = rel(grads(net)[n], g)
        print(f"row-block buckets vs one bucket {n}: maxdiff = {e:.3e}")
        assert e <= 1e-12, (n, e)


def test_plan_buckets_separates_dtypes():
    from mpifc.nn.module import Parameter

    ps = [Parameter(np.zeros(4, np.float32), "a"), Parameter(np.zeros(4, np.float32), "b"),
          Parameter(np.zeros(4, np.float64), "c"), Parameter(np.zeros(2, np.float32), "d")]
    bs = plan_buckets(ps, 1.0)
    assert [[p.name for p in b.params] for b in bs] == [["a", "b"], ["c"], ["d"]]
    assert bs[0].buffer.base is not None and bs[0].buffer.base is not bs[1].buffer.base
    assert [b.dtype for b in bs] == [np.float32, np.float64, np.float32]


@pytest.mark.mpi(min_size=1)
def test_overlap_and_blocking_give_identical_grads(comm):
    for dp_, tp_ in layouts(comm.size):
        grid = grid_of(comm, dp_, tp_)
        x, y = my_rows(grid, seed=2)
        out = {}
        for mode, kw in {"overlap": dict(overlap=True),
                         "overlap-thread": dict(overlap=True, progress="thread"),
                         "overlap-noprogress": dict(overlap=True, progress=False),
                         "blocking": dict(overlap=False)}.items():
            net = build_model(MLP, grid, seed=5, dtype=np.float64)
            dp = DataParallel(net, grid.dp_comm, bucket_mb=0.0004, **kw)
            gradient_step(net, dp, grid, x, y)
            out[mode] = grads(net)
        for mode in ("overlap", "overlap-thread", "overlap-noprogress"):
            for n in out["blocking"]:
                e = rel(out[mode][n], out["blocking"][n])
                print(f"dp={dp_} tp={tp_} {mode} vs blocking {n}: maxdiff = {e:.3e}")
                assert e <= 1e-14, (dp_, tp_, mode, n, e)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("k", [2, 3])
def test_accumulation_equals_one_big_batch(comm, k):
    """k micro-batches (k-1 under no_sync: no data-parallel message) == one batch."""
    for dp_, tp_ in layouts(comm.size):
        grid = grid_of(comm, dp_, tp_)
        x, y = my_rows(grid, seed=3)
        big = build_model(MLP, grid, seed=9, dtype=np.float64)
        big_dp = DataParallel(big, grid.dp_comm, bucket_mb=0.0004)
        gradient_step(big, big_dp, grid, x, y)

        net = build_model(MLP, grid, seed=9, dtype=np.float64)
        dp = DataParallel(net, grid.dp_comm, bucket_mb=0.0004)
        dp.zero_grad()
        counts, displs = balanced_counts(len(y), k)
        for i in range(k):
            sl = slice(displs[i], displs[i] + counts[i])
            xm, ym = np.ascontiguousarray(x[sl]), y[sl]
            trace.reset()
            if i < k - 1:
                with dp.no_sync():
                    net.loss.forward(net.forward(xm), ym)
                    dp.backward(net.loss.backward(grid.dp * len(ym) / B))
                dp_msgs = [e for e in trace.events() if e["comm"] == "dp"]
                assert dp_msgs == [], dp_msgs
            else:
                net.loss.forward(net.forward(xm), ym)
                dp.backward(net.loss.backward(grid.dp * len(ym) / B))
                dp.synchronize()
                n_dp = sum(e["comm"] == "dp" for e in trace.events())
                assert n_dp == len(dp.collectives())
        want, got = grads(big), grads(net)
        for n in want:
            e = rel(got[n], want[n])
            print(f"dp={dp_} tp={tp_} k={k} {n}: maxdiff = {e:.3e}")
            assert e <= 1e-12, (dp_, tp_, n, e)


@pytest.mark.mpi(min_size=2)
def test_params_and_buffers_broadcast_from_root(comm):
    """Replicas that start apart (other seeds, other running stats) agree after construction."""
    for dp_, tp_ in layouts(comm.size):
        if dp_ == 1:
            continue
        grid = grid_of(comm, dp_, tp_)
        cfg = {"input": [6], "layers": [{"type": "linear", "out": 8, "shard": "column", "bias": False},
                                        {"type": "batchnorm1d"}, {"type": "relu"},
                                        {"type": "linear", "out": 3, "shard": "row"}]}
        net = build_model(cfg, grid, seed=100 + grid.dp_rank, dtype=np.float64)   # replicas differ
        for _, buf in net.buffers():
            buf += grid.dp_rank
        trace.reset()
        DataParallel(net, grid.dp_comm)
        bc = [e for e in trace.events() if e["phase"] == "dp.init"]
        assert len(bc) == len(net.parameters()) + len(net.buffers())
        assert all(e["op"] == "bcast" and e["comm"] == "dp" for e in bc)
        state = np.concatenate([p.data.ravel() for p in net.parameters()]
                               + [b.ravel().astype(np.float64) for _, b in net.buffers()])
        every = grid.dp_comm.allgather(state[None, :])
        assert (every == every[0]).all()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("overlap", [True, False])
def test_one_rank_group_sends_nothing(comm, overlap):
    if "self" not in _GRIDS:
        _GRIDS["self"] = Grid(comm.split(comm.rank, name="self"), 1, 1)
    grid = _GRIDS["self"]
    net = build_model(MLP, grid, seed=1, dtype=np.float64)
    trace.reset()
    dp = DataParallel(net, grid.dp_comm, bucket_mb=0.0004, overlap=overlap)
    ref = build_model(MLP, grid, seed=1, dtype=np.float64)
    x, y = my_rows(grid)
    gradient_step(net, dp, grid, x, y)
    ref.loss.forward(ref.forward(x), y)
    ref.backward(ref.loss.backward(1.0))
    assert trace.events() == [] and dp.collectives() == []
    for n, g in grads(ref).items():
        assert np.array_equal(grads(net)[n], g), n


class _Wrapped(Module):
    """A model without ``.layers``: DataParallel runs its backward, then reduces every bucket."""

    def __init__(self, seed):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7, seed=seed, dtype=np.float64), nn.Tanh(),
                                  nn.Linear(7, 3, seed=seed + 1, dtype=np.float64), input_grad=False)
        self.add_module("body", self.body)

    def forward(self, x):
        return self.body.forward(x)

    def backward(self, dy):
        return self.body.backward(dy)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("overlap", [True, False])
def test_grads_are_the_mean_over_the_group(comm, overlap):
    """Every rank has its own data; after synchronize each grad is the mean of the local grads."""
    rng = np.random.default_rng(40 + comm.rank)
    x, dy = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    local = _Wrapped(3)
    local.forward(x)
    local.backward(dy)
    want = {n: comm.allreduce(p.grad.copy()) / comm.size for n, p in local.named_parameters()}
    model = _Wrapped(3)
    dp = DataParallel(model, comm, bucket_mb=0.0001, overlap=overlap)
    model.forward(x)
    dp.backward(dy)
    dp.synchronize()
    for n, p in model.named_parameters():
        assert rel(p.grad, want[n]) <= 1e-14, n


@pytest.mark.mpi(min_size=2)
def test_backward_twice_without_synchronize_raises(comm):
    grid = grid_of(comm, comm.size, 1)
    net = build_model(MLP, grid, seed=1, dtype=np.float64)
    dp = DataParallel(net, grid.dp_comm, bucket_mb=0.0004)
    x, y = my_rows(grid)
    net.loss.forward(net.forward(x), y)
    dp.backward(net.loss.backward(1.0))
    net.loss.forward(net.forward(x), y)
    with pytest.raises(RuntimeError, match="synchronize"):
        dp.backward(net.loss.backward(1.0))
    dp.synchronize()          # the pending requests of the first backward complete


@pytest.mark.mpi(min_size=2)
def test_rank_without_rows_still_joins(comm):
    """A global batch smaller than dp: the last rank has no rows, sends its (zero) grads,
    and every rank ends with the gradient of the whole batch."""
    grid = grid_of(comm, comm.size, 1)
    n = comm.size - 1
    rng = np.random.default_rng(11)
    x_all, y_all = rng.standard_normal((n, 12)), rng.integers(0, 10, n)
    counts, displs = balanced_counts(n, grid.dp)
    sl = slice(displs[grid.dp_rank], displs[grid.dp_rank] + counts[grid.dp_rank])
    net = build_model(MLP, grid, seed=4, dtype=np.float64)
    dp = DataParallel(net, grid.dp_comm, bucket_mb=0.0004)
    x, y = np.ascontiguousarray(x_all[sl]), y_all[sl]
    dp.zero_grad()
    net.loss.forward(net.forward(x), y)
    dp.backward(net.loss.backward(grid.dp * len(y) / n))
    dp.synchronize()
    if "self" not in _GRIDS:
        _GRIDS["self"] = Grid(comm.split(comm.rank, name="self"), 1, 1)
    ref = build_model(MLP, _GRIDS["self"], seed=4, dtype=np.float64)
    ref.loss.forward(ref.forward(x_all), y_all)
    ref.backward(ref.loss.backward(1.0))
    assert len(y) == (0 if grid.dp_rank == comm.size - 1 else 1)
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        assert rel(p.grad, q.grad) <= 1e-12, name


@pytest.mark.mpi(min_size=1)
def test_blocking_mode_keeps_one_bucket_by_default(comm, monkeypatch):
    # with overlap the gradients are cut in at least MIN_BUCKETS buckets; without, every
    # bucket waits for the end of backward anyway: one bucket (bucket_mb still caps)
    monkeypatch.setattr(data_mod, "MIN_BUCKET_MB", 0.0)
    grid = grid_of(comm, comm.size, 1)
    net = build_model(MLP, grid, seed=1, dtype=np.float64)
    overlapped = DataParallel(net, grid.dp_comm)
    blocking = DataParallel(build_model(MLP, grid, seed=1, dtype=np.float64), grid.dp_comm,
                            overlap=False)
    assert overlapped.min_buckets == data_mod.MIN_BUCKETS and len(overlapped.buckets) > 1
    assert blocking.min_buckets == 1 and len(blocking.buckets) == 1
    assert len(DataParallel(net, grid.dp_comm, overlap=False, min_buckets=3).buckets) > 1


class _Unused(_Wrapped):
    """_Wrapped plus a layer that takes no part in the step: its gradient stays zero."""

    def __init__(self, seed):
        super().__init__(seed)
        self.spare = nn.Linear(4, 6, seed=seed + 2, dtype=np.float64)
        self.add_module("spare", self.spare)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("overlap", [True, False])
def test_deferred_zero_grad_reaches_every_bucket(comm, overlap):
    """zero_grad writes no zeros (Parameter.zero_grad): a parameter that gets no gradient
    this step must still read zeros after the allreduce, not last step's values, and the
    others the mean over the group."""
    rng = np.random.default_rng(50 + comm.rank)
    x, dy = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    model = _Unused(3)
    dp = DataParallel(model, comm, bucket_mb=0.0001, overlap=overlap)
    for p in model.parameters():         # last step's gradients, different on every rank
        p.grad[...] = rng.standard_normal(p.grad.shape) + 1.0
    dp.zero_grad()
    model.forward(x)
    dp.backward(dy)
    dp.synchronize()
    ref = _Wrapped(3)
    ref.forward(x)
    ref.backward(dy)
    for n, p in model.named_parameters():
        if n.startswith("spare"):
            assert not p.grad.any(), n
        else:
            want = comm.allreduce(dict(ref.named_parameters())[n].grad.copy()) / comm.size
            assert rel(p.grad, want) <= 1e-14, n
