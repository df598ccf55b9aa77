"""Gradient accumulation (train.accumulate = K): K micro-batches, one allreduce per bucket.

The global batch of train.batch_size rows runs as K micro-batches on each rank (the
rank's rows cut in K parts); the update equals one step on the whole batch. digits-mlp
has no BatchNorm (whose batch statistics would differ per micro-batch) and no
dropout, so the equality is exact up to float summation order. Any number of ranks.
"""
import numpy as np
import pytest

from mpifc.comm import trace
from mpifc.config import ConfigError, load_config
from mpifc.data.loader import Batch, micro_batches

pytestmark = pytest.mark.mpi(min_size=1)


def _trainer(comm, tmp, out, *extra):
    from mpifc.train import Trainer

    cfg = load_config("digits-mlp", [f"data.dir={tmp}/data", "train.trace=false",
                                     "train.checkpoint_every=0", "optim.name=sgd",
                                     "parallel.bucket_mb=0.05", *extra])
    return Trainer(cfg, quiet=True, comm=comm, out=f"{tmp}/{out}")


def _grad_events(start):
    return [e for e in trace.TRACER.events()[start:] if e["phase"].startswith("dp.grad_bucket")]


def test_micro_batches_split_rows_exactly():
    x, y = np.arange(22.0).reshape(11, 2), np.arange(11)
    parts = micro_batches(Batch(x, y, 0, 3, 40), 4)
    assert [len(p.y) for p in parts] == [3, 3, 3, 2]
    assert np.array_equal(np.concatenate([p.x for p in parts]), x)
    assert all(p.global_size == 40 and p.step == 3 for p in parts)
    assert [len(p.y) for p in micro_batches(Batch(x[:2], y[:2], 0, 0, 2), 3)] == [1, 1, 0]


def test_accumulate_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="train.accumulate"):
        load_config("digits-mlp", ["train.accumulate=0"])


@pytest.mark.parametrize("layout", ["dp", "tp"])
def test_k4_of_16_equals_one_batch_of_64(comm, mpi_tmp_path, layout):
    """batch_size 64 as 4 micro-batches of 16 (over dp: each rank's 64/P rows in 4) ==
    one batch of 64: gradients and parameters after one step, and the losses of 3 steps,
    to 1e-6. Under dp > 1, exactly one gradient allreduce per bucket per optimizer step."""
    if layout == "tp" and comm.size == 1:
        pytest.skip("tp needs 2 ranks")
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    lay = [f"parallel.tp={comm.size}"] if layout == "tp" else []
    trace.reset()
    trace.enable()
    got = {}
    for k in (1, 4):
        tr = _trainer(comm, tmp, f"{layout}-k{k}", "train.batch_size=64", f"train.accumulate={k}",
                      *lay)
        n_buckets = sum(1 for b in tr.dp.buckets if b.numel)
        start = len(trace.TRACER)
        batch = tr.loader.get_batch(0, 0)
        loss, correct = tr.train_step(batch)
        grads = [p.grad.copy() for p in tr.model.parameters()]
        params = [p.data.copy() for p in tr.model.parameters()]
        events = _grad_events(start)
        if tr.grid.dp > 1:      # one (i)allreduce per non-empty bucket, at the K-th backward
            assert sorted(e["phase"] for e in events) == sorted(
                b.phase for b in tr.dp.buckets if b.numel), (k, n_buckets, events)
        else:
            assert events == []
        losses = [loss]
        for s in (1, 2):
            losses.append(tr.train_step(tr.loader.get_batch(0, s))[0])
        sums = tr._sum_over_dp([*losses, correct])
        got[k] = (grads, params, sums)
    for a, b in zip(got[1][0], got[4][0]):
        assert np.abs(a - b).max() < 1e-6
    for a, b in zip(got[1][1], got[4][1]):
        assert np.abs(a - b).max() < 1e-6
    assert np.allclose(got[1][2], got[4][2], rtol=1e-6, atol=1e-6)
    if comm.rank == 0:
        print(f"OK, maxdiff grads = {max(np.abs(a - b).max() for a, b in zip(got[1][0], got[4][0])):.2e}")


def test_run_counts_optimizer_steps(comm, mpi_tmp_path):
    """Steps, metrics and the data position count optimizer steps, not micro-batches."""
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    tr = _trainer(comm, tmp, "steps", "train.batch_size=64", "train.accumulate=4",
                  "train.max_steps=5", "train.epochs=1")
    tr.run()
    assert tr.step == 5 and tr.loader.position == (0, 5)


def test_micro_batches_of_a_text_batch_keep_each_document():
    """A text batch x = (tokens, offsets) is cut by documents: each part's bags are the
    original documents (offsets rebased), the last runs to the end of the tokens."""
    tokens = np.arange(10, dtype=np.int64)
    offsets = np.array([0, 3, 3, 7, 9], dtype=np.int64)         # 5 docs, one empty
    b = Batch(x=(tokens, offsets), y=np.arange(5), epoch=0, step=0, global_size=5)
    parts = micro_batches(b, 2)
    docs = [tokens[offsets[i]:(offsets[i + 1] if i + 1 < 5 else 10)].tolist() for i in range(5)]
    got = []
    for p in parts:
        t, o = p.x
        got += [t[o[i]:(o[i + 1] if i + 1 < len(o) else len(t))].tolist() for i in range(len(o))]
    assert got == docs
    assert [p.y.tolist() for p in parts] == [[0, 1, 2], [3, 4]]
