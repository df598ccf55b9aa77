"""Checkpoints of a text model with a vocab-sharded table: the file holds the full
(V, D) table with its sharding attributes; tp = P -> dp = P (serial tables) and back
resume bit for bit, and training continues with the same losses."""
import h5py
import numpy as np
import pytest

from mpifc.checkpoint import load, save
from mpifc.models import build_model
from mpifc.optim import Adam
from mpifc.parallel import DataParallel

from test_embedding_model import MODELS, V, grid_of, run, self_grid, documents, rows, train_step


def _full(net, comm_grid):
    """{name: full tensor} of a model's parameters (gathered by hand from the shards)."""
    out = {}
    for name, p in net.named_parameters():
        if p.sharding is None:
            out[name] = np.asarray(p.data)
        else:
            parts = comm_grid.tp_comm.allgather_obj(np.asarray(p.data))
            out[name] = np.concatenate(parts, axis=p.sharding.axis)
    return out


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_vocab_sharded_table_reshards(mpi_tmp_path, comm, model):
    P = comm.size
    cfg = MODELS[model]
    gt, gd = grid_of(comm, 1, P), grid_of(comm, P, 1)
    net, _ = run(cfg, gt, np.float64, steps=3)
    dp = DataParallel(net, gt.dp_comm)
    opt = Adam(net.named_parameters(), lr=0.02)
    # one more step so the optimizer has state, then save under tp = P
    docs, y = documents(3)
    train_step(net, dp, opt, gt, *rows(gt, docs, y))
    path = save(mpi_tmp_path / f"tp-{model}", net, opt, gt, step=4)
    full = _full(net, gt)
    attrs = None
    if comm.rank == 0:
        with h5py.File(path) as f:
            ds = f["params/emb1.weight"]
            attrs = (ds.shape, int(ds.attrs["sharding_axis"]),
                     [int(c) for c in ds.attrs["sharding_counts"]],
                     bool(np.array_equal(ds[...], full["emb1.weight"])))
    attrs = comm.bcast_obj(attrs)
    assert attrs[0] == (V, MODELS[model]["layers"][0]["dim"]) and attrs[1] == 0
    assert sum(attrs[2]) == V and len(attrs[2]) == P and max(attrs[2]) - min(attrs[2]) <= 1
    assert attrs[3], "the file holds the full table"

    # load under dp = P: every rank gets the whole table (serial EmbeddingBag)
    net_d = build_model(cfg, gd, seed=99, dtype=np.float64)
    opt_d = Adam(net_d.named_parameters(), lr=0.02)
    load(path, net_d, opt_d, gd)
    assert type(net_d.layers[0]).__name__ == "EmbeddingBag"
    got = dict(net_d.named_parameters())
    bad = [n for n, w in full.items() if not np.array_equal(got[n].data, w)]
    assert not bad, bad
    # and back to tp = P from the dp copy: the same shards as before
    path2 = save(mpi_tmp_path / f"dp-{model}", net_d, opt_d, gd, step=4)
    net_t = build_model(cfg, gt, seed=98, dtype=np.float64)
    opt_t = Adam(net_t.named_parameters(), lr=0.02)
    load(path2, net_t, opt_t, gt)
    mine = dict(net.named_parameters())
    bad = [n for n, p in net_t.named_parameters() if not np.array_equal(p.data, mine[n].data)]
    assert not bad, bad
    # resume: the next steps give the same loss on both layouts and the uninterrupted one
    dp_d, dp_t = DataParallel(net_d, gd.dp_comm), DataParallel(net_t, gt.dp_comm)
    for s in range(4, 6):
        docs, y = documents(s)
        a = train_step(net, dp, opt, gt, *rows(gt, docs, y))
        b = train_step(net_t, dp_t, opt_t, gt, *rows(gt, docs, y))
        c = train_step(net_d, dp_d, opt_d, gd, *rows(gd, docs, y))
        assert a == b and abs(a - c) <= 1e-12, (s, a, b, c)
