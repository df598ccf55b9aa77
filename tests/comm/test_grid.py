import numpy as np
import pytest

from mpifc.comm import Grid, GridError, factor_layout


def test_factor_layout():
    assert factor_layout(4) == (4, 1)
    assert factor_layout(4, tp=2) == (2, 2)
    assert factor_layout(6, dp=3) == (3, 2)
    assert factor_layout(3, dp=1, tp=3) == (1, 3)
    for bad in [dict(tp=3), dict(dp=0), dict(dp=2, tp=3)]:
        with pytest.raises(GridError):
            factor_layout(4, **bad)


@pytest.mark.mpi(min_size=1)
def test_grid_groups(comm):
    P = comm.size
    for tp in [t for t in range(1, P + 1) if P % t == 0]:
        g = Grid(comm, tp=tp)
        assert g.dp * g.tp == P and g.tp_comm.size == tp and g.dp_comm.size == g.dp
        assert comm.rank == g.dp_rank * tp + g.tp_rank
        # tp group = consecutive ranks; dp group = same tp_rank
        members_tp = g.tp_comm.allgather(np.array([comm.rank]))
        members_dp = g.dp_comm.allgather(np.array([comm.rank]))
        assert list(members_tp) == list(range(g.dp_rank * tp, g.dp_rank * tp + tp))
        assert list(members_dp) == list(range(g.tp_rank, P, tp))


@pytest.mark.mpi(min_size=2)
def test_impossible_layout_fails_on_every_rank(comm):
    with pytest.raises(GridError, match="ranks"):
        Grid(comm, dp=comm.size + 1, tp=1)
