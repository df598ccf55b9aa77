"""Trace of every communication call: one event per call, per rank.

An event is a tuple, cheap to record on the hot path (two ``perf_counter`` reads
and one list append):

    (op, (comm_name, comm_size, rank), dtype, count, nbytes, t0, t1, phase)

The middle triple is the communicator's identity, built once per communicator.
``nbytes`` is ``None`` when it is ``count * dtype.itemsize`` (worked out at export),
and the dtype is a NumPy dtype until export, where it becomes its name. ``events()``
returns the flat dicts named by ``FIELDS``.

``phase`` is the label of the innermost ``with trace.phase(...)`` block, e.g.
``"fc2.backward"``. A call on device (CuPy) buffers appends a ninth item,
``(path, copy_s)``: "device" (CUDA-aware MPI took the GPU buffers) or "staged"
(copied through pinned host buffers), and the seconds those copies took; its dict
gets the fields ``path`` and ``copy_s`` (host-buffer calls have neither). Times are seconds from ``time.perf_counter`` on this rank;
exports shift them by the rank's offset to a common epoch (see ``set_clock_offset``).

Spans: ``with trace.span("forward"):`` records one span (name, t0, t1) of compute
or any other stretch of a rank's time; ``with trace.step(k, samples):`` marks
training step ``k`` (a span named "step" carrying the step number and the global
batch). The trainer marks every step and its forward / backward / update, and its
evaluation and checkpoint spans; replay (:mod:`mpifc.sim.replay`) splits a trace
into steps on these markers. A span costs about twice a ``phase`` block (two
``perf_counter`` reads and one list append); ``bench/trace_overhead.py`` measures it
against a training step.

Exports: JSON lines per rank (``write_jsonl``: the call events, then the spans as
``{"span": name, "step": k | null, "samples": n | null, "t0", "t1"}``), one merged
Chrome trace with a track per rank (``merge_chrome``; loads in Perfetto or
chrome://tracing: calls and spans as complete events on the rank's track,
non-blocking calls, which overlap the others, on a second track of the rank), and a
per-op summary table of the calls (``summary`` / ``format_summary``).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass

_perf = time.perf_counter
FIELDS = ("op", "comm", "comm_size", "rank", "dtype", "count", "bytes", "t0", "t1", "phase")


class _Phase:
    """``with trace.phase(label):`` (see :meth:`Tracer.phase`)."""

    __slots__ = ("_stack", "_label")

    def __init__(self, stack: list, label: str):
        self._stack, self._label = stack, label

    def __enter__(self):
        self._stack.append(self._label)

    def __exit__(self, *exc):
        self._stack.pop()
        return False


class _Span:
    """``with trace.span(name):`` / ``with trace.step(k):`` (see :meth:`Tracer.span`)."""

    __slots__ = ("_append", "_name", "_step", "_samples", "_t0")

    def __init__(self, append, name: str, step, samples):
        self._append, self._name, self._step, self._samples = append, name, step, samples

    def __enter__(self):
        self._t0 = _perf()

    def __exit__(self, *exc):
        self._append((self._name, self._step, self._samples, self._t0, _perf()))
        return False


class _NoSpan:
    __slots__ = ()

    def __enter__(self):
        pass

    def __exit__(self, *exc):
        return False


_NO_SPAN = _NoSpan()


@dataclass
class Tracer:
    enabled: bool = True
    clock_offset: float = 0.0     # add to perf_counter times to get a job-wide clock

    def __post_init__(self):
        self._events: list[tuple] = []
        self._phases: list[str] = [""]
        self._spans: list[tuple] = []       # (name, step, samples, t0, t1)

    # --- recording (hot path) ---
    def record(self, op, ident, dtype, count, nbytes, t0, t1, device=None) -> None:
        """Append one event; ``ident`` is ``(comm_name, comm_size, rank)``; ``device`` is
        ``(path, copy_s)`` for a call on device buffers."""
        if device is None:
            self._events.append((op, ident, dtype, count, nbytes, t0, t1, self._phases[-1]))
        else:
            self._events.append((op, ident, dtype, count, nbytes, t0, t1, self._phases[-1],
                                 device))

    def phase(self, label: str) -> "_Phase":
        """Label every event recorded inside the block with ``label``.

        A small class rather than ``@contextmanager``: the layers enter one per
        forward / backward, and a generator-based one cost 2.2 us per block against 0.49 us
        for this one (hot, on the 2-core development machine)."""
        return _Phase(self._phases, label)

    def span(self, name: str, step: int | None = None, samples: int | None = None):
        """Record the block as a span ``name`` of this rank's time (nothing when disabled).

        Recorded when the block ends (a span that raises is recorded too)."""
        return _Span(self._spans.append, name, step, samples) if self.enabled else _NO_SPAN

    def step(self, step: int, samples: int | None = None):
        """Mark the block as training step ``step`` (``samples``: its global batch)."""
        return self.span("step", step, samples)

    def spans(self) -> list[dict]:
        """Recorded spans as dicts (a copy), in the order they ended."""
        return [_span_dict(s) for s in self._spans]

    @property
    def current_phase(self) -> str:
        return self._phases[-1]

    # --- control ---
    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    @contextmanager
    def disabled(self):
        old = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = old

    def reset(self) -> None:
        self._events.clear()
        self._spans.clear()

    def events(self) -> list[dict]:
        """Recorded events as dicts (a copy), dtypes as names."""
        return [_as_dict(e) for e in self._events]

    def __len__(self) -> int:
        return len(self._events)

    def busy_seconds(self) -> float:
        """Total seconds spent inside recorded calls on this rank."""
        return sum(e[6] - e[5] for e in self._events)

    def blocked_seconds(self, start: int = 0) -> float:
        """Seconds inside blocking calls, from event ``start`` on.

        Non-blocking operations (iallreduce, isend, irecv) are left out: their events
        span post to completion and overlap the compute done meanwhile; the caller
        adds the time it spent posting and waiting for them."""
        return sum(e[6] - e[5] for e in self._events[start:] if e[0][0] != "i")

    # --- exports ---
    def summary(self, events: list[dict] | None = None) -> dict[str, dict]:
        """Per-op totals: calls, bytes, seconds and GB/s (bytes / seconds)."""
        return summarize(self.events() if events is None else events)

    def write_jsonl(self, path) -> None:
        """Write this rank's events, one JSON object a line, times on the job clock."""
        with open(path, "w") as f:
            for e in self._events:
                d = _as_dict(e)
                d["t0"] += self.clock_offset
                d["t1"] += self.clock_offset
                f.write(json.dumps(d) + "\n")
            for sp in self._spans:
                d = _span_dict(sp)
                d["t0"] += self.clock_offset
                d["t1"] += self.clock_offset
                f.write(json.dumps(d) + "\n")


