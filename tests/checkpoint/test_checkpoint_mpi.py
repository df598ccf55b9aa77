"""Checkpoints across ranks: save under one dp x tp layout, load under another, bit for bit.

Run: ``mpiexec -n N python -m mpi4py -m pytest --with-mpi --only-mpi tests/checkpoint``,
N = 1..4. Every rank computes the full reference tensors from the seed, so each can
check the slice its NEW layout asks for. Collectives first, asserts last.
"""
import os

import h5py
import numpy as np
import pytest

from mpifc.checkpoint import CheckpointError, load, save, set_rng_state
from mpifc.comm import Grid
from mpifc.optim import Adam

from ckpt_helpers import ToyModel, expected_local, full_state, local_state, mismatches, trained


def layouts(size):
    """Every (dp, tp) with dp * tp = size."""
    return [(size // tp, tp) for tp in range(1, size + 1) if size % tp == 0]


def _reference(seed):
    m, opt = trained(seed)               # unsharded: the serial twin
    return full_state(m, opt)


def _fresh(grid, seed=99):
    m = ToyModel(seed, grid.tp_comm)
    return m, Adam(m.named_parameters(), lr=1.0, weight_decay=0.1)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("mode", ["gather", "per-rank"])
def test_every_layout_to_every_layout(mpi_tmp_path, comm, mode):
    """Save under each dp x tp of the job, load under each: tp P -> 1, dp 1 -> P, 1 -> 3 uneven."""
    ref = _reference(7)
    failures = []
    for dps, tps in layouts(comm.size):
        gs = Grid(comm, dps, tps)
        m, opt = trained(7, gs.tp_comm)
        d = mpi_tmp_path / f"{mode}-dp{dps}-tp{tps}"
        path = save(d, m, opt, gs, step=3, epoch=1, mode=mode)
        saved_ok = not mismatches(local_state(m, opt), expected_local(ref, m))
        for dpl, tpl in layouts(comm.size):
            gl = Grid(comm, dpl, tpl)
            m2, opt2 = _fresh(gl)
            meta = load(path, m2, opt2, gl)
            bad = mismatches(local_state(m2, opt2), expected_local(ref, m2))
            if bad or not saved_ok or meta["layout"] != {"world": comm.size, "dp": dps, "tp": tps}:
                failures.append(f"dp{dps}xtp{tps} -> dp{dpl}xtp{tpl}: {bad[:4]}")
            if (opt2.lr, opt2.step_count) != (opt.lr, opt.step_count):
                failures.append(f"dp{dps}xtp{tps} -> dp{dpl}xtp{tpl}: lr/step")
    if comm.rank == 0:
        print("reshard", mode, "OK" if not failures else failures)
    assert not failures, failures


@pytest.mark.mpi(min_size=2)
def test_tp_to_serial_and_file_holds_full_tensors(mpi_tmp_path, comm):
    """tp = P checkpoint: the file holds the serial model's tensors; a serial model loads it."""
    P = comm.size
    g = Grid(comm, 1, P)
    m, opt = trained(5, g.tp_comm)
    path = save(mpi_tmp_path / "tp", m, opt, g, step=8)
    ref = _reference(5)
    # a per-rank model built serially (dp = P, tp = 1, no sharding at all)
    gd = Grid(comm, P, 1)
    serial = ToyModel(0)
    sopt = Adam(serial.named_parameters(), lr=1.0, weight_decay=0.1)
    load(path, serial, sopt, gd)
    bad = mismatches(full_state(serial, sopt), ref)
    file_bad, counts = [], None
    if comm.rank == 0:
        with h5py.File(path) as f:
            for key, want in ref.items():
                ds = f[("params/" if "/" not in key and not key.startswith("bn.") else
                        "buffers/" if key.startswith("bn.") else "optimizer/") + key]
                if ds[...].tobytes() != want.tobytes():
                    file_bad.append(key)
            counts = list(f["params/fc2.weight"].attrs["sharding_counts"])
    counts = comm.bcast_obj(counts)
    assert not bad, bad
    assert not file_bad, file_bad
    assert sum(counts) == 7 and len(counts) == P and max(counts) - min(counts) <= 1


@pytest.mark.mpi(min_size=3)
def test_uneven_tp3_round_trip_and_rng(mpi_tmp_path, comm):
    """tp = 3 (uneven, an empty shard of head.weight when P = 4 splits 2 rows): same layout
    round trip, each rank gets its own generator states back."""
    P = comm.size
    g = Grid(comm, 1, P)
    m, opt = trained(9, g.tp_comm)
    rng = np.random.default_rng(100 + comm.rank)
    d = mpi_tmp_path / "uneven"
    save(d, m, opt, g, step=1, rng_states={"dropout": rng}, data_position={"epoch": 0, "step": 1})
    m2, opt2 = _fresh(g)
    meta = load(d, m2, opt2, g)
    r2 = np.random.default_rng(0)
    set_rng_state(r2, meta["rng_states"]["dropout"])
    same_rng = r2.random(3).tobytes() == rng.random(3).tobytes()
    bad = mismatches(local_state(m2, opt2), local_state(m, opt))
    # another layout: no per-rank RNG state to return
    gd = Grid(comm, P, 1)
    m3, opt3 = _fresh(gd)
    meta3 = load(d, m3, opt3, gd)
    assert not bad, bad
    assert same_rng and meta["data_position"] == {"epoch": 0, "step": 1}
    assert meta3["rng_states"] is None
    assert m.named_parameters()[0][1].sharding.counts == tuple(
        7 // P + (1 if i < 7 % P else 0) for i in range(P))


@pytest.mark.mpi(min_size=2)
def test_damaged_checkpoint_refused_on_every_rank(mpi_tmp_path, comm):
    P = comm.size
    g = Grid(comm, 1, P)
    m, opt = trained(5, g.tp_comm)
    path = save(mpi_tmp_path / "bad", m, opt, g, step=2)
    if comm.rank == 0:                  # flip one bit of a tensor on disk
        with h5py.File(path) as f:
            off = f["params/fc2.weight"].id.get_offset()
        with open(path, "r+b") as fh:
            fh.seek(off)
            b = fh.read(1)
            fh.seek(off)
            fh.write(bytes([b[0] ^ 1]))
    comm.barrier()
    m2, opt2 = _fresh(g)
    before = local_state(m2, opt2)
    errors = []
    for target in (path, mpi_tmp_path / "missing.h5"):
        try:
            load(target, m2, opt2, g)
            errors.append(None)
        except CheckpointError as exc:
            errors.append(str(exc))
    if comm.rank == 0:                  # truncate it: still refused everywhere
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    comm.barrier()
    try:
        load(path, m2, opt2, g)
        errors.append(None)
    except CheckpointError as exc:
        errors.append(str(exc))
    untouched = not mismatches(local_state(m2, opt2), before)
    assert errors[0] and "digest mismatch" in errors[0] and "params/fc2.weight" in errors[0]
    assert errors[1] and "no such checkpoint file" in errors[1]
    assert errors[2] and ("truncated" in errors[2] or "damaged" in errors[2])
    assert untouched


@pytest.mark.mpi(min_size=2)
def test_write_failure_on_root_fails_every_rank_and_keeps_previous(mpi_tmp_path, comm,
                                                                    monkeypatch):
    P = comm.size
    g = Grid(comm, 1, P)
    m, opt = trained(5, g.tp_comm)
    d = mpi_tmp_path / "fail"
    save(d, m, opt, g, step=1)
    if comm.rank == 0:                  # only the writer fails, in the middle of the tensors
        real, n = h5py.Dataset.__setitem__, [0]

        def failing(self, key, value):
            n[0] += 1
            if n[0] == 4:
                raise OSError("injected: quota exceeded")
            return real(self, key, value)

        monkeypatch.setattr(h5py.Dataset, "__setitem__", failing)
    m_new, opt_new = trained(6, g.tp_comm)
    err = None
    try:
        save(d, m_new, opt_new, g, step=2)
    except CheckpointError as exc:
        err = str(exc)
    monkeypatch.undo()
    listing = comm.bcast_obj(sorted(os.listdir(d)) if comm.rank == 0 else None)
    m2, opt2 = _fresh(g)
    meta = load(d, m2, opt2, g)
    bad = mismatches(local_state(m2, opt2), local_state(m, opt))
    assert err and "injected: quota exceeded" in err
    assert listing == ["ckpt-000001.h5"]
    assert meta["step"] == 1 and not bad


@pytest.mark.mpi(min_size=2)
def test_inconsistent_sharding_is_refused_on_every_rank(mpi_tmp_path, comm):
    """A shard whose size contradicts its Sharding on ONE rank fails all ranks, no hang."""
    from mpifc.nn.module import Sharding

    g = Grid(comm, 1, comm.size)
    m, opt = trained(5, g.tp_comm)
    if comm.rank == comm.size - 1:
        p = m.named_parameters()[0][1]
        sh = p.sharding
        p.sharding = Sharding(sh.axis, sh.group, tuple(reversed(sh.counts)) if sh.counts[0] !=
                              sh.counts[-1] else sh.counts[:-1] + (sh.counts[-1] + 1,),
                              sh.index, sh.global_shape)
    err = None
    try:
        save(mpi_tmp_path / "inconsistent", m, opt, g, step=1)
    except CheckpointError as exc:
        err = str(exc)
    assert err and f"rank {comm.size - 1}" in err and "fc1.weight" in err
