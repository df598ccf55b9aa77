"""Trace replay: a synthetic run replays exactly; steps split on the trainer's markers;
a recorded run's skew and structure; the rescaling rule.

Serial tests build traces by hand on a constant link (alpha = 10 us, 1 GB/s, no
reduction cost), where every number is computed by hand below. The MPI test
records a real training run (build_model + DataParallel) at 2-4 ranks and replays
it; no test compares replayed with measured times (bench/replay_accuracy.py does).
"""
import json
import os
import sys
import time

import numpy as np
import pytest

from mpifc.comm import Grid, balanced_counts, trace
from mpifc.comm.collect import sync_clock, write_trace
from mpifc.comm.trace import read_jsonl
from mpifc.sim.cluster import Cluster, ComputeRates, LinkModel, preset
from mpifc.sim.engine import simulate
from mpifc.sim.replay import (ReplayError, find_period, load_trace, marked_steps, replay,
                              replay_workload, step_window)

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
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "trace.rank0.jsonl").write_bytes(bytes(range(256)))
    with pytest.raises(ReplayError, match="cannot read trace file .*trace.rank0.jsonl"):
        load_trace(str(tmp_path / "bin"))
    with pytest.raises(ReplayError, match="keep the recorded tp"):
        two = {r: [{**e, "comm": "tp"} for e in evs] for r, evs in tr.items()}
        replay_workload(two, flat_cluster(), 3)


def marked(steps=6, evaluation_s=0.1):
    """synthetic() with the trainer's step markers, an evaluation (an allreduce and
    ``evaluation_s`` seconds) after the third step, and a short last batch."""
    tr = synthetic(steps)
    L = 5 * MS + 2 * C
    out = {}
    for r, evs in tr.items():
        recs = []
        for e in evs:                         # shift everything after step 3 by the evaluation
            late = e["t0"] > 1e-4 + 3 * L
            recs.append({**e, "t0": e["t0"] + evaluation_s * late,
                         "t1": e["t1"] + evaluation_s * late})
        t_eval = 1e-4 + 3 * L + evaluation_s / 2
        recs.append(ev("allreduce", "dp", 2, r, 250, t_eval, t_eval + C, "metrics"))
        for k in range(steps):
            t0 = 1e-4 + k * L + evaluation_s * (k >= 3)
            recs.append({"span": "step", "step": k + 1, "samples": 64 if k < steps - 1 else 30,
                         "t0": t0, "t1": t0 + L})
            recs.append({"span": "forward", "step": None, "samples": None, "t0": t0,
                         "t1": t0 + MS})
        recs.append({"span": "evaluate", "step": None, "samples": None,
                     "t0": 1e-4 + 3 * L + 0.01, "t1": 1e-4 + 3 * L + evaluation_s - 0.01})
        out[r] = recs
    return out


def test_replay_splits_on_step_markers(tmp_path):
    """Steps come from the markers: the evaluation between steps 3 and 4 (its call and
    its 100 ms) is in no step, the short last batch is left out, and the replay of the
    marked steps reproduces every number of the synthetic run."""
    tr = marked()
    calls = marked_steps(tr)
    assert {e["step"] for e in calls[0]} == {1, 2, 3, 4, 5}          # step 6: 30 samples
    assert all(e["phase"] != "metrics" for evs in calls.values() for e in evs)
    first, period, n = step_window(calls[0])
    assert (first, period, n) == (2, 2, 4)
    for r, evs in tr.items():                                        # as written by the trainer
        with open(tmp_path / f"trace.rank{r}.jsonl", "w") as f:
            f.write("".join(json.dumps(e) + "\n" for e in evs))
    for src in (tr, str(tmp_path)):
        rep = replay(src, flat_cluster())
        assert rep.markers and (rep.steps, rep.period, rep.samples) == (4, 2, 64)
        for r in rep.ranks:
            assert np.allclose(r.measured_step, 5 * MS + 2 * C)       # no evaluation inside
            assert np.allclose(r.predicted_step, 5 * MS + 2 * C)
            assert np.allclose(r.predicted_comm, r.measured_comm)
        assert "step markers" in rep.format() and "samples/s" in rep.format()
    wl = replay_workload(tr, flat_cluster())
    assert wl.samples_per_step == 64 and simulate(wl, flat_cluster()).step_s == pytest.approx(
        5 * MS + 2 * C)


def test_replay_without_markers_says_so():
    rep = replay(synthetic(), flat_cluster())
    assert not rep.markers and "no step markers" in rep.format()


def test_marked_steps_errors():
    tr = marked(steps=2)                  # one full step and one short one
    with pytest.raises(ReplayError, match="record at least 3 steps"):
        marked_steps(tr)
    tr = marked()
    tr[1] = [e for e in tr[1] if e.get("span") != "step"]
    with pytest.raises(ReplayError, match=r"rank\(s\) \[1\] .* no step markers"):
        marked_steps(tr)