def _span_dict(sp: tuple) -> dict:
    name, step, samples, t0, t1 = sp
    return {"span": name, "step": step, "samples": samples, "t0": t0, "t1": t1}


def is_span(record: dict) -> bool:
    """A span record of a trace file (the others are call events)."""
    return "span" in record


def calls_of(records: list[dict]) -> list[dict]:
    """The call events of a trace file's records (spans left out)."""
    return [r for r in records if "span" not in r]


def spans_of(records: list[dict]) -> list[dict]:
    """The span records of a trace file's records, by start time."""
    return sorted((r for r in records if "span" in r), key=lambda r: r["t0"])


def _as_dict(e: tuple) -> dict:
    op, (comm, comm_size, rank), dt, count, nbytes, t0, t1, phase = e[:8]
    if isinstance(dt, str):                 # "" for calls that carry no array
        name = dt
    else:                                   # recorded as a numpy dtype
        name = dt.name
        if nbytes is None:
            nbytes = count * dt.itemsize
    d = {"op": op, "comm": comm, "comm_size": comm_size, "rank": rank, "dtype": name,
         "count": count, "bytes": 0 if nbytes is None else nbytes, "t0": t0, "t1": t1,
         "phase": phase}
    if len(e) > 8:                          # a call on device buffers
        d["path"], d["copy_s"] = e[8]
    return d


