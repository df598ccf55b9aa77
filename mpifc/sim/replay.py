"""Trace replay: predict a recorded run from its own messages and compute gaps.

A run traced by :mod:`mpifc.comm.trace` leaves one JSON-lines file per rank (one event
per communication call: op, communicator name and size, count, bytes, t0, t1, phase,
on a common clock). Replay turns it into a prediction in three steps.

1. **Steps.** The trainer marks every step in the trace (a "step" span, with the
   step's global batch; :func:`mpifc.comm.trace.Tracer.step`). :func:`marked_steps`
   keeps the calls made inside the marked steps, and of those the steps that issue
   the most common sequence of (op, communicator, count, phase) keys with the most
   common batch (an epoch's short last batch, a first step that sets up, differ);
   everything between steps (evaluation, checkpoints, metrics) is cut out of the
   rank's timeline, so a step's compute is its own.
   A trace without step markers (written before the trainer marked steps, or by a
   program that does not) is split by repetition: a training step issues the same
   sequence of calls every time, so :func:`find_period` finds the period of the
   key sequence (the shift with the longest run of equal keys) and the steady-state
   steps it spans. The window is aligned so a step ends with its last non-blocking
   completion (the data-parallel gradient wait), or, without one, starts at its
   first forward message. Anything else that repeats with the steps (an evaluation
   every epoch) then lands in them: the report says which split it used.

2. **Timeline per rank.** Blocking calls are intervals [t0, t1]. A non-blocking
   ``iallreduce`` is recorded at its ``wait`` with t0 = when it was posted and t1 =
   when the wait returned: the post is placed at t0, and the wait is assumed to be
   called right after the last activity before it (data parallelism waits its
   buckets at the end of the backward pass, after the last post), so the time
   between is waiting, not compute. Everything between two activities is a
   *compute gap*, kept as measured seconds.

3. **Prediction.**
   * At its own size (:func:`replay`): a discrete-event run of every rank. Each
     rank advances by its own measured gaps; a collective starts when the last
     member of its group has arrived and lasts the cost model's time for the op,
     bytes and group on the cluster (a measured table from ``mpifc calibrate`` when
     one covers it). So a rank's predicted communication time is its wait for
     slower ranks (skew, from the recorded gaps) plus the collective itself, as
     in the measurement. Groups are rebuilt from the dp x tp grid convention
     (world rank = dp_rank * tp + tp_rank; "tp" and "dp" communicators, their
     sizes read from the events); a communicator of any other name is a
     world-sized group when its size is the job's, and is otherwise costed
     without synchronising ranks. Point-to-point calls (sendrecv, isend, irecv)
     are costed without synchronisation.
   * Rescaled (:func:`replay_workload`): one rank's step becomes an engine
     :class:`~mpifc.sim.engine.Workload` for another rank count or cluster, under
     the rescaling rule:

       - tp stays as recorded (the shards, and so every tp message, keep their
         shape); dp = ranks / tp;
       - ``batch_scale`` = new per-replica batch / recorded per-replica batch
         (default 1: weak scaling). Compute gaps and tp messages (activations)
         scale with it; compute gaps also scale by ``compute_scale`` (recorded
         machine's speed / target's; 1 for the same processors);
       - dp messages (gradients) keep their bytes and run on the new dp group;
         world messages run on all ranks; gather-type messages grow with the
         group (each rank contributes the block it did);
       - non-blocking messages stay overlappable behind the compute after them.

     The engine carries a gap as an element-wise phase of ``gap * rate`` bytes at
     the target's element-wise rate, so it lasts exactly the rescaled gap.

Message sizes: the trace's ``bytes`` is this rank's buffer argument; the cost
model's n is the vector for allreduce, bcast, reduce, the total for gather-type ops
(allgather: sum of the members' blocks), the input for reduce_scatter and alltoall,
bytes each way for sendrecv. Object calls (``*_obj``, pickled) and ``split`` record
no bytes; they are costed as the matching collective of 64 bytes per rank.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from mpifc.comm.trace import calls_of, spans_of
from mpifc.errors import UserError
from mpifc.sim.cluster import Cluster
from mpifc.sim.collectives import CostModel
from mpifc.sim.engine import Phase, Workload, group_shape

NONBLOCKING = {"iallreduce"}
P2P = {"sendrecv", "isend", "irecv"}
# trace op -> (cost model op, how the cost model's n follows from the trace bytes)
#   "same": n = bytes;  "sum": n = sum of the members' bytes;  "obj": 64 B per rank
_OPS = {
    "allreduce": ("allreduce", "same"), "iallreduce": ("allreduce", "same"),
    "bcast": ("bcast", "same"), "reduce": ("reduce", "same"),
    "allgather": ("allgatherv", "sum"), "gather": ("gatherv", "sum"),
    "scatter": ("scatterv", "sum"), "reduce_scatter": ("reduce_scatter", "same"),
    "alltoall": ("alltoall", "same"), "alltoallv": ("alltoallv", "same"),
    "sendrecv": ("sendrecv", "same"),
    "isend": ("sendrecv", "same"), "irecv": ("sendrecv", "same"),
    "barrier": ("barrier", "same"),
    "bcast_obj": ("bcast", "obj"), "gather_obj": ("gather", "obj"),
    "allgather_obj": ("allgather", "obj"), "allreduce_obj": ("allreduce", "obj"),
    "split": ("allgather", "obj"),
}
OBJ_BYTES = 64.0


class ReplayError(UserError, ValueError):
    """A trace that cannot be replayed (names what is wrong)."""


# --------------------------------------------------------------------------- reading
def trace_files(source) -> list[str]:
    """Per-rank JSON-lines files: a directory (its ``*.rank*.jsonl``), a glob, or a list."""
    if isinstance(source, (list, tuple)):
        files = [f for s in source for f in (sorted(glob.glob(str(s))) or [str(s)])]
    elif os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "*.rank*.jsonl")))
        if not files:
            files = sorted(glob.glob(os.path.join(source, "*.jsonl")))
    else:
        files = sorted(glob.glob(str(source)))
    if not files:
        raise ReplayError(f"no trace files (*.rank*.jsonl) in {source}")
    return files


def load_trace(source) -> dict[int, list[dict]]:
    """{world rank: call events} from :func:`trace_files`: with step markers, the calls
    of the replayable marked steps (:func:`marked_steps`), else every call in recorded
    order.

    An event's ``rank`` field is its rank in the communicator it used, so the world
    rank comes from the file name (``<prefix>.rank<r>.jsonl``, as written by
    :func:`mpifc.comm.collect.write_trace`), or else from the files' sorted order.
    """
    files = trace_files(source)
    out: dict[int, list[dict]] = {}
    for i, f in enumerate(files):
        m = re.search(r"rank(\d+)\.jsonl$", os.path.basename(f))
        r = int(m.group(1)) if m else i
        try:
            with open(f) as fh:
                evs = [json.loads(line) for line in fh if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReplayError(f"cannot read trace file {f}: {e}") from None
        if r in out:
            raise ReplayError(f"rank {r} appears in two trace files")
        out[r] = evs
    if sorted(out) != list(range(len(out))):
        raise ReplayError(f"trace has ranks {sorted(out)}; expected 0..{len(out) - 1} "
                          "(one file per rank of the job)")
    if not any(out.values()):
        raise ReplayError(f"the trace files in {source} hold no events")
    return marked_steps(out)


def _key(e: dict) -> tuple:
    return (e["op"], e["comm"], int(e["comm_size"]), int(e["count"]), e.get("phase", ""))


# --------------------------------------------------------------------------- steps
def has_markers(per_rank: dict[int, list[dict]]) -> bool:
    """True when the events were cut on step markers (each carries its ``step``)."""
    return any(evs and "step" in evs[0] and "op" in evs[0] for evs in per_rank.values())


def marked_steps(per_rank: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """The calls of the marked steps, on a timeline without what ran between steps.

    ``per_rank`` holds each rank's trace records (calls and spans). Without "step"
    spans it returns the calls unchanged (replay then splits by repetition). With
    them: a call belongs to the step span that holds its start; steps are kept when
    every rank issued, in them, its most common sequence of call keys with the most
    common batch (steps with another batch or other calls, e.g. an epoch's short
    last batch, are left out), and each rank's kept steps are laid end to end (the
    time between two kept steps is cut out, each step keeps its own compute before,
    between and after its calls). Each returned call is a copy with ``step`` (the
    step number) and ``samples`` (its global batch) added. Raises ReplayError when
    fewer than two steps repeat the same calls.
    """
    steps = {r: [sp for sp in spans_of(recs) if sp["span"] == "step"]
             for r, recs in per_rank.items()}
    calls = {r: calls_of(recs) for r, recs in per_rank.items()}
    if not any(steps.values()):
        return calls
    if not all(steps.values()):
        missing = sorted(r for r, v in steps.items() if not v)
        raise ReplayError(f"rank(s) {missing} of the trace have no step markers (the others do)")
    per_step: dict[int, dict[int, tuple]] = {}     # step -> rank -> (span, call indices)
    for r, sps in steps.items():
        evs, j = calls[r], 0
        order = sorted(range(len(evs)), key=lambda i: float(evs[i]["t0"]))
        for sp in sps:
            idx = []
            while j < len(order) and float(evs[order[j]]["t0"]) < sp["t0"]:
                j += 1
            while j < len(order) and float(evs[order[j]]["t0"]) <= sp["t1"]:
                idx.append(order[j])
                j += 1
            per_step.setdefault(int(sp["step"]), {})[r] = (sp, sorted(idx))
    nranks = len(per_rank)

    def signature(r, sp, idx):
        return (sp.get("samples"), tuple(_key(calls[r][i]) for i in idx))

    common = {}
    for r in per_rank:
        sigs = [signature(r, *per_step[k][r]) for k in per_step if r in per_step[k]]
        common[r] = max(set(sigs), key=lambda x: (sigs.count(x), -sigs.index(x)))
    kept = [k for k in sorted(per_step) if len(per_step[k]) == nranks
            and all(signature(r, *per_step[k][r]) == common[r] for r in per_rank)]
    if len(kept) < 2:
        raise ReplayError(f"the trace marks {len(per_step)} step(s) but only {len(kept)} issue "
                          "the calls most steps do on every rank: record at least 3 steps")
    out = {}
    for r in per_rank:
        now, lst = 0.0, []
        for k in kept:
            sp, idx = per_step[k][r]
            shift = now - sp["t0"]
            for i in idx:
                e = calls[r][i]
                lst.append({**e, "t0": float(e["t0"]) + shift, "t1": float(e["t1"]) + shift,
                            "step": k, "samples": sp.get("samples")})
            now = sp["t1"] + shift
        out[r] = lst
    return out


def find_period(keys: list, min_repeats: int = 2) -> tuple[int, int, int]:
    """(start, period, repeats) of the longest run of a repeating block in ``keys``.

    For every shift p the run of positions i with keys[i] == keys[i + p] is found
    (vectorised); a step of period P repeated n times gives a run of (n - 1) P, the
    longest of all shifts (inner repetitions are shorter, multiples of P lose one
    period). Ties go to the smaller shift. Raises ReplayError when nothing repeats
    ``min_repeats`` times.
    """
    codes = {}
    a = np.array([codes.setdefault(k, len(codes)) for k in keys], dtype=np.int64)
    L = len(a)
    best = (0, 0, 0)                      # (run length, -p, start)
    for p in range(1, L // min_repeats + 1):
        eq = np.concatenate(([0], (a[:-p] == a[p:]).astype(np.int8), [0]))
        d = np.diff(eq)
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        if not len(starts):
            continue
        j = int(np.argmax(ends - starts))
        run = int(ends[j] - starts[j])
        if run >= (min_repeats - 1) * p and (run, -p) > best[:2]:
            best = (run, -p, int(starts[j]))
    run, negp, start = best
    if run == 0:
        raise ReplayError(f"no repeating step in {L} events: record at least {min_repeats} "
                          "training steps")
    p = -negp
    return start, p, (run + p) // p


def _forwardish(phase: str) -> bool:
    return phase.endswith(".forward")


def step_window(events: list[dict], steps: int | None = None) -> tuple[int, int, int]:
    """(first, period, n): record indices [first, first + n * period) hold n whole steps.

    The last ``steps`` steps of the steady state (default all of them but the first,
    which warms up). Events cut on step markers (:func:`marked_steps`) are split there;
    others are split by repetition, aligned so a step ends with its last non-blocking
    completion or starts at its first forward message.
    """
    if events and "step" in events[0]:
        p = sum(1 for e in events if e["step"] == events[0]["step"])
        if p == 0 or len(events) % p:
            raise ReplayError("the marked steps do not hold the same number of calls")
        first, n = p, len(events) // p - 1     # the first kept step warms up
        if steps is not None:
            k = min(int(steps), n)
            first, n = first + (n - k) * p, k
        if n < 1:
            raise ReplayError("the trace holds no whole step after warm-up; record more steps")
        return first, p, n
    start, p, reps = find_period([_key(e) for e in events])
    block = events[start:start + p]
    off = 0
    nb = [i for i, e in enumerate(block) if e["op"] in NONBLOCKING]
    if nb:
        off = (nb[-1] + 1) % p
    else:
        for i in range(p):
            if _forwardish(block[i].get("phase", "")) and not _forwardish(block[i - 1].get("phase", "")):
                off = i
                break
    first = start + off
    n = (start + reps * p - first) // p
    if first == 0:                 # the step must have an activity before it
        first, n = first + p, n - 1
    if n > 1:                      # drop the first steady step: it warms up
        first, n = first + p, n - 1
    if steps is not None:
        k = min(int(steps), n)
        first, n = first + (n - k) * p, k
    if n < 1:
        raise ReplayError("the trace holds no whole step after warm-up; record more steps")
    return first, p, n


# --------------------------------------------------------------------------- timeline
@dataclass
class Item:
    """One main-stream activity of a rank: a blocking call, a post or a wait.

    gap        measured compute seconds before it (on this rank)
    measured   measured seconds blocked in it (0 for a post)
    """

    kind: str            # "block" | "post" | "wait"
    event: dict
    index: int           # record index of the event
    gap: float
    measured: float


def timeline(events: list[dict]) -> list[Item]:
    """Every event of one rank as main-stream items in time order, with compute gaps."""
    raw = []
    for i, e in enumerate(events):
        if e["op"] in NONBLOCKING:
            raw.append((float(e["t0"]), 0, "post", i))
            raw.append((float(e["t1"]), 1, "wait", i))
        else:
            raw.append((float(e["t0"]), 1, "block", i))
    raw.sort(key=lambda x: (x[0], x[1], x[3]))
    out, now = [], None
    for t, _, kind, i in raw:
        e = events[i]
        if kind == "block":
            gap = 0.0 if now is None else max(float(e["t0"]) - now, 0.0)
            meas = float(e["t1"]) - float(e["t0"])
            now = float(e["t1"])
        elif kind == "post":
            gap = 0.0 if now is None else max(float(e["t0"]) - now, 0.0)
            meas = 0.0
            now = max(now or 0.0, float(e["t0"]))
        else:                                  # wait: called right after the last activity
            gap = 0.0
            meas = max(float(e["t1"]) - (now if now is not None else float(e["t0"])), 0.0)
            now = float(e["t1"])
        out.append(Item(kind, e, i, gap, meas))
    return out


def _window_items(items: list[Item], first: int, count: int) -> list[Item]:
    """Items whose event lies in the record window (a wait or block belongs to the
    window by its record index; a post to the window of its wait)."""
    return [it for it in items if first <= it.index < first + count]


# --------------------------------------------------------------------------- layout
@dataclass
class Layout:
    P: int
    dp: int
    tp: int


def _calls(source) -> dict[int, list[dict]]:
    """{rank: call events} of a trace source (see :func:`replay`)."""
    if not isinstance(source, dict):
        return load_trace(source)
    if any("span" in e for evs in source.values() for e in evs):
        return marked_steps(source)
    return source


def infer_layout(per_rank: dict[int, list[dict]]) -> Layout:
    P = len(per_rank)
    sizes: dict[str, set] = {}
    for evs in per_rank.values():
        for e in calls_of(evs):
            sizes.setdefault(e["comm"], set()).add(int(e["comm_size"]))
    for name in ("tp", "dp"):
        if len(sizes.get(name, ())) > 1:
            raise ReplayError(f"communicator {name!r} has several sizes {sorted(sizes[name])}")
    tp = next(iter(sizes.get("tp", {0}))) or 0
    dp = next(iter(sizes.get("dp", {0}))) or 0
    if not tp and not dp:
        dp, tp = P, 1
    elif not tp:
        tp = P // dp
    elif not dp:
        dp = P // tp
    if dp * tp != P:
        raise ReplayError(f"communicators 'dp' ({dp}) x 'tp' ({tp}) do not make the "
                          f"{P} ranks of the trace")
    return Layout(P, dp, tp)


def _members(comm: str, size: int, rank: int, lay: Layout) -> tuple | None:
    """World ranks of ``rank``'s group on communicator ``comm`` (None: unknown)."""
    if size <= 1:
        return (rank,)
    if comm == "tp" and size == lay.tp:
        base = rank - rank % lay.tp
        return tuple(range(base, base + lay.tp))
    if comm == "dp" and size == lay.dp:
        return tuple(range(rank % lay.tp, lay.P, lay.tp))
    if size == lay.P:
        return tuple(range(lay.P))
    return None


