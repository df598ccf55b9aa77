"""Augmented global batches on real ranks equal the dp=1 ones (issue 18 item 3).

Run: ``mpiexec -n N python -m mpi4py -m pytest --with-mpi tests/data`` for N = 1..4.
The reference is a one-rank loader (``comm.split``: each rank alone) reading the
same file; the ranks' rows, gathered in rank order, must equal it in every mode
(slice, scatter, cached or not), with and without validation rows, and from a
mid-epoch resume position.
"""
import numpy as np
import pytest

from mpifc.data.augment import Augment
from mpifc.data.format import write_dataset
from mpifc.data.validation import split_rows

N = 41                      # prime: uneven shards and a short last batch for every P > 1
pytestmark = pytest.mark.mpi(min_size=1)


def _file(comm, mpi_tmp_path):
    path = str(comm.bcast_obj(str(mpi_tmp_path / "aug.h5")))
    if comm.rank == 0:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (N, 3, 6, 7), dtype=np.uint8)
        y = np.arange(N) % 5
        write_dataset(path, (x, y), (x[:6], y[:6]), class_names="abcde", source="aug")
    comm.barrier()
    return path


def _epoch(loader, epoch, first=0):
    loader.set_position(epoch, first)
    return [(b.x.copy(), b.y.copy()) for b in loader]


def _agree(comm, ok, detail):
    verdicts = comm.allgather_obj((bool(ok), detail))
    return [(r, d) for r, (o, d) in enumerate(verdicts) if not o]


@pytest.mark.parametrize("mode, cache", [("slice", False), ("slice", True),
                                         ("scatter", False), ("scatter", True)])
@pytest.mark.parametrize("holdout", [0.0, 0.2])
def test_gathered_augmented_batches_equal_dp1(comm, mpi_tmp_path, mode, cache, holdout):
    from mpifc.data.loader import DistributedLoader

    path = _file(comm, mpi_tmp_path)
    aug = Augment(("crop", "flip"), pad=3, seed=11)
    rows = split_rows(N, holdout)[0] if holdout else None
    kw = dict(batch_size=8, seed=11, augment=aug, rows=rows)
    alone = comm.split(comm.rank)                   # dp = 1: this rank alone
    with DistributedLoader(path, alone, **kw) as ref_ld:
        ref = _epoch(ref_ld, 2)
        ref_resumed = _epoch(ref_ld, 2, first=2)
    with DistributedLoader(path, comm, mode=mode, cache=cache, **kw) as ld:
        mine = _epoch(ld, 2)
        resumed = _epoch(ld, 2, first=2)            # resume mid-epoch: same augmented batches
    problems = []
    for name, got, want in (("epoch", mine, ref), ("resumed", resumed, ref_resumed)):
        parts = comm.allgather_obj(got)             # per rank: [(x, y) per step]
        if len(got) != len(want):
            problems.append(f"{name}: {len(got)} steps, dp=1 has {len(want)}")
            continue
        for s, (wx, wy) in enumerate(want):
            gx = np.concatenate([p[s][0] for p in parts])
            gy = np.concatenate([p[s][1] for p in parts])
            if not (np.array_equal(gx, wx) and np.array_equal(gy, wy)):
                problems.append(f"{name} step {s} differs")
    if not all(np.array_equal(a[0], b[0]) for a, b in zip(resumed, mine[2:])):
        problems.append("resumed batches differ from the same steps of the whole epoch")
    changed = any(not np.array_equal(a[0], b[0]) for a, b in zip(ref, _plain(path, alone, rows)))
    bad = _agree(comm, not problems and changed, f"{problems[:3]} changed={changed}")
    assert not bad, f"failed on ranks {bad}"


def _plain(path, alone, rows):
    """The same epoch without augmentation (to show augmentation changed something)."""
    from mpifc.data.loader import DistributedLoader

    with DistributedLoader(path, alone, batch_size=8, seed=11, rows=rows) as ld:
        return _epoch(ld, 2)


@pytest.mark.parametrize("mode, cache", [("slice", False), ("scatter", False), ("slice", True)])
def test_text_rows_subset_equals_dp1(comm, mpi_tmp_path, mode, cache):
    """Text documents of a validation-style row subset: gathered == one rank, any mode."""
    from mpifc.data.loader import DistributedLoader
    from mpifc.data.textformat import write_text_dataset

    path = str(comm.bcast_obj(str(mpi_tmp_path / "text.h5")))
    if comm.rank == 0:
        rng = np.random.default_rng(0)
        lens = rng.integers(0, 9, N)
        off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        tok = rng.integers(2, 30, int(off[-1])).astype(np.int32)
        y = np.arange(N) % 3
        write_text_dataset(path, {"train": (tok, off, y), "test": (tok[:off[5]], off[:6], y[:5])},
                           vocab=["<pad>", "<unk>"] + [f"w{i}" for i in range(28)],
                           class_names="abc", source="t")
    comm.barrier()
    rows = split_rows(N, 0.3)[1]
    kw = dict(batch_size=5, seed=2, rows=rows)

    def docs(ld):
        out = []
        for b in ld:
            tok, starts = b.x
            ends = np.append(starts[1:], tok.size)
            out.append([(tok[s:e].tolist(), int(c)) for s, e, c in zip(starts, ends, b.y)])
        return out

    with DistributedLoader(path, comm.split(comm.rank), **kw) as ld:
        want = docs(ld)
    with DistributedLoader(path, comm, mode=mode, cache=cache, **kw) as ld:
        mine = docs(ld)
    parts = comm.allgather_obj(mine)
    got = [sum((p[s] for p in parts), []) for s in range(len(want))]
    ok = got == want and sorted(c for step in want for _, c in step) == sorted(rows % 3)
    bad = _agree(comm, ok, "text batches differ")
    assert not bad, f"failed on ranks {bad}"
