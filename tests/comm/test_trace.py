"""Trace: one event per call, phases, summary counts, a valid merged Chrome trace."""
import json

import numpy as np
import pytest

from mpifc.comm import trace
from mpifc.comm.collect import gather_events, sync_clock, write_trace


@pytest.mark.mpi(min_size=1)
def test_one_event_per_call_with_phase(comm):
    x = np.ones(10, dtype=np.float32)
    with trace.phase("fc1.backward"):
        comm.allreduce(x)
        comm.allgather(x)
    comm.bcast(x)
    ev = trace.events()
    assert [e["op"] for e in ev] == ["allreduce", "allgather", "bcast"]
    assert [e["phase"] for e in ev] == ["fc1.backward", "fc1.backward", ""]
    assert all(e["bytes"] == 40 and e["count"] == 10 and e["dtype"] == "float32" for e in ev)
    assert all(e["rank"] == comm.rank and e["comm_size"] == comm.size for e in ev)
    assert all(e["t1"] >= e["t0"] for e in ev)


def test_phases_nest_and_unwind_on_error():
    assert trace.TRACER.current_phase == ""
    with trace.phase("outer"):
        with trace.phase("inner"):
            assert trace.TRACER.current_phase == "inner"
        assert trace.TRACER.current_phase == "outer"
        with pytest.raises(KeyError):
            with trace.phase("failing"):
                raise KeyError("x")              # the exception passes through
        assert trace.TRACER.current_phase == "outer"
    assert trace.TRACER.current_phase == ""


@pytest.mark.mpi(min_size=1)
def test_disabled_records_nothing(comm):
    with trace.disabled():
        comm.allreduce(np.ones(3))
    assert len(trace.events()) == 0


@pytest.mark.mpi(min_size=2)
def test_merged_chrome_trace_and_summary(comm, mpi_tmp_path):
    sync_clock(comm)
    calls = {"allreduce": 3, "allgather": 2, "sendrecv": 1}
    x = np.arange(8, dtype=np.float64)
    for _ in range(calls["allreduce"]):
        comm.allreduce(x)
    for _ in range(calls["allgather"]):
        comm.allgather(x)
    comm.sendrecv(x, (comm.rank + 1) % comm.size, np.empty_like(x), (comm.rank - 1) % comm.size)
    paths = write_trace(comm, mpi_tmp_path, prefix="t")
    ok = True
    if comm.rank == 0:
        doc = json.loads(open(paths["chrome"]).read())       # valid JSON
        evs = doc["traceEvents"]
        x_events = [e for e in evs if e["ph"] == "X"]
        for e in x_events:                                   # trace-event format fields
            assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e)
            assert e["dur"] >= 0 and e["ts"] >= 0
        tracks = {e["tid"] for e in x_events}
        names = {e["tid"]: e["args"]["name"] for e in evs if e.get("name") == "thread_name"}
        assert tracks == set(range(comm.size))               # one track per rank
        assert names == {r: f"rank {r}" for r in range(comm.size)}
        per_op = {}
        for e in x_events:
            per_op[e["name"]] = per_op.get(e["name"], 0) + 1
        assert per_op == {k: v * comm.size for k, v in calls.items()}
        table = open(paths["summary"]).read()
        for op, n in calls.items():
            line = next(ln for ln in table.splitlines() if ln.startswith(op))
            assert int(line.split()[1]) == n * comm.size      # summary counts == calls made
    # the per-rank summary matches too
    s = trace.summary()
    assert {k: v["calls"] for k, v in s.items()} == calls
    assert s["allreduce"]["bytes"] == 3 * x.nbytes


@pytest.mark.mpi(min_size=2)
def test_gathered_clocks_are_shifted_by_each_ranks_offset(comm):
    """Root gets each rank's events on the common clock: local times + that rank's
    offset (set by sync_clock; here a known one per rank, so nothing depends on how
    long the ranks took to leave a barrier on a loaded machine)."""
    sync_clock(comm)
    offset = 1000.0 * (comm.rank + 1)
    trace.TRACER.clock_offset = offset
    comm.barrier()
    local = trace.events()[-1]
    per_rank = gather_events(comm)
    locals_ = comm.gather_obj((local["t0"], local["t1"]))
    trace.TRACER.clock_offset = 0.0
    if comm.rank == 0:
        for r, (evs, (t0, t1)) in enumerate(zip(per_rank, locals_)):
            assert evs[-1]["op"] == "barrier"
            assert evs[-1]["t0"] == t0 + 1000.0 * (r + 1) and evs[-1]["t1"] == t1 + 1000.0 * (r + 1)


