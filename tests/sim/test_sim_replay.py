"""Trace replay: a synthetic run replays exactly; a recorded run reproduces its own
communication time; the rescaling rule.

Serial tests build traces by hand on a constant link (alpha = 10 us, 1 GB/s, no
reduction cost), where every number is computed by hand below. The MPI test
records a real training run (build_model + DataParallel) at 2-4 ranks and replays
it on a cluster calibrated in the same job.
"""
import json
import os
import time

import numpy as np
import pytest

from mpifc.comm import Grid, balanced_counts, trace
from mpifc.comm.collect import sync_clock, write_trace
from mpifc.sim.cluster import Cluster, ComputeRates, LinkModel
from mpifc.sim.engine import simulate
from mpifc.sim.replay import (ReplayError, find_period, load_trace, replay, replay_workload,
                              step_window)

ALPHA, BW = 10e-6, 1e9
C = ALPHA + 1000 / BW          # a 1000-byte allreduce on 2 ranks: one doubling step
MS = 1e-3


def flat_cluster():
    link = LinkModel.constant(ALPHA, BW)
    return Cluster("flat", nodes=1, ranks_per_node=64, intra=link, inter=link,
                   reduction_Bps=1e30, compute=ComputeRates(elementwise_gbps=1.0))


def ev(op, comm, size, rank, count, t0, t1, phase, itemsize=4):
    return {"op": op, "comm": comm, "comm_size": size, "rank": rank, "dtype": "float32",
            "count": count, "bytes": count * itemsize, "t0": t0, "t1": t1, "phase": phase}


def synthetic(steps=5):
    """2 ranks, dp = 2. Per step, after the previous step's end T:
        rank 0: 1 ms compute, allreduce; 2 ms compute, post iallreduce, wait
        rank 1: 3 ms compute, allreduce; 1 ms compute, post iallreduce, wait
    allreduce: both arrive by T+3, end T+3+C;  posts at T+5+C (rank 0), T+4+C (rank 1);
    the iallreduce ends at T+5+2C = the step's end on both ranks."""
    out = {0: [], 1: []}
    for r in (0, 1):
        out[r].append(ev("split", "world", 2, r, 0, 0.0, 1e-4, ""))
    T = 1e-4
    g1, g2 = {0: 1 * MS, 1: 3 * MS}, {0: 2 * MS, 1: 1 * MS}
    for _ in range(steps):
        a_end = T + 3 * MS + C
        end = T + 5 * MS + 2 * C
        for r in (0, 1):
            out[r].append(ev("allreduce", "dp", 2, r, 250, T + g1[r], a_end, "fc1.forward"))
            out[r].append(ev("iallreduce", "dp", 2, r, 250, a_end + g2[r], end, "dp.grad_bucket0"))
        T = end
    return out


def test_find_period():
    keys = list("xy") + list("abcab") * 4 + list("z")
    start, p, reps = find_period(keys)
    assert (p, reps) == (5, 4) and keys[start:start + p * reps] == list("abcab") * 4
    with pytest.raises(ReplayError, match="no repeating step"):
        find_period(list("abcdef"))


def test_synthetic_run_replays_exactly():
    tr = synthetic()
    first, period, n = step_window(tr[0])
    assert period == 2 and n == 4              # 5 steps, the first one warms up
    assert tr[0][first]["op"] == "allreduce"   # aligned: a step ends with its wait
    rep = replay(tr, flat_cluster())
    assert (rep.P, rep.dp, rep.tp) == (2, 2, 1)
    r0, r1 = rep.ranks
    # measured: rank 0 waits 2 ms for rank 1 in the allreduce, rank 1 waits 1 ms at the end
    assert np.allclose(r0.measured_comm, 2 * MS + 2 * C)
    assert np.allclose(r1.measured_comm, 1 * MS + 2 * C)
    # the replay reproduces every number (they follow from the gaps and the cost model)
    for r in rep.ranks:
        assert np.allclose(r.predicted_comm, r.measured_comm, rtol=1e-9, atol=1e-12)
        assert np.allclose(r.predicted_step, 5 * MS + 2 * C)
        assert np.allclose(r.measured_step, 5 * MS + 2 * C)
    assert rep.by_op()["iallreduce"][1] == pytest.approx((0 + C + 1 * MS + C) / 2)
    assert "step time" in rep.format()


def test_rescaled_replay():
    tr, cl = synthetic(), flat_cluster()
    # at its own size, the slowest gap before each call gives the replayed step
    own = simulate(replay_workload(tr, cl), cl)
    assert own.step_s == pytest.approx(5 * MS + 2 * C)
    alone = simulate(replay_workload(tr, cl, rank=0), cl)
    assert alone.step_s == pytest.approx(3 * MS + 2 * C)       # rank 0 on its own
    # 8 ranks: dp grows to 8; recursive doubling takes lg 8 = 3 steps of 1000 B
    big = simulate(replay_workload(tr, cl, 8), cl)
    assert (big.dp, big.tp) == (8, 1)
    assert big.step_s == pytest.approx(5 * MS + 2 * 3 * C)
    # twice the batch per replica: compute gaps double, gradient messages do not
    two = simulate(replay_workload(tr, cl, batch_scale=2.0, recorded_batch=16), cl)
    assert two.step_s == pytest.approx(10 * MS + 2 * C)
    assert two.samples_per_s == pytest.approx(2 * 32 / two.step_s)


