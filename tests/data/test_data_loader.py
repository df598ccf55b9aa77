"""Loader index logic and slice-mode loading, serially: P dp ranks simulated in one process.

Slice mode needs no communication, so P loaders with fake communicators of rank
0..P-1 reproduce exactly what P MPI ranks read.
"""
import numpy as np
import pytest

from mpifc.comm import balanced_counts
from mpifc.data.format import DatasetError, Normalisation, write_dataset
from mpifc.data.loader import BatchPlan, DistributedLoader, _read_rows, epoch_order


class FakeComm:
    """Rank ``rank`` of ``size`` for slice mode; every rank is assumed to agree."""

    def __init__(self, rank=0, size=1, others=None):
        self.rank, self.size, self.others = rank, size, others or {}

    def allgather_obj(self, obj):
        return [self.others.get(r, obj) for r in range(self.size)]

    def scatter(self, sendbuf, recvbuf, counts=None, root=0):
        assert self.size == 1
        recvbuf[...] = sendbuf
        return recvbuf


NS = [1, 7, 23, 64]
BS = [1, 3, 10, 16, 150]


@pytest.mark.parametrize("P", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_covers_each_sample_once(P, drop_last):
    for n in NS:
        for b in BS:
            if drop_last and b > n:
                with pytest.raises(ValueError, match="leaves no step"):
                    BatchPlan(n, b, P, drop_last=True)
                continue
            plan = BatchPlan(n, b, P, seed=5, drop_last=drop_last)
            for epoch in (0, 1):
                seen, order = [], plan.order(epoch)
                for step in range(plan.steps_per_epoch):
                    parts = [plan.local_indices(epoch, step, r, order) for r in range(P)]
                    sizes = [len(q) for q in parts]
                    assert max(sizes) - min(sizes) <= 1                 # balanced
                    assert sum(sizes) == plan.global_size(step)
                    # rank order concatenation is the global batch
                    np.testing.assert_array_equal(np.concatenate(parts),
                                                  plan.global_indices(epoch, step, order))
                    seen.extend(np.concatenate(parts).tolist())
                if drop_last:
                    assert plan.steps_per_epoch == n // b
                    assert len(seen) == len(set(seen)) == (n // b) * b
                else:
                    assert plan.steps_per_epoch == -(-n // b)
                    assert sorted(seen) == list(range(n))               # exactly once


def test_plan_last_batch_and_empty_ranks():
    plan = BatchPlan(n=23, batch_size=10, dp_size=4)
    assert [plan.global_size(s) for s in range(3)] == [10, 10, 3]
    assert plan.counts(2) == balanced_counts(3, 4) == ((1, 1, 1, 0), (0, 1, 2, 3))
    assert plan.local_indices(0, 2, 3).size == 0       # rank 3 gets nothing, still steps
    with pytest.raises(IndexError):
        plan.global_size(3)


def test_shuffle_is_deterministic_per_seed_and_epoch():
    a = epoch_order(1000, seed=7, epoch=2)
    np.testing.assert_array_equal(a, epoch_order(1000, seed=7, epoch=2))
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))
    assert not np.array_equal(a, epoch_order(1000, seed=7, epoch=3))
    assert not np.array_equal(a, epoch_order(1000, seed=8, epoch=2))
    np.testing.assert_array_equal(epoch_order(9, 7, 2, shuffle=False), np.arange(9))
    # the recipe is documented: default_rng([seed, epoch]).permutation(n)
    np.testing.assert_array_equal(a, np.random.default_rng([7, 2]).permutation(1000))
    with pytest.raises(ValueError):
        epoch_order(5, seed=-1, epoch=0)


def test_read_rows_any_order():
    class DS:   # h5py-like: fancy reads only with increasing indices
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __getitem__(self, key):
            if isinstance(key, np.ndarray):
                assert np.all(np.diff(key) > 0), "h5py needs increasing indices"
            return self.a[key]

    a = np.arange(1000 * 2).reshape(1000, 2)
    for idx in (np.array([5, 3, 4, 9]), np.array([900, 2, 500, 3]), np.array([], np.int64)):
        np.testing.assert_array_equal(_read_rows(DS(a), idx), a[idx])


@pytest.fixture(scope="module")
def id_file(tmp_path_factory):
    """Features whose column 0 is the sample id: batches say which samples they hold."""
    n = 37
    x = np.zeros((n, 3), np.float32)
    x[:, 0] = np.arange(n)
    x[:, 1:] = np.random.default_rng(0).standard_normal((n, 2))
    y = np.arange(n) % 4
    p = tmp_path_factory.mktemp("ids") / "ids.h5"
    return write_dataset(p, (x, y), (x[:5], y[:5]), class_names="abcd", source="ids",
                         normalisation=Normalisation.mean_std([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]))


def ids(batch):
    return batch.x[:, 0].astype(np.int64).tolist()


@pytest.mark.parametrize("P", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("B", [4, 7, 37, 50])
def test_slice_loaders_cover_epoch_once(id_file, P, B):
    loaders = [DistributedLoader(id_file, FakeComm(r, P), batch_size=B, seed=1, normalise=False)
               for r in range(P)]
    steps = {len(ld) for ld in loaders}
    assert steps == {-(-37 // B)}                                  # same number of steps
    for epoch in (0, 1):
        per_rank = [list(ld) for ld in loaders]                    # one epoch each
        assert {len(b) for b in per_rank} == steps
        seen = []
        for step in range(len(loaders[0])):
            batches = [per_rank[r][step] for r in range(P)]
            assert {b.global_size for b in batches} == {min(B, 37 - step * B)}
            got = sum((ids(b) for b in batches), [])
            np.testing.assert_array_equal(got, loaders[0].plan.global_indices(epoch, step))
            for b in batches:
                np.testing.assert_array_equal(b.y, np.array(ids(b)) % 4)
            seen += got
        assert sorted(seen) == list(range(37))
        assert all(ld.position == (epoch + 1, 0) for ld in loaders)
    for ld in loaders:
        ld.close()


def test_normalisation_on_the_fly(id_file):
    with DistributedLoader(id_file, FakeComm(), batch_size=8, shuffle=False) as ld:
        b = next(iter(ld))
        assert b.x.dtype == np.float32 and b.y.dtype == np.int64
        np.testing.assert_allclose(b.x[:, 0], (np.arange(8) - 1.0) / 2.0, rtol=1e-6)
    with DistributedLoader(id_file, FakeComm(), batch_size=8, shuffle=False, normalise=False) as ld:
        raw = next(iter(ld)).x
    np.testing.assert_allclose(b.x[:, 1:], (raw[:, 1:] - [2.0, 3.0]) / 2.0, rtol=1e-6)
    with DistributedLoader(id_file, FakeComm(), batch_size=8, dtype=np.float64, shuffle=False,
                           split="test") as ld:
        b = next(iter(ld))
        assert b.x.dtype == np.float64 and b.x.shape == (5, 3) and len(ld) == 1
        np.testing.assert_allclose(b.x[:, 0], (np.arange(5) - 1.0) / 2.0)


def test_scatter_mode_single_rank_matches_slice(id_file):
    a = DistributedLoader(id_file, FakeComm(), batch_size=6, seed=3, mode="slice")
    b = DistributedLoader(id_file, FakeComm(), batch_size=6, seed=3, mode="scatter", cache=True)
    for ba, bb in zip(a, b):
        np.testing.assert_array_equal(ba.x, bb.x)
        np.testing.assert_array_equal(ba.y, bb.y)


@pytest.mark.parametrize("P_before, P_after", [(1, 1), (2, 3), (4, 1)])
def test_resume_from_position_on_any_dp_size(id_file, P_before, P_after):
    def run(P, state=None, stop=None):
        lds = [DistributedLoader(id_file, FakeComm(r, P), batch_size=5, seed=9, normalise=False)
               for r in range(P)]
        if state:
            for ld in lds:
                ld.load_state_dict(state)
        out, its = [], [iter(ld) for ld in lds]
        for k, parts in enumerate(zip(*its)):
            out.append(sorted(sum((ids(p) for p in parts), [])))
            if stop is not None and k + 1 == stop:
                break
        return out, lds[0].state_dict()

    full, _ = run(1)
    first, state = run(P_before, stop=3)
    assert state["epoch"] == 0 and state["step"] == 3
    rest, _ = run(P_after, state)
    assert first + rest == full


def test_position_and_state_errors(id_file):
    ld = DistributedLoader(id_file, FakeComm(), batch_size=10)
    ld.set_position(2, 4)                                 # step == steps: next epoch
    assert ld.position == (3, 0)
    with pytest.raises(ValueError, match="outside"):
        ld.set_position(0, 5)
    other = DistributedLoader(id_file, FakeComm(), batch_size=10, seed=1).state_dict()
    with pytest.raises(ValueError, match="another stream.*seed"):
        ld.load_state_dict(other)


def test_errors_reach_every_rank(id_file, tmp_path):
    with pytest.raises(DatasetError, match="rank 0: .*no such dataset file"):
        DistributedLoader(tmp_path / "missing.h5", FakeComm(), batch_size=4)
    # rank 1 of 2 could not open the file: rank 0 raises too, naming rank 1
    bad = {1: {"settings": (4, 0, True, False, "slice", 0), "error": "boom", "meta": None}}
    with pytest.raises(DatasetError, match="rank 1: boom"):
        DistributedLoader(id_file, FakeComm(0, 2, bad), batch_size=4)
    bad = {1: {"settings": (8, 0, True, False, "slice", 0), "error": None, "meta": None}}
    with pytest.raises(ValueError, match="differ between ranks"):
        DistributedLoader(id_file, FakeComm(0, 2, bad), batch_size=4)
    with pytest.raises(ValueError, match="mode"):
        DistributedLoader(id_file, FakeComm(), batch_size=4, mode="broadcast")
    with pytest.raises(DatasetError, match="no split 'val'"):
        DistributedLoader(id_file, FakeComm(), batch_size=4, split="val")


# ---------------------------------------------------------------- what the loader serves

def _features(tmp_path, bad=None, value=np.nan, n=50):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    if bad is not None:
        x[bad, 2] = value
    path = tmp_path / "f.h5"
    write_dataset(path, (x, rng.integers(0, 4, n)), (x[:8].copy(), rng.integers(0, 4, 8)),
                  class_names=list("abcd"), source="t", normalisation=None)
    return str(path)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_at_open_when_cached(tmp_path, value):
    path = _features(tmp_path, bad=17, value=value)
    with pytest.raises(DatasetError, match=r"f\.h5, split 'train': sample 17 has NaN or Inf"):
        DistributedLoader(path, FakeComm(), batch_size=8, cache=True)
    # the test split is clean: it opens
    DistributedLoader(path, FakeComm(), split="test", batch_size=8, cache=True).close()


def test_non_finite_features_are_refused_per_batch_uncached(tmp_path):
    path = _features(tmp_path, bad=[17, 33])
    ld = DistributedLoader(path, FakeComm(), batch_size=10, shuffle=False)
    got = []
    with pytest.raises(DatasetError, match=r"split 'train': sample 17 has NaN or Inf"):
        for b in ld:
            got.append(b.step)
    assert got == [0]                       # samples 10..19 are the second batch
    ok = DistributedLoader(path, FakeComm(), batch_size=10, shuffle=False, validate=False)
    assert sum(1 for _ in ok) == 5          # validate=False serves what the file holds


def test_labels_out_of_range_are_refused(tmp_path):
    import h5py

    from mpifc.data.loader import check_rows

    path = _features(tmp_path)
    with h5py.File(path, "r+") as f:
        f["train/y"][12] = 9
    with pytest.raises(DatasetError, match=r"'/train/y'\[12\] = 9 is outside \[0, 4\)"):
        DistributedLoader(path, FakeComm(), batch_size=10)          # every label, at open
    # per batch (reads that did not go through the open check): the first bad sample
    y = np.array([1, 9, 2, -1])
    with pytest.raises(DatasetError, match=r"f\.h5: sample 40 has label -1, outside \[0, 4\)"):
        check_rows(np.zeros((4, 2), np.float32), y, np.array([41, 43, 42, 40]), 4, "f.h5")
