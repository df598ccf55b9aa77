"""Loader on real ranks: slice mode == scatter mode, epoch covered exactly once, tp groups agree.

Run: ``mpiexec -n N python -m mpi4py -m pytest --with-mpi tests/data`` for N = 1..4.
Each test computes its checks, agrees on the verdict with an allgather, then asserts,
so a failure on one rank fails every rank instead of leaving others in a collective.
"""
import numpy as np
import pytest

from mpifc.data.format import write_dataset

N = 37                      # prime: uneven shards and a short last batch for every P > 1


def shared_file(comm, mpi_tmp_path, kind):
    """Rank 0 writes a dataset whose values encode the sample id; all ranks get the path."""
    path = str(mpi_tmp_path / f"ids_{kind}.h5")
    if comm.rank == 0:
        ids = np.arange(N)
        if kind == "images":         # uint8 (N, 2, 3, 3): pixel [0, 0, 0] is the id
            x = np.random.default_rng(0).integers(0, 256, (N, 2, 3, 3), dtype=np.uint8)
            x[:, 0, 0, 0] = ids
        else:                        # float32 (N, 5): feature 0 is the id
            x = np.random.default_rng(0).standard_normal((N, 5)).astype(np.float32)
            x[:, 0] = ids
        write_dataset(path, (x, ids % 3), (x[:7], ids[:7] % 3), class_names="abc", source="ids")
    comm.barrier()
    return path


def agree(comm, ok, detail=""):
    """Collective verdict: True only when every rank's ``ok`` holds."""
    verdicts = comm.allgather_obj((bool(ok), detail))
    bad = [(r, d) for r, (o, d) in enumerate(verdicts) if not o]
    return not bad, bad


def epoch_batches(loader):
    return [(b.x.copy(), b.y.copy(), b.global_size) for b in loader]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("kind", ["images", "features"])
@pytest.mark.parametrize("batch_size", [1, 5, 8, 37, 64])
def test_slice_equals_scatter_and_covers_epoch(comm, mpi_tmp_path, kind, batch_size):
    from mpifc.data.loader import DistributedLoader

    path = shared_file(comm, mpi_tmp_path, kind)
    got = {}
    for mode in ("slice", "scatter"):
        with DistributedLoader(path, comm, batch_size=batch_size, seed=4, mode=mode,
                               root=comm.size - 1) as ld:
            ld.set_position(2, 0)
            got[mode] = epoch_batches(ld)
            steps = len(ld)
    with DistributedLoader(path, comm, batch_size=batch_size, seed=4, normalise=False) as raw:
        raw.set_position(2, 0)
        mine = [b.x.reshape(len(b.x), int(np.prod(b.x.shape[1:])))[:, 0].astype(np.int64).tolist() for b in raw]
    same = len(got["slice"]) == len(got["scatter"]) == steps and all(
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
        for a, b in zip(got["slice"], got["scatter"]))
    # every rank ran the same number of steps; the union over ranks is the epoch, once
    all_ids = comm.allgather_obj(mine)
    steps_all = comm.allgather_obj(steps)
    flat = [i for rank_ids in all_ids for step_ids in rank_ids for i in step_ids]
    once = sorted(flat) == list(range(N))
    ok, bad = agree(comm, same and once and len(set(steps_all)) == 1,
                    f"same={same} once={once} steps={steps_all}")
    assert ok, f"failed on ranks {bad}"
    assert steps == -(-N // batch_size)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["slice", "scatter"])
def test_drop_last_same_steps_no_repeats(comm, mpi_tmp_path, mode):
    from mpifc.data.loader import DistributedLoader

    path = shared_file(comm, mpi_tmp_path, "features")
    with DistributedLoader(path, comm, batch_size=10, seed=0, mode=mode, drop_last=True,
                           normalise=False) as ld:
        mine = [b.x[:, 0].astype(np.int64).tolist() for b in ld]
    all_ids = comm.allgather_obj(mine)
    flat = [i for r in all_ids for s in r for i in s]
    ok, bad = agree(comm, len(mine) == 3 and len(flat) == len(set(flat)) == 30,
                    f"steps={len(mine)} samples={len(flat)} unique={len(set(flat))}")
    assert ok, f"failed on ranks {bad}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["slice", "scatter"])
def test_tensor_parallel_ranks_see_the_same_batch(comm, mpi_tmp_path, mode):
    from mpifc.comm import Grid
    from mpifc.data.loader import DistributedLoader

    if comm.size % 2:
        pytest.skip("needs an even number of ranks for tp=2")
    path = shared_file(comm, mpi_tmp_path, "images")
    grid = Grid(comm, dp=comm.size // 2, tp=2)
    with DistributedLoader(path, grid.dp_comm, batch_size=6, seed=2, mode=mode) as ld:
        digest = [b.x.tobytes() + b.y.tobytes() for b in ld]
    everyone = comm.allgather_obj((grid.dp_rank, digest))
    partner = [d for r, (dp, d) in enumerate(everyone) if dp == grid.dp_rank and r != comm.rank]
    ok, bad = agree(comm, len(partner) == 1 and partner[0] == digest,
                    f"dp_rank {grid.dp_rank}: batch differs from its tp partner")
    assert ok, f"failed on ranks {bad}"


@pytest.mark.mpi(min_size=2)
def test_missing_file_fails_every_rank(comm, mpi_tmp_path):
    from mpifc.data.format import DatasetError
    from mpifc.data.loader import DistributedLoader

    good = shared_file(comm, mpi_tmp_path, "features")
    # only the last rank is pointed at a file that does not exist
    path = good if comm.rank != comm.size - 1 else str(mpi_tmp_path / "missing.h5")
    try:
        DistributedLoader(path, comm, batch_size=4)
        msg = None
    except DatasetError as e:
        msg = str(e)
    ok, bad = agree(comm, msg is not None and f"rank {comm.size - 1}:" in msg, str(msg))
    assert ok, f"failed on ranks {bad}"
