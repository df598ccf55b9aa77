"""Loader prefetch on a device (mpifc/data/prefetch.py), with the CuPy test double.

The design: handing out batch k, the loader has already read batch k + 1's rows on
the host into one of two sets of pinned buffers and issued their copy on its own
stream; the compute stream waits for batch k's copy event when k is handed out. So:
pinned allocations only for the first two batches, exactly one host-to-device copy
per batch array, issued on the copy stream, and batch k + 1's copy issued before step
k's backward ends (the double logs the order). Same batches as without prefetch (dp
at 1 and 2 ranks, slice and scatter, with augmentation), and a resume mid-epoch
gives the same losses as the straight run.
"""
import numpy as np
import pytest

import fakecupy as cp
from devicerun import digits_cnn_trainer as _trainer

pytestmark = pytest.mark.mpi(min_size=1)


def _loader(tr, prefetch, mode="slice", augment=True):
    from mpifc.data import Augment, DistributedLoader

    aug = Augment(("crop", "flip"), pad=2, seed=3) if augment else None
    return DistributedLoader(tr.loader.path, tr.grid.dp_comm, batch_size=64, seed=5,
                             mode=mode, cache=True, xp=cp, prefetch=prefetch, augment=aug)


@pytest.mark.parametrize("mode", ["slice", "scatter"])
def test_prefetched_batches_are_the_loaders_batches(comm, mpi_tmp_path, dev, mode):
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    tr = _trainer(comm, tmp, f"same-{mode}")
    assert tr.loader.prefetch                   # on by default on a device
    a, b = _loader(tr, True, mode), _loader(tr, False, mode)
    assert a.prefetch and not b.prefetch
    steps = a.steps_per_epoch
    for epoch in range(2):
        pin0 = cp.counts["pinned_allocs"]
        got = []
        for s, (pa, pb) in enumerate(zip(a, b)):
            got.append(cp.counts["pinned_allocs"] - pin0)
            assert (pa.epoch, pa.step, pa.global_size) == (pb.epoch, pb.step, pb.global_size)
            assert np.array_equal(pa.x.get(), pb.x.get()) and pa.x.dtype == pb.x.dtype
            assert np.array_equal(pa.y.get(), pb.y.get())
            assert a.position == b.position == ((epoch, s + 1) if s + 1 < steps else (epoch + 1, 0))
        assert len(got) == steps
        # two sets of pinned buffers (x, y), allocated for the first two batches, never again
        assert got == [4] * steps if epoch == 0 else got == [0] * steps, got
    assert a._prefetcher.allocations == 4
    # resume mid-epoch: the same batches from there on
    a.set_position(1, 5)
    want = [(bb.x.get(), bb.y.get()) for bb in (b.get_batch(1, s) for s in range(5, steps))]
    for (x, y), pa in zip(want, a):
        assert np.array_equal(x, pa.x.get()) and np.array_equal(y, pa.y.get())
    assert a.position == (2, 0)


def test_one_copy_per_batch_array_issued_before_the_previous_backward_ends(
        comm, mpi_tmp_path, dev):
    """Trainer.run: ops log = per batch two h2d on the loader's stream, then its event;
    batch k + 1's copies come before step k's backward ends; the compute stream waits
    for batch k's event before step k's backward."""
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    n = 4
    tr = _trainer(comm, tmp, "order", f"train.max_steps={n}", "train.log_every=2")
    from mpifc.data.prefetch import Prefetcher

    issue, backward = Prefetcher.issue, tr.dp.backward

    def marked_issue(self, epoch, step):
        cp.mark("issue", step)
        return issue(self, epoch, step)

    def marked_backward(d):
        out = backward(d)
        cp.mark("backward end", tr.step)
        return out
    Prefetcher.issue = marked_issue
    tr.dp.backward = marked_backward
    try:
        cp.reset_counts()
        tr.run()
    finally:
        Prefetcher.issue = issue
    ops = list(cp.ops)
    at = {(op, d): i for i, (op, _, d) in enumerate(ops) if op in ("issue", "backward end")}
    copy_stream = tr.loader._prefetcher.stream.name
    h2d = [(i, s) for i, (op, s, _) in enumerate(ops) if op == "h2d"]
    # normalisation constants once (first batch), then x and y of each batch, all on the
    # copy stream; batches 0..n issued (the run stops after step n - 1: batch n is read ahead)
    assert all(s == copy_stream for _, s in h2d)
    assert len(h2d) == 2 * (n + 1) + 2
    for k in range(n + 1):
        lo = at[("issue", k)]
        hi = at.get(("issue", k + 1), len(ops))
        mine = [i for i, _ in h2d if lo < i < hi]
        assert len(mine) == 2 + (2 if k == 0 else 0), (k, mine)
        # its event, recorded on the copy stream after the copies
        rec = [i for i, (op, s, _) in enumerate(ops) if op == "record" and s == copy_stream
               and lo < i < hi]
        assert rec and rec[-1] > max(mine)
    for k in range(n - 1):
        assert at[("issue", k + 1)] < at[("backward end", k)], k      # overlaps step k
    # the compute (null) stream waits for batch k's event before step k's backward
    waits = [(i, d) for i, (op, s, d) in enumerate(ops) if op == "wait_event" and s == "null"]
    recs = {d: i for i, (op, s, d) in enumerate(ops) if op == "record" and s == copy_stream}
    ready = sorted(recs.items(), key=lambda kv: kv[1])         # batch k's event: the k-th
    for k in range(n):
        ev = ready[k][0]
        assert any(d == ev and i < at[("backward end", k)] for i, d in waits), k
    # no pinned buffer after the first two batches; no scalar read
    assert tr.loader._prefetcher.allocations == 4 and cp.counts["scalar"] == 0


def test_resume_mid_epoch_with_prefetch_is_exact(comm, mpi_tmp_path, dev):
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    _trainer(comm, tmp, "straight", "train.max_steps=6", "train.log_every=1").run()
    _trainer(comm, tmp, "resumed", "train.max_steps=3", "train.checkpoint_every=1").run()
    again = _trainer(comm, tmp, "resumed", "train.max_steps=6", "train.log_every=1",
                     "train.checkpoint_every=1")
    again.resume()
    assert again.step == 3 and again.loader.position == (0, 3)
    again.run()
    if comm.rank == 0:      # the step-4..6 log lines of both runs: the same losses
        import json

        def lines(name):
            return {r["step"]: r for r in map(json.loads, open(f"{tmp}/{name}/metrics.jsonl"))
                    if "samples_per_s" not in r}
        a, b = lines("straight"), lines("resumed")
        assert set(b) == {4, 5, 6} and {4, 5, 6} <= set(a)
        for s in (4, 5, 6):
            assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-6 * max(1.0, abs(a[s]["loss"])), s
            assert a[s]["acc"] == b[s]["acc"], s