def summarize(events: list[dict]) -> dict[str, dict]:
    """Per-op totals of the call events (span records are skipped)."""
    out: dict[str, dict] = {}
    for e in events:
        if "span" in e:
            continue
        s = out.setdefault(e["op"], {"calls": 0, "bytes": 0, "seconds": 0.0})
        s["calls"] += 1
        s["bytes"] += int(e["bytes"])
        s["seconds"] += float(e["t1"]) - float(e["t0"])
    for s in out.values():
        s["GB/s"] = s["bytes"] / s["seconds"] / 1e9 if s["seconds"] > 0 else 0.0
    return out


def format_summary(summary: dict[str, dict], title: str = "communication summary") -> str:
    """A fixed-width table of ``summarize`` output, sorted by time spent."""
    rows = sorted(summary.items(), key=lambda kv: -kv[1]["seconds"])
    lines = [title, f"{'op':<16}{'calls':>8}{'bytes':>14}{'seconds':>12}{'GB/s':>10}"]
    for op, s in rows:
        lines.append(f"{op:<16}{s['calls']:>8}{s['bytes']:>14}{s['seconds']:>12.6f}{s['GB/s']:>10.3f}")
    tot_c = sum(s["calls"] for s in summary.values())
    tot_b = sum(s["bytes"] for s in summary.values())
    tot_s = sum(s["seconds"] for s in summary.values())
    lines.append(f"{'total':<16}{tot_c:>8}{tot_b:>14}{tot_s:>12.6f}")
    return "\n".join(lines)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def chrome_events(per_rank: list[list[dict]]) -> list[dict]:
    """Chrome trace-event objects for the records of each rank (list index = world rank).

    pid 0; the track of rank r (tid r) holds its blocking calls and its spans as
    complete ("X") events, which nest: a step holds its forward / backward / update,
    and they hold the calls made inside them. A non-blocking call lasts from its
    post to its completion and overlaps the others, so it goes on a second track of
    the rank (tid P + r, "rank r non-blocking", shown under rank r). A step span is
    named "step k".
    Times are in microseconds from the earliest record, so tracks of all ranks line up.
    """
    flat = [r for recs in per_rank for r in recs]
    if not flat:
        return []
    t_min = min(r["t0"] for r in flat)
    out = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "mpifc"}}]

    P = len(per_rank)

    def track(tid, name, order):
        out.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": name}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": tid,
                    "args": {"sort_index": order}})

    for w, recs in enumerate(per_rank):
        if not recs:
            continue
        track(w, f"rank {w}", 2 * w)
        nonblocking = False
        for r in recs:
            ts, dur = (r["t0"] - t_min) * 1e6, max(r["t1"] - r["t0"], 0.0) * 1e6
            if "span" in r:
                name = r["span"] if r.get("step") is None else f"{r['span']} {r['step']}"
                args = {k: r[k] for k in ("step", "samples") if r.get(k) is not None}
                out.append({"name": name, "cat": "span", "ph": "X", "pid": 0, "tid": w,
                            "ts": ts, "dur": dur, "args": args})
                continue
            nb = r["op"].startswith("i")
            nonblocking |= nb
            out.append({
                "name": r["op"], "cat": r["phase"] or "comm", "ph": "X", "pid": 0,
                "tid": P + w if nb else w, "ts": ts, "dur": dur,
                "args": {k: r[k] for k in ("comm", "comm_size", "rank", "dtype", "count", "bytes",
                                           "phase", "path", "copy_s") if k in r},
            })
        if nonblocking:
            track(P + w, f"rank {w} non-blocking", 2 * w + 1)
    return out


def merge_chrome(per_rank_records: list[list[dict]], path) -> None:
    """Write one Chrome trace (JSON object format) with a track per rank (list index)."""
    with open(path, "w") as f:
        json.dump({"traceEvents": chrome_events(per_rank_records), "displayTimeUnit": "ms"}, f)


# The process-wide tracer. Communicators record into it; ``with trace.phase(...)``
# is the public spelling (mpifc.comm exposes this module as ``trace``).
TRACER = Tracer()
phase = TRACER.phase
enable = TRACER.enable
disable = TRACER.disable
disabled = TRACER.disabled
reset = TRACER.reset
events = TRACER.events
span = TRACER.span
step = TRACER.step
spans = TRACER.spans
summary = TRACER.summary
write_jsonl = TRACER.write_jsonl


def now() -> float:
    return time.perf_counter()
