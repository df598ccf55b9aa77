"""Text loader: each dp rank's (tokens, offsets, labels) equal the serial slices of the batch.

Serial tests run at one rank; the ``mpi`` tests run under mpiexec at 1..4 ranks
(``scripts/test.sh``). Verdicts are agreed with an allgather before asserting, so a
failure on one rank fails every rank.
"""
import h5py
import numpy as np
import pytest

from mpifc.data.format import DatasetError
from mpifc.data.textformat import read_text_split, write_text_dataset

N = 37                        # prime: uneven shards and a short last batch for every P > 1


def ragged(n=N, seed=0, vocab=50):
    """Documents of 0..9 tokens (some empty); token 0 of document i is i % vocab when any."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 10, n)
    lens[[3, 4]] = 0
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tok = rng.integers(2, vocab, int(off[-1])).astype(np.int32)
    return tok, off, (np.arange(n) % 3).astype(np.int64)


def write_ragged(path, n=N, vocab=50, bad=None):
    tr, te = ragged(n, 0, vocab), ragged(7, 1, vocab)
    if bad is not None:                     # (document, id): an out-of-range token id
        doc, tid = bad
        tr[0][tr[1][doc]] = tid
        return _write_unchecked(path, tr, te, vocab)
    return write_text_dataset(path, {"train": tr, "test": te},
                              vocab=["<pad>", "<unk>"] + [f"w{i}" for i in range(vocab - 2)],
                              class_names=["a", "b", "c"], source="ragged test")


def _write_unchecked(path, tr, te, vocab):
    """A damaged file the writer would refuse: a good one, then ids patched by h5py."""
    import shutil

    good = str(path) + ".good.h5"
    write_text_dataset(good, {"train": (tr[0] % vocab, tr[1], tr[2]), "test": te},
                       vocab=["<pad>", "<unk>"] + [f"w{i}" for i in range(vocab - 2)],
                       class_names=["a", "b", "c"], source="ragged test")
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        f["train/tokens"][...] = tr[0]
    return str(path)


def serial_rows(path, plan, epoch, step, rank, split="train"):
    """What dp rank ``rank`` must get: the serial slice of the global batch."""
    tok, off, y = read_text_split(path, split)
    idx = plan.local_indices(epoch, step, rank)
    docs = [tok[off[i]:off[i + 1]] for i in idx]
    lens = [d.size for d in docs]
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if lens else \
        np.empty(0, np.int64)
    flat = np.concatenate(docs).astype(np.int64) if docs else np.empty(0, np.int64)
    return flat, starts, y[idx]


def same(batch, want) -> bool:
    (tokens, offsets), y = batch.x, batch.y
    return (tokens.dtype == np.int64 and offsets.dtype == np.int64
            and np.array_equal(tokens, want[0]) and np.array_equal(offsets, want[1])
            and np.array_equal(y, want[2]))


# ------------------------------------------------------------------ serial
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("batch_size", [1, 5, 37, 64])
def test_one_rank_rows_are_the_serial_batch(comm, tmp_path, cache, batch_size):
    from mpifc.data.loader import DistributedLoader

    path = write_ragged(tmp_path / "t.h5")
    with DistributedLoader(path, comm, batch_size=batch_size, seed=3, cache=cache) as ld:
        assert ld.text and ld.vocab_size == 50 and ld.sample_shape == ("tokens",)
        ld.set_position(1, 0)
        for b in ld:
            assert same(b, serial_rows(path, ld.plan, b.epoch, b.step, 0))


@pytest.mark.parametrize("slack", [0, 1 << 18])
def test_sparse_and_dense_reads_agree(tmp_path, monkeypatch, slack):
    """Documents far apart are read one by one, close ones as one hyperslab: same rows."""
    import mpifc.data.loader as L

    monkeypatch.setattr(L, "DENSE_SLACK_TOKENS", slack)
    path = write_ragged(tmp_path / "t.h5")
    tok, off, _ = read_text_split(path)
    idx = np.array([36, 0, 3, 17, 4, 35])
    with h5py.File(path, "r") as f:
        got, starts = L._read_docs(f["train"], idx)
    want = np.concatenate([tok[off[i]:off[i + 1]] for i in idx])
    assert np.array_equal(got, want) and got.dtype == np.int64
    assert np.array_equal(starts, np.concatenate([[0], np.cumsum(np.diff(off)[idx])[:-1]]))


@pytest.mark.parametrize("cache", [False, True])
def test_bad_token_id_names_file_split_document(comm, tmp_path, cache):
    from mpifc.data.loader import DistributedLoader

    path = write_ragged(tmp_path / "bad.h5", bad=(11, 50))
    with pytest.raises(DatasetError) as e:
        with DistributedLoader(path, comm, batch_size=N, cache=cache) as ld:
            next(iter(ld))
    msg = str(e.value)
    assert "bad.h5" in msg and "split 'train'" in msg and "document 11" in msg
    assert "token id 50" in msg and "[0, 50)" in msg and "\n" not in msg


def test_read_info_checks_token_ids(tmp_path):
    from mpifc.data.format import read_info

    path = write_ragged(tmp_path / "bad.h5", bad=(20, -1))
    with pytest.raises(DatasetError, match=r"split 'train': document 20 has token id -1"):
        read_info(path)


def test_writer_refuses_bad_offsets(tmp_path):
    tok, off, y = ragged()
    off[5] = off[6] + 1
    with pytest.raises(DatasetError, match="offsets must be"):
        write_text_dataset(tmp_path / "x.h5", {"train": (tok, off, y), "test": ragged(7, 1)},
                           vocab=["<pad>", "<unk>"] + ["w"] * 48, class_names="abc", source="")
    assert not (tmp_path / "x.h5").exists()


# ------------------------------------------------------------------ MPI
def shared(comm, mpi_tmp_path, name="ragged.h5", **kw):
    path = str(mpi_tmp_path / name)
    if comm.rank == 0:
        write_ragged(path, **kw)
    comm.barrier()
    return path


def agree(comm, ok, detail=""):
    verdicts = comm.allgather_obj((bool(ok), detail))
    return [(r, d) for r, (o, d) in enumerate(verdicts) if not o]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("mode", ["slice", "scatter"])
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("batch_size", [1, 5, 8, 37, 64])
def test_rows_equal_serial_slices(comm, mpi_tmp_path, mode, cache, batch_size):
    from mpifc.data.loader import DistributedLoader

    path = shared(comm, mpi_tmp_path)
    ok, detail = True, ""
    with DistributedLoader(path, comm, batch_size=batch_size, seed=4, mode=mode, cache=cache,
                           root=comm.size - 1) as ld:
        ld.set_position(2, 0)
        steps = 0
        for b in ld:
            steps += 1
            if not same(b, serial_rows(path, ld.plan, b.epoch, b.step, comm.rank)):
                ok, detail = False, f"step {b.step} differs"
    ok = ok and steps == -(-N // batch_size)
    bad = agree(comm, ok, detail)
    assert not bad, f"failed on ranks {bad}"


@pytest.mark.mpi(min_size=2)
def test_slice_equals_scatter_test_split(comm, mpi_tmp_path):
    from mpifc.data.loader import DistributedLoader

    path = shared(comm, mpi_tmp_path)
    got = {}
    for mode in ("slice", "scatter"):
        with DistributedLoader(path, comm, split="test", batch_size=4, shuffle=False,
                               mode=mode) as ld:
            got[mode] = [(b.x[0].tolist(), b.x[1].tolist(), b.y.tolist()) for b in ld]
    bad = agree(comm, got["slice"] == got["scatter"], "slice != scatter")
    assert not bad, f"failed on ranks {bad}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["slice", "scatter"])
def test_bad_token_fails_every_rank_with_one_message(comm, mpi_tmp_path, mode):
    """cache=True (as the trainer loads): checked at construction and agreed; scatter
    without cache: the root's verdict travels with the counts. No rank hangs."""
    from mpifc.data.loader import DistributedLoader

    path = shared(comm, mpi_tmp_path, "bad.h5", bad=(30, 99))
    msgs = []
    for cache in ((True, False) if mode == "scatter" else (True,)):
        try:
            with DistributedLoader(path, comm, batch_size=N, mode=mode, cache=cache) as ld:
                next(iter(ld))
            msgs.append(None)
        except DatasetError as e:
            msgs.append(str(e))
    everyone = comm.allgather_obj(msgs)
    ok = all(m is not None and "document 30 has token id 99" in m for m in msgs)
    bad = agree(comm, ok and all(e == everyone[0] for e in everyone), str(msgs))
    assert not bad, f"failed on ranks {bad}"