def _group_kind(comm: str, size: int, lay: Layout) -> str:
    if size <= 1:
        return "self"
    if comm == "tp" and size == lay.tp:
        return "tp"
    if comm == "dp" and size == lay.dp:
        return "dp"
    return "world"


def sim_bytes(e: dict, member_bytes=None) -> tuple[str, float]:
    """(cost model op, n) of a trace event; ``member_bytes`` lists the group's bytes
    for gather-type ops (default: this rank's block times the group size)."""
    try:
        op, rule = _OPS[e["op"]]
    except KeyError:
        raise ReplayError(f"cannot cost trace op {e['op']!r}") from None
    p = int(e["comm_size"])
    if rule == "same":
        return op, float(e["bytes"])
    if rule == "sum":
        return op, float(sum(member_bytes)) if member_bytes is not None else float(e["bytes"]) * p
    return op, OBJ_BYTES * (p if op in ("allgather", "gather") else 1)


# --------------------------------------------------------------------------- own size
@dataclass
class RankReplay:
    """One rank's replay; arrays hold one value per replayed step.

    comm: seconds blocked in communication (blocking calls and waits); step: seconds
    from the end of the previous step to the end of this one.
    """

    rank: int
    measured_comm: np.ndarray
    predicted_comm: np.ndarray
    measured_step: np.ndarray
    predicted_step: np.ndarray
    measured_by_op: dict[str, np.ndarray] = field(default_factory=dict)
    predicted_by_op: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ReplayReport:
    """Replay of a recorded run at its own size.

    Summaries are medians over the replayed steps (a shared machine adds outliers:
    a descheduled rank, a page fault), then the mean over ranks for communication
    and the slowest rank for the step.
    """

    P: int
    dp: int
    tp: int
    steps: int
    period: int
    cluster: str
    ranks: list[RankReplay]
    markers: bool = False            # steps split on the trainer's step markers
    samples: int | None = None       # global batch of a replayed step, when marked

    def _mean_median(self, attr) -> float:
        return float(np.mean([np.median(getattr(r, attr)) for r in self.ranks]))

    @property
    def measured_comm_s(self) -> float:
        return self._mean_median("measured_comm")

    @property
    def predicted_comm_s(self) -> float:
        return self._mean_median("predicted_comm")

    @property
    def measured_step_s(self) -> float:
        return float(max(np.median(r.measured_step) for r in self.ranks))

    @property
    def predicted_step_s(self) -> float:
        return float(max(np.median(r.predicted_step) for r in self.ranks))

    def by_op(self) -> dict[str, tuple[float, float]]:
        """{op: (measured, predicted)} seconds per step (median over steps, mean over ranks)."""
        ops = sorted({o for r in self.ranks for o in (*r.measured_by_op, *r.predicted_by_op)})
        z = np.zeros(self.steps)
        return {o: (float(np.mean([np.median(r.measured_by_op.get(o, z)) for r in self.ranks])),
                    float(np.mean([np.median(r.predicted_by_op.get(o, z)) for r in self.ranks])))
                for o in ops}

    def format(self) -> str:
        split = ("split on the trainer's step markers" if self.markers else
                 "split by repetition: the trace has no step markers, so a step may hold "
                 "evaluation or checkpoint calls")
        lines = [f"replay of a {self.P}-rank run (dp={self.dp} x tp={self.tp}), {self.steps} "
                 f"step(s) of {self.period} calls, on {self.cluster} (medians over steps; "
                 f"{split})",
                 f"{'':<22}{'measured':>12}{'predicted':>12}{'error':>9}"]

        def row(label, m, p, unit="ms", scale=1e3):
            err = f"{(p - m) / m * 100:+.1f}%" if m > 0 else "-"
            lines.append(f"{label:<22}{m * scale:>10.3f}{unit}{p * scale:>10.3f}{unit}{err:>9}")
        row("step time", self.measured_step_s, self.predicted_step_s)
        if self.samples and self.measured_step_s > 0 and self.predicted_step_s > 0:
            lines.append(f"{'samples/s':<22}{self.samples / self.measured_step_s:>12.0f}"
                         f"{self.samples / self.predicted_step_s:>12.0f}")
        row("communication/rank", self.measured_comm_s, self.predicted_comm_s)
        for op, (m, p) in self.by_op().items():
            row(f"  {op}", m, p)
        return "\n".join(lines)