def test_real_training_trace_splits_on_its_step_markers(tmp_path):
    """`mpifc train` at 2 ranks (2 epochs of 23 steps; evaluation, metrics and a
    checkpoint every epoch): replay finds the marked steps of full batches and their
    calls (one allreduce per gradient bucket, the finiteness check), nothing else."""
    from joblaunch import run_job

    p, _ = run_job([sys.executable, "-m", "mpifc", "train", "digits-mlp", "--quiet",
                    "--set", "train.epochs=2", "--set", "train.log_every=5",
                    "--set", f"data.dir={tmp_path}/data", "--out", str(tmp_path / "run")],
                   2, timeout=240, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    src = str(tmp_path / "run" / "trace")
    raw = {r: read_jsonl(tmp_path / "run" / "trace" / f"trace.rank{r}.jsonl") for r in (0, 1)}
    marks = [s for s in raw[0] if s.get("span") == "step"]
    assert [s["step"] for s in marks] == list(range(1, 47))
    assert [s["samples"] for s in marks].count(64) == 44           # 1437 rows: 22 x 64 + 29
    assert {s.get("span") for s in raw[0]} >= {"step", "forward", "backward", "update", "evaluate",
                                          "checkpoint"}
    with open(tmp_path / "run" / "trace" / "trace.chrome.json") as f:     # Perfetto shows them
        x = [e for e in json.load(f)["traceEvents"] if e["ph"] == "X" and e["cat"] == "span"]
    for w in (0, 1):
        assert {e["name"] for e in x if e["tid"] == w} >= {"step 2", "forward", "backward",
                                                            "update", "evaluate", "checkpoint"}
    calls = load_trace(src)
    buckets = {e["phase"] for e in calls[0] if e["op"] == "iallreduce"}
    assert buckets and all(b.startswith("dp.grad") for b in buckets)
    per_step = len(buckets) + 1                                   # + check.finite
    for k in range(44):                                           # the same calls every step
        step = calls[0][k * per_step:(k + 1) * per_step]
        assert sorted(e["phase"] for e in step) == sorted(buckets | {"check.finite"})
    assert len(calls[0]) == 44 * per_step
    rep = replay(src, preset("shm-node"))
    assert rep.markers and (rep.steps, rep.period, rep.samples) == (43, per_step, 64)
    assert "43 step(s) of %d calls" % per_step in rep.format()


# --------------------------------------------------------------------------- recorded run
SLEEP = 0.03
STEPS = 8


def _record_and_replay(comm, cluster, cfg, base, tp):
    """Train STEPS steps of ``cfg`` at dp x tp = comm.size / tp x tp with the last rank
    sleeping SLEEP per step, marked as the trainer marks them; rank 0 returns the
    replay report and the calls per step of its trace, the other ranks None."""
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
    for k in range(STEPS):
        with trace.step(k + 1, B):
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
    calls = load_trace(out)
    rep = replay(out, cluster)
    print(rep.format())
    return rep, len(calls[0]) // STEPS


@pytest.mark.mpi(min_size=2)
def test_recorded_run_replays_its_skew_and_structure(comm, tmp_path_factory):
    """Replay of a real run at its own size: what cannot be noise.

    The last rank sleeps SLEEP seconds inside every step, so every other rank waits
    for it in a collective. The replay must rebuild that wait from the recorded
    compute gaps: every rank's predicted time over the replayed steps is at least
    the sleeps they contain (each rank meets the sleeper in a collective after each
    sleep), whatever the load on the machine, since the recorded sleep can only be
    longer than SLEEP. A replay that dropped the skew (or a group's synchronisation)
    would predict the non-sleeping ranks' own compute plus the collectives, a few
    milliseconds. The rest is structure and sums: the steps and calls per step, the
    per-op times adding up to the communication time. How close the replayed times
    come to the measured ones depends on the machine's load and is a bench figure
    (bench/replay_accuracy.py), not a test.
    """
    from mpifc.config import load_config
    from mpifc.sim.cluster import preset

    cfg = load_config("digits-mlp")
    base = comm.bcast_obj(str(tmp_path_factory.mktemp("rec")) if comm.rank == 0 else None)
    for tp in (1, comm.size):
        got = _record_and_replay(comm, preset("shm-node"), cfg, base, tp)
        if comm.rank == 0:
            rep, per_step = got
            n = STEPS - 1                                    # the first step warms up
            assert rep.markers and (rep.steps, rep.period) == (n, per_step), (tp, rep.format())
            assert (rep.dp, rep.tp) == (comm.size // tp, tp)
            assert rep.measured_step_s >= SLEEP               # the sleeper's own steps
            for r in rep.ranks:
                assert len(r.predicted_step) == n and len(r.measured_comm) == n
                # every rank waits for the sleeper: the skew is rebuilt
                assert r.predicted_step.sum() >= (n - 1) * SLEEP, (tp, r.rank, r.predicted_step)
                # the per-op times add up to the communication time, measured and predicted
                assert np.allclose(sum(r.measured_by_op.values()), r.measured_comm)
                assert np.allclose(sum(r.predicted_by_op.values()), r.predicted_comm)
                assert np.all(r.predicted_comm >= 0) and np.all(r.measured_comm >= 0)
