"""Signed checkpoints on every rank: a good one loads, each tampered one is refused everywhere.

Run at 1, 2, 3 and 4 ranks by scripts/test.sh. Rank 0 signs (inside the collective
save) and tampers; every rank then loads with the trusted public key and must raise
the same CheckpointError, naming its own reason, before any tensor changes.
"""
import pytest

pytest.importorskip("cryptography")

from sign_helpers import REASONS, ToyModel, keypair, own_reason, tamper, trained  # noqa: E402

from mpifc.checkpoint import CheckpointError, load, save  # noqa: E402
from mpifc.comm import Grid  # noqa: E402
from mpifc.optim import Adam  # noqa: E402


def _keys(comm, d):
    got = keypair(d / "keys") + keypair(d / "other") if comm.rank == 0 else None
    return comm.bcast_obj(got)


def _fresh(g):
    m = ToyModel(99, g.tp_comm)
    return m, Adam(m.named_parameters(), lr=1.0)


def _snapshot(m):
    return [p.data.tobytes() for _, p in m.named_parameters()]


@pytest.mark.mpi(min_size=1)
def test_signed_checkpoint_loads_on_every_rank(mpi_tmp_path, comm):
    priv, pub, fp, *_ = _keys(comm, mpi_tmp_path)
    g = Grid(comm, 1, comm.size)
    m, opt = trained(5, g.tp_comm)
    path = save(mpi_tmp_path / "good", m, opt, g, step=2, sign_key=priv)
    m2, opt2 = _fresh(g)
    meta = load(path, m2, opt2, g, verify_key=pub)
    assert _snapshot(m2) == _snapshot(m) and meta["step"] == 2


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("case", list(REASONS))
def test_tampered_checkpoint_refused_on_every_rank(mpi_tmp_path, comm, case):
    priv, pub, fp, priv2, _, _ = _keys(comm, mpi_tmp_path)
    g = Grid(comm, 1, comm.size)
    m, opt = trained(5, g.tp_comm)
    path = save(mpi_tmp_path / "ckpt", m, opt, g, step=2, sign_key=priv)
    if comm.rank == 0:
        tamper(case, path, priv2)
    comm.barrier()
    m2, opt2 = _fresh(g)
    before = _snapshot(m2)
    try:
        load(path, m2, opt2, g, verify_key=pub)
        msg = None
    except CheckpointError as e:
        msg = str(e)
    msgs = comm.allgather_obj(msg)
    if comm.rank == 0:
        print(case, "->", msgs[0])
    assert all(x == msgs[0] for x in msgs), msgs
    assert msg is not None and own_reason(case, msg), msg
    assert _snapshot(m2) == before


@pytest.mark.mpi(min_size=2)
def test_missing_verify_key_fails_every_rank(mpi_tmp_path, comm):
    g = Grid(comm, 1, comm.size)
    m, opt = trained(5, g.tp_comm)
    path = save(mpi_tmp_path / "k", m, opt, g, step=1)
    with pytest.raises(CheckpointError, match="public key .*nope.pub: cannot be read"):
        load(path, m, opt, g, verify_key=str(mpi_tmp_path / "nope.pub"))