def replay(source, cluster: Cluster, *, steps: int | None = None,
           model: CostModel | None = None) -> ReplayReport:
    """Predict a recorded run at its own size on ``cluster`` (see the module docstring).

    ``source`` is a trace directory, a glob, a list of files, or {rank: events}.
    """
    per_rank = _calls(source)
    lay = infer_layout(per_rank)
    model = model or CostModel(cluster)
    rpn = cluster.ranks_per_node
    hier = cluster.thresholds.hierarchical
    first, period, n = step_window(per_rank[0], steps)
    ops0 = [e["op"] for e in per_rank[0][first:first + n * period]]
    items: dict[int, list[Item]] = {}
    t_start: dict[int, float] = {}
    for r, evs in per_rank.items():
        if len(evs) < first + n * period or [e["op"] for e in evs[first:first + n * period]] != ops0:
            raise ReplayError(f"rank {r} issued a different sequence of calls than rank 0 in "
                              "the replayed steps")
        tl = timeline(evs)
        items[r] = _window_items(tl, first, n * period)
        t_start[r] = _end_before(tl, first)

    def step_of(it):
        return (it.index - first) // period

    # discrete-event run: a clock per rank, arrivals per (group, sequence number)
    ranks = sorted(items)
    clock = {r: 0.0 for r in ranks}
    ptr = {r: 0 for r in ranks}
    seq: dict[tuple, int] = {}
    keys: dict[tuple, tuple] = {}               # (rank, record index) -> instance key
    arrivals: dict[tuple, dict[int, float]] = {}
    member_bytes: dict[tuple, dict[int, float]] = {}
    done: dict[tuple, float] = {}
    pred = {r: np.zeros(n) for r in ranks}
    pred_op = {r: {} for r in ranks}
    pred_end = {r: np.zeros(n) for r in ranks}

    def instance(r, it):
        k = (r, it.index)
        if k not in keys:
            e = it.event
            members = None if e["op"] in P2P else _members(e["comm"], int(e["comm_size"]), r, lay)
            g = (e["comm"], members or (r,))
            s = seq.get((g, r), 0)
            seq[(g, r)] = s + 1
            keys[k] = (g, s)
        return keys[k]

    def cost(e, key):
        op, nb = sim_bytes(e, list(member_bytes[key].values()))
        if e["op"] in P2P:
            return model.cost(op, nb, 2).seconds if int(e["comm_size"]) > 1 else 0.0
        p = len(key[0][1])
        if p <= 1:
            return 0.0
        sh = group_shape(_group_kind(e["comm"], p, lay), lay.dp, lay.tp, rpn)
        return model.cost(op, nb, p, local=min(sh.local, p), nodes=sh.nodes,
                          nic_share=sh.nic_share(op, hier)).seconds

    def add(r, it, dt):
        k, op = step_of(it), it.event["op"]
        pred[r][k] += dt
        pred_op[r].setdefault(op, np.zeros(n))[k] += dt

    remaining = sum(len(v) for v in items.values())
    while remaining:
        progress = False
        for r in ranks:
            lst = items[r]
            while ptr[r] < len(lst):
                it = lst[ptr[r]]
                e = it.event
                key = instance(r, it)
                if it.kind in ("block", "post"):
                    arr = arrivals.setdefault(key, {})
                    if r not in arr:
                        clock[r] += it.gap
                        arr[r] = clock[r]
                        member_bytes.setdefault(key, {})[r] = float(e["bytes"])
                    if key not in done:
                        if len(arr) < len(key[0][1]):
                            break                      # wait for the rest of the group
                        done[key] = max(arr.values()) + cost(e, key)
                    if it.kind == "block":
                        add(r, it, done[key] - arr[r])
                        clock[r] = done[key]
                else:                                  # the wait of a posted operation
                    if key not in done:
                        break
                    end = max(clock[r], done[key])
                    add(r, it, end - clock[r])
                    clock[r] = end
                pred_end[r][step_of(it)] = clock[r]
                ptr[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = {r: lst[ptr[r]].event["op"] + "@" + lst[ptr[r]].event["comm"]
                     for r, lst in items.items() if ptr[r] < len(lst)}
            raise ReplayError(f"replay cannot progress (ranks wait for each other): {stuck}")

    out = []
    for r in ranks:
        meas = np.zeros(n)
        meas_op: dict[str, np.ndarray] = {}
        meas_end = np.zeros(n)
        for it in items[r]:
            k = step_of(it)
            meas[k] += it.measured
            meas_op.setdefault(it.event["op"], np.zeros(n))[k] += it.measured
            end = float(it.event["t0"] if it.kind == "post" else it.event["t1"])
            meas_end[k] = max(meas_end[k], end)
        ends = np.concatenate(([t_start[r]], meas_end))
        pends = np.concatenate(([0.0], pred_end[r]))
        out.append(RankReplay(r, meas, pred[r], np.diff(ends), np.diff(pends), meas_op, pred_op[r]))
    markers = has_markers(per_rank)
    samples = per_rank[0][first].get("samples") if markers else None
    return ReplayReport(lay.P, lay.dp, lay.tp, n, period, cluster.name, out, markers, samples)


def _end_before(items: list[Item], first: int) -> float:
    """End time of the last activity of events recorded before index ``first``."""
    t = None
    for it in items:
        if it.index < first:
            e = it.event
            end = float(e["t0"]) if it.kind == "post" else float(e["t1"])
            t = end if t is None else max(t, end)
    if t is None:
        raise ReplayError("no activity before the replayed window")
    return t


# --------------------------------------------------------------------------- rescaled
def recorded_local_batch(events: list[dict], dp: int = 1) -> int | None:
    """Rows per replica of the recorded run: the marked steps' global batch / ``dp``
    (rounded up), else the class-parallel loss's first allreduce (count = local
    batch), if the trace has either."""
    marked = next((e["samples"] for e in events if e.get("samples")), None)
    if marked:
        return -(-int(marked) // max(int(dp), 1))
    for e in events:
        if e.get("phase") == "loss.forward" and e["op"] == "allreduce":
            return int(e["count"])
    return None


def replay_workload(source, cluster: Cluster, ranks: int | None = None, *,
                    rank: int | None = None, batch_scale: float = 1.0,
                    compute_scale: float = 1.0, steps: int | None = None,
                    recorded_batch: int | None = None, name: str | None = None) -> Workload:
    """A recorded step as an engine Workload at ``ranks`` ranks (default: the recorded
    count) on ``cluster``, under the rescaling rule of the module docstring.

    Every step issues the same calls in the same order, so each compute gap is
    averaged over the replayed steps. ``rank`` None takes, before every call, the
    longest gap over all ranks: in a program that synchronises at each collective
    the slowest rank sets the pace (the single-rank engine cannot see skew
    otherwise); an int replays that rank alone. ``recorded_batch`` is the recorded
    run's rows per replica (default: read from the class-parallel loss's messages,
    else 1), for samples per step.
    """
    per_rank = _calls(source)
    lay = infer_layout(per_rank)
    P = int(ranks or lay.P)
    if P < 1 or P % lay.tp:
        raise ReplayError(f"{P} ranks cannot keep the recorded tp={lay.tp} (rescaling keeps "
                          "tp; use the analytic workload to change it)")
    dp = P // lay.tp
    first, period, n = step_window(per_rank[0], steps)

    def steps_of(r):
        items = _window_items(timeline(per_rank[r]), first, n * period)
        out = [[it for it in items if first + k * period <= it.index < first + (k + 1) * period]
               for k in range(n)]
        if any([(it.kind, it.event["op"]) for it in s] != [(it.kind, it.event["op"]) for it in out[0]]
               for s in out):
            raise ReplayError(f"rank {r}: the replayed steps do not repeat the same calls")
        return out

    ranks_used = sorted(per_rank) if rank is None else [int(rank)]
    per_step = {r: steps_of(r) for r in ranks_used}
    ref = per_step[ranks_used[0]][0]
    sig = [(it.kind, it.event["op"]) for it in ref]
    if any([(it.kind, it.event["op"]) for it in per_step[r][0]] != sig for r in ranks_used):
        ranks_used = [ranks_used[0]]           # ranks order their calls differently: rank 0
    gaps = np.max([np.mean([[it.gap for it in s] for s in per_step[r]], axis=0)
                   for r in ranks_used], axis=0)
    evs = per_rank[ranks_used[0]]
    rate = cluster.compute.elementwise_gbps * 1e9
    phases: list[Phase] = []
    stage = "forward"
    for it, gap in zip(ref, gaps):
        e = it.event
        label = e.get("phase") or e["op"]
        if label.endswith(".backward"):
            stage = "backward"
        if gap > 0:
            secs = float(gap) * batch_scale * compute_scale
            phases.append(Phase("compute", f"gap.{label}", bytes=secs * rate,
                                op_kind="elementwise", stage=stage))
        if it.kind == "wait":
            # the data-parallel wait: the main stream joins the second stream here
            phases.append(Phase("compute", f"wait.{label}", op_kind="elementwise",
                                stage="optimizer"))
            stage = "forward"
            continue
        kind = _group_kind(e["comm"], int(e["comm_size"]), lay)
        p_new = {"tp": lay.tp, "dp": dp, "world": P, "self": 1}[kind]
        op, nb = sim_bytes(e)
        if kind == "tp":
            nb *= batch_scale
        if _OPS[e["op"]][1] == "sum" and kind != "self":
            nb = nb / int(e["comm_size"]) * p_new
        phases.append(Phase("comm", f"{label}.{e['op']}", op=op, group=kind, bytes=nb,
                            overlappable=it.kind == "post", stage=stage))
    local_b = recorded_batch or recorded_local_batch(evs, lay.dp)
    samples = int(round((local_b or 1) * batch_scale)) * dp
    return Workload(name=name or f"replay dp={dp} tp={lay.tp}", phases=phases,
                    samples_per_step=max(samples, 1), memory_bytes_per_rank=0.0, dp=dp, tp=lay.tp)