def test_trace_files_and_errors(tmp_path):
    tr = synthetic()
    for r, evs in tr.items():
        with open(tmp_path / f"trace.rank{r}.jsonl", "w") as f:
            f.write("".join(json.dumps(e) + "\n" for e in evs))
    back = load_trace(str(tmp_path))
    assert back == tr
    rep = replay(str(tmp_path), flat_cluster())
    assert rep.measured_step_s == pytest.approx(5 * MS + 2 * C)
    bad = dict(tr)
    bad[1] = [e if e["op"] != "iallreduce" else {**e, "op": "allreduce"} for e in tr[1]]
    with pytest.raises(ReplayError, match="different sequence"):
        replay(bad, flat_cluster())
    with pytest.raises(ReplayError, match="no trace files"):
        load_trace(str(tmp_path / "nothing-here"))
    with pytest.raises(ReplayError, match="keep the recorded tp"):
        two = {r: [{**e, "comm": "tp"} for e in evs] for r, evs in tr.items()}
        replay_workload(two, flat_cluster(), 3)


# --------------------------------------------------------------------------- recorded run
SLEEP = 0.03


def _record_and_replay(comm, cluster, cfg, base, tp):
    """Train 8 steps of ``cfg`` at dp x tp = comm.size / tp x tp with the last rank
    sleeping SLEEP per step; rank 0 returns (measured comm, predicted comm, measured
    step, predicted step) of the replay, the other ranks None."""
    from mpifc.models import build_model
    from mpifc.optim import Adam
    from mpifc.parallel import DataParallel

    dp = comm.size // tp
    grid = Grid(comm, dp, tp)
    net = build_model(cfg["model"], grid, seed=0)
    ddp = DataParallel(net, grid.dp_comm, bucket_mb=0.05)
    opt = Adam(net.parameters(), lr=1e-3)
    B = 64
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, B)
    counts, displs = balanced_counts(B, dp)
    sl = slice(displs[grid.dp_rank], displs[grid.dp_rank] + counts[grid.dp_rank])
    x, y = np.ascontiguousarray(x[sl]), y[sl]
    trace.reset()
    sync_clock(comm)
    for _ in range(8):
        ddp.zero_grad()
        net.loss.forward(net.forward(x), y)
        net.loss.correct()
        if comm.rank == comm.size - 1:
            time.sleep(SLEEP)
        ddp.backward(net.loss.backward(dp * len(y) / B))
        ddp.synchronize()
        opt.step()
    out = os.path.join(base, f"dp{dp}tp{tp}")
    write_trace(comm, out)
    comm.barrier()
    if comm.rank != 0:
        return None
    rep = replay(out, cluster)
    print(rep.format())
    return rep.measured_comm_s, rep.predicted_comm_s, rep.measured_step_s, rep.predicted_step_s


def _within(mc, pc, ms, ps):
    return abs(pc - mc) <= 0.25 * mc and abs(ps - ms) <= 0.25 * ms


@pytest.mark.mpi(min_size=2)
def test_recorded_run_reproduces_its_communication_time(comm, tmp_path_factory):
    """Replay of a real run at its own size gives its measured communication time.

    The last rank sleeps SLEEP seconds in every step, so the other ranks wait for it
    inside their next collective: the run's communication time is then mostly skew,
    which the replay must rebuild from the recorded compute gaps, plus the collectives
    themselves, costed from a calibration taken in the same job. Tolerance: 25 % of
    the measured time per step (median over steps). On this 2-core machine, shared
    with other jobs, a rank that wakes from sleep or waits in MPI can lose a scheduler
    time slice (milliseconds), which the calibration's medians do not contain; 25 % of
    a >= 15 ms per-rank mean leaves room for about one lost slice per step, while a
    replay that dropped the skew (or a group's synchronisation) would be off by 50 %
    or more. When the job has more ranks than cores, a run that lost more than that
    (measured 12-19 % under the replay typically, 38-47 ms against 23.6 ms in about one
    run in ten at 4 ranks on 2 cores) is recorded once more: the replay must then
    match the second recording.
    """
    from mpifc.config import load_config
    from mpifc.sim.calibrate import calibrate
    from mpifc.threads import cores_available

    cluster = calibrate(None, quick=True, ops=("allreduce", "allgather"))
    cfg = load_config("digits-mlp")
    base = comm.bcast_obj(str(tmp_path_factory.mktemp("rec")) if comm.rank == 0 else None)
    tries = 2 if comm.size > cores_available() else 1
    for tp in (1, comm.size):
        for attempt in range(tries):
            got = _record_and_replay(comm, cluster, cfg, os.path.join(base, str(attempt)), tp)
            again = comm.bcast_obj(attempt + 1 < tries and not _within(*got)
                                   if comm.rank == 0 else None)
            if not again:
                break
        if comm.rank == 0:
            mc, pc, ms, ps = got
            assert mc > SLEEP / 3, (tp, mc)                # the skew is there
            assert abs(pc - mc) <= 0.25 * mc, (tp, mc, pc)
            assert abs(ps - ms) <= 0.25 * ms, (tp, ms, ps)
