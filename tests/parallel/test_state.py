"""gather_state / scatter_state: full tensors of a sharded model on one rank, and back.

Oracle: the serial twin (the same model and seed on a 1x1 grid of this rank alone).
Its state -- parameters and BatchNorm running statistics, after one training-mode
forward of the whole global batch -- must equal what gather_state assembles from
every dp x tp layout of the job (the layout's dp ranks forward their rows of that
batch: SyncBatchNorm gives the same statistics), with the serial names and shapes.
Models: the MLP and the digits CNN of test_models (split BatchNorm channels under
tp: sharded buffers), and an MLP built by hand from column/row-parallel layers (no
``.grid``: the grid is inferred from its shardings). 1, 2, 3 (uneven) and 4 ranks.
"""
import numpy as np
import pytest

import mpifc
from mpifc import nn
from mpifc.comm import Grid, balanced_counts
from mpifc.models import build_model
from mpifc.nn import ShapeError
from mpifc.parallel import ColumnParallelLinear, RowParallelLinear
from mpifc.parallel.init import local_slice
from mpifc.state import model_grid

from test_models import B, MODELS, batch, grid_of, layouts, rows, self_grid

pytestmark = pytest.mark.mpi(min_size=1)
KINDS = ("mlp", "cnn", "by-hand")
TOL = 1e-5       # float32: BatchNorm statistics summed in another order


def by_hand(tp_comm, seed, serial=False):
    """12 -> 20 (column, split output) -> relu -> 14 (row) -> relu -> 10 (column, gathered)."""
    def rng(i):
        return np.random.default_rng([seed, i])

    if serial:
        col = lambda d, f, i, **kw: nn.Linear(d, f, rng=rng(i))     # noqa: E731
        row = col
    else:
        col = lambda d, f, i, **kw: ColumnParallelLinear(d, f, tp_comm, rng=rng(i), **kw)  # noqa: E731
        row = lambda d, f, i: RowParallelLinear(d, f, tp_comm, rng=rng(i))                  # noqa: E731
    return nn.Sequential(col(12, 20, 0), nn.ReLU(), row(20, 14, 2), nn.ReLU(),
                         col(14, 10, 4, gather_output=True))


def build(kind, grid, seed, serial=False):
    if kind == "by-hand":
        return by_hand(grid.tp_comm, seed, serial)
    return build_model(MODELS[kind], grid, seed=seed)


def input_cfg(kind):
    return MODELS["mlp" if kind == "by-hand" else kind]


def serial_state(model) -> dict:
    return {**{n: p.data.copy() for n, p in model.named_parameters()},
            **{n: np.array(b, copy=True) for n, b in model.buffers()}}


def compare(got, want, tol=TOL):
    """Problems (names, shapes, max differences) between two states, [] when equal."""
    if set(got) != set(want):
        return [f"names differ: {sorted(set(got) ^ set(want))}"]
    bad = [f"{k}: shape {got[k].shape} vs {want[k].shape}" for k in want
           if got[k].shape != want[k].shape]
    bad += [f"{k}: maxdiff {np.abs(got[k] - want[k]).max():.2e}" for k in want
            if got[k].shape == want[k].shape and got[k].size
            and np.abs(got[k].astype(np.float64) - want[k]).max() > tol]
    return bad


def forward_rows(model, kind, grid):
    """One training-mode forward of this dp rank's rows of the global batch (BN stats)."""
    x, y = batch(input_cfg(kind), 0, np.float32)
    xr, _ = rows(grid, x, y)
    model.train()
    return model.forward(xr)


@pytest.mark.parametrize("kind", KINDS)
def test_gather_equals_the_serial_state(comm, kind):
    serial = build(kind, self_grid(comm), seed=7, serial=True)
    x, _ = batch(input_cfg(kind), 0, np.float32)
    serial.forward(x)                     # the whole batch: running stats move
    want = serial_state(serial)
    for dp, tp in layouts(comm.size):
        grid = grid_of(comm, dp, tp)
        model = build(kind, grid, seed=7)
        forward_rows(model, kind, grid)
        root = comm.size - 1              # any rank may receive the state
        got = mpifc.gather_state(model, root=root, grid=None if kind == "by-hand" else grid)
        if comm.rank == root:
            bad = compare(got, want)
            assert not bad, (dp, tp, bad)
            print(f"OK dp={dp} tp={tp} {kind}: {len(got)} tensors, maxdiff "
                  f"{max(float(np.abs(got[k] - want[k]).max()) for k in want if want[k].size):.2e}")
        else:
            assert got is None


@pytest.mark.parametrize("kind", KINDS)
def test_scatter_then_gather_round_trips(comm, kind):
    for dp, tp in layouts(comm.size):
        grid = grid_of(comm, dp, tp)
        model = build(kind, grid, seed=1)
        state = mpifc.gather_state(model, grid=grid)
        if comm.rank == 0:                # another state: every value changed
            rng = np.random.default_rng(5)
            state = {k: (v + rng.standard_normal(v.shape)).astype(v.dtype)
                     for k, v in state.items()}
        mpifc.scatter_state(model, state, grid=grid)
        back = mpifc.gather_state(model, grid=grid)
        if comm.rank == 0:
            assert not compare(back, state, tol=0.0), (dp, tp)


@pytest.mark.parametrize("kind", KINDS)
def test_a_serial_state_scattered_gives_the_serial_forward(comm, kind):
    """The serial model's state (trained BN statistics) into a layout built from another
    seed: in eval mode (running statistics) its logits are the serial logits."""
    serial = build(kind, self_grid(comm), seed=3, serial=True)
    x, y = batch(input_cfg(kind), 0, np.float32)
    serial.forward(x)
    serial.eval()
    want = serial.forward(x)
    state = serial_state(serial)
    for dp, tp in layouts(comm.size):
        grid = grid_of(comm, dp, tp)
        model = build(kind, grid, seed=11)
        mpifc.scatter_state(model, state if comm.rank == 0 else None, grid=grid)
        model.eval()
        xr, _ = rows(grid, x, y)
        got = model.forward(xr)
        counts, displs = balanced_counts(B, grid.dp)      # this dp rank's rows of the batch
        wrows = want[displs[grid.dp_rank]:displs[grid.dp_rank] + counts[grid.dp_rank]]
        if got.shape[1] != wrows.shape[1]:      # class-split logits: this rank's classes
            wrows = wrows[:, local_slice(wrows.shape[1], grid.tp_comm)]
        assert np.abs(got - wrows).max() < TOL, (dp, tp, np.abs(got - wrows).max())


def test_scatter_refuses_a_state_that_does_not_fit(comm):
    grid = grid_of(comm, 1, comm.size)
    model = build("mlp", grid, seed=0)
    state = mpifc.gather_state(model, grid=grid)
    if comm.rank == 0:
        name = next(iter(state))
        del state[name]
        state["fc9.weight"] = np.zeros(3)
    with pytest.raises(ShapeError, match=r"scatter_state: the state does not fit the model: "
                                         r"missing: fc1.weight; not in the model: fc9.weight"):
        mpifc.scatter_state(model, state, grid=grid)


def test_a_serial_model_has_a_grid_of_its_own(comm):
    """No shardings: gather_state needs no grid and returns the root's own copy."""
    model = by_hand(None, 0, serial=True)
    got = mpifc.gather_state(model)
    if comm.rank == 0:
        assert not compare(got, serial_state(model), tol=0.0)
    assert isinstance(model_grid(model), Grid)
