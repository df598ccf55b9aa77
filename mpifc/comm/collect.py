"""Bring every rank's trace together: common clock, gather, write the exports."""
from __future__ import annotations

import os
import time

from mpifc.comm.trace import TRACER, format_summary, merge_chrome, summarize


def sync_clock(comm, tracer=TRACER) -> float:
    """Align this rank's trace clock with rank 0's (offset in seconds, stored on the tracer).

    All ranks leave a barrier within microseconds of each other; the difference of
    their ``perf_counter`` readings just after it is the clock offset.
    """
    with tracer.disabled():
        comm.barrier()
        t = time.perf_counter()
        t_root = comm.bcast_obj(t, root=0)
    tracer.clock_offset = t_root - t
    return tracer.clock_offset


def gather_events(comm, root: int = 0, tracer=TRACER, spans: bool = False):
    """Root gets a list (one entry per rank) of event dicts on the common clock
    (with ``spans``: the call events, then the span records)."""
    evs = tracer.events() + (tracer.spans() if spans else [])
    for e in evs:
        e["t0"] += tracer.clock_offset
        e["t1"] += tracer.clock_offset
    with tracer.disabled():
        return comm.gather_obj(evs, root=root)


def write_trace(comm, outdir, prefix: str = "trace", tracer=TRACER) -> dict | None:
    """Write per-rank JSON lines, one merged Chrome trace and a summary table.

    The JSON lines and the Chrome trace hold the spans too (step markers, compute
    spans); the summary counts the calls.

    Collective over ``comm``. Returns the paths on rank 0, None elsewhere.
    """
    os.makedirs(outdir, exist_ok=True)
    jsonl = os.path.join(outdir, f"{prefix}.rank{comm.rank}.jsonl")
    tracer.write_jsonl(jsonl)
    per_rank = gather_events(comm, tracer=tracer, spans=True)
    if comm.rank != 0:
        return None
    chrome = os.path.join(outdir, f"{prefix}.chrome.json")
    merge_chrome(per_rank, chrome)
    table = format_summary(summarize([e for evs in per_rank for e in evs]),
                           title=f"communication summary, all {comm.size} ranks")
    txt = os.path.join(outdir, f"{prefix}.summary.txt")
    with open(txt, "w") as f:
        f.write(table + "\n")
    return {"jsonl": os.path.join(outdir, f"{prefix}.rank*.jsonl"), "chrome": chrome,
            "summary": txt, "table": table}