def test_spans_and_step_markers():
    trace.reset()
    with trace.step(7, 64):
        with trace.span("forward"):
            pass
        with pytest.raises(KeyError):
            with trace.span("backward"):
                raise KeyError("x")              # recorded all the same, the error passes
    with trace.disabled():
        with trace.span("evaluate"):             # not recorded
            pass
    sp = trace.spans()
    assert [(s["span"], s["step"], s["samples"]) for s in sp] == [
        ("forward", None, None), ("backward", None, None), ("step", 7, 64)]
    step = sp[-1]
    assert all(step["t0"] <= s["t0"] <= s["t1"] <= step["t1"] for s in sp[:2])
    assert trace.events() == []                  # spans are not calls
    trace.reset()
    assert trace.spans() == []


def test_jsonl_and_chrome_export_hold_the_spans(tmp_path):
    """The per-rank file holds calls then spans; the Chrome trace puts spans and blocking
    calls on the rank's track (tid = world rank), non-blocking calls on a track of their
    own, and the summary counts calls only."""
    from mpifc.comm.trace import calls_of, chrome_events, read_jsonl, spans_of, summarize

    def call(op, rank, t0, t1, comm="dp"):
        return {"op": op, "comm": comm, "comm_size": 2, "rank": rank, "dtype": "float32",
                "count": 4, "bytes": 16, "t0": t0, "t1": t1, "phase": "dp.grad_bucket0"}

    def span(name, t0, t1, step=None):
        return {"span": name, "step": step, "samples": 64 if step else None, "t0": t0, "t1": t1}

    per_rank = []
    for w in (0, 1):
        # world rank 1 is rank 0 of its tp group: the track must follow the world rank
        recs = [call("allreduce", 0, 10.2, 10.3, comm="tp"), call("iallreduce", w, 10.4, 10.8),
                span("forward", 10.1, 10.35), span("backward", 10.35, 10.8),
                span("step", 10.0, 10.9, step=3)]
        per_rank.append(recs)
    tr = trace.Tracer()
    tr._spans.append(("step", 1, 64, 1.0, 2.0))
    tr.write_jsonl(tmp_path / "t.rank0.jsonl")
    back = read_jsonl(tmp_path / "t.rank0.jsonl")
    assert back == [{"span": "step", "step": 1, "samples": 64, "t0": 1.0, "t1": 2.0}]
    assert calls_of(per_rank[0]) == per_rank[0][:2]
    assert [s["span"] for s in spans_of(per_rank[0])] == ["step", "forward", "backward"]
    assert summarize(per_rank[0])["allreduce"]["calls"] == 1 and len(summarize(per_rank[0])) == 2
    evs = chrome_events(per_rank)
    x = [e for e in evs if e["ph"] == "X"]
    names = {e["tid"]: e["args"]["name"] for e in evs if e["name"] == "thread_name"}
    assert names == {0: "rank 0", 1: "rank 1", 2: "rank 0 non-blocking", 3: "rank 1 non-blocking"}
    for w in (0, 1):
        mine = {e["name"]: e for e in x if e["tid"] == w}
        assert set(mine) == {"allreduce", "forward", "backward", "step 3"}
        assert mine["step 3"]["cat"] == "span" and mine["step 3"]["args"] == {"step": 3,
                                                                             "samples": 64}
        assert mine["step 3"]["ts"] == 0 and mine["step 3"]["dur"] == pytest.approx(0.9e6)
        # the spans nest on the track: step > forward > the allreduce made inside it
        f, a = mine["forward"], mine["allreduce"]
        assert f["ts"] <= a["ts"] and a["ts"] + a["dur"] <= f["ts"] + f["dur"]
        [nb] = [e for e in x if e["tid"] == 2 + w]
        assert nb["name"] == "iallreduce"


def test_trace_export_orders_tracks_by_rank_number(tmp_path):
    """`mpifc trace export` of 12 rank files: rank 10 is track 10, not track 2 (files were
    sorted by name, so trace.rank10.jsonl came before trace.rank2.jsonl)."""
    from mpifc.cli import main

    for r in range(12):
        rec = {"op": "allreduce", "comm": "world", "comm_size": 12, "rank": r, "dtype": "float32",
               "count": r + 1, "bytes": 4 * (r + 1), "t0": 1.0, "t1": 1.5, "phase": f"p{r}"}
        (tmp_path / f"trace.rank{r}.jsonl").write_text(json.dumps(rec) + "\n")
    out = tmp_path / "merged.json"
    assert main(["trace", "export", str(tmp_path / "trace.rank*.jsonl"), "-o", str(out)]) == 0
    calls = [e for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"]: e["cat"] for e in calls} == {r: f"p{r}" for r in range(12)}
