"""``mpifc calibrate`` and ``mpifc simulate``: argument parsers and handlers.

    mpiexec -n 2 mpifc calibrate --out cluster.toml [--quick]
    mpifc simulate digits-cnn --cluster cluster.toml --ranks 2,8,64,1024,16384
    mpifc simulate digits-mlp --cluster ib-hdr100 --ranks 64,1024 --plan --mem-cap 4
    mpifc simulate digits-mlp --cluster cluster.toml --ranks 2,64 --replay runs/digits-mlp/trace

:func:`add_calibrate` / :func:`add_simulate` register the subcommands on the CLI's
subparsers; everything else lives here, so ``mpifc/cli.py`` stays a table of commands.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

GiB = 2 ** 30


# --------------------------------------------------------------------------- calibrate
def add_calibrate(sub) -> None:
    c = sub.add_parser(
        "calibrate", help="measure this machine under mpiexec and write a cluster TOML",
        description="Run on every rank under mpiexec (e.g. mpiexec -n 2 mpifc calibrate): "
        "ping-pong within and across nodes, the MPI library's own collectives over "
        "message sizes and group sizes, GEMM / conv / element-wise rates. The TOML it "
        "writes is the --cluster of `mpifc simulate`.")
    c.add_argument("--out", default="cluster.toml", help="cluster TOML to write (default %(default)s)")
    c.add_argument("--quick", action="store_true",
                   help="fewer sizes, ops and trials: a few seconds (for tests and a first look)")
    c.add_argument("--max-bytes", type=int, default=None,
                   help="largest message measured (default 4 MiB, quick 256 KiB)")
    c.add_argument("--inter-preset", default=None,
                   help="on one node: take the inter-node link from this network preset "
                        "(default: a copy of the measured intra-node link, noted in the file)")
    c.add_argument("--name", default=None, help="cluster name (default: the host name)")
    c.add_argument("--rounds", type=int, default=1,
                   help="measure everything this many times and keep the fastest of each "
                        "figure: the machine without other tenants' load, on a shared or "
                        "virtual machine (default %(default)s)")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> None:
    from mpifc.comm import world
    from mpifc.sim.calibrate import calibrate
    from mpifc.sim.cluster import ClusterError, preset

    if args.inter_preset:                 # every rank checks it, before measuring anything
        try:
            preset(args.inter_preset)
        except ClusterError as e:
            raise SystemExit(f"mpifc calibrate: --inter-preset: {e}") from None
    comm = world()
    c = calibrate(args.out, quick=args.quick, max_bytes=args.max_bytes,
                  inter_preset=args.inter_preset, name=args.name, rounds=args.rounds,
                  log=print)
    if comm.rank == 0:
        took = next((l for l in c.notes.splitlines() if l.startswith("calibration took")), "")
        print(f"wrote {args.out}: {c.nodes} node(s) x {c.ranks_per_node} ranks, "
              f"{len(c.measured)} measured collective tables; {took}", flush=True)


# --------------------------------------------------------------------------- simulate
def add_simulate(sub) -> None:
    s = sub.add_parser(
        "simulate", help="predict a training step at many rank counts on a cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict one training step of CONFIG (a TOML file or preset) on a "
        "cluster (a TOML from `mpifc calibrate`, a hostfile-built TOML, or a network "
        "preset) at each rank count: compute, every collective (by op and group), "
        "exposed and overlapped communication, step time, samples/s, memory per rank.",
        epilog="batch: train.batch_size is the global batch, split over the dp replicas, as\n"
        "in `mpifc train` (strong scaling); --batch N sets another global batch;\n"
        "--batch-per-rank n gives each replica n samples (weak scaling: global batch =\n"
        "n x dp; the tp ranks of a replica share its samples). Layout: tp from --tp (or parallel.tp), dp = the\n"
        "rest; --layout lists explicit DPxTP pairs instead of --ranks; --plan ranks every\n"
        "dp x tp layout of each rank count that fits --mem-cap.")
    s.add_argument("config", help="training config TOML or preset name")
    s.add_argument("--cluster", required=True, help="cluster TOML file or network preset name")
    s.add_argument("--ranks", default="2,8,64,1024,16384", help="comma-separated rank counts")
    s.add_argument("--dp", type=int, default=None, help="data-parallel size (tp = ranks / dp)")
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel size (dp = ranks / tp)")
    s.add_argument("--layout", default=None, help="explicit layouts, e.g. 2x1,4x2 (DPxTP)")
    s.add_argument("--batch", type=int, default=None,
                   help="global batch per step (default train.batch_size, as in training)")
    s.add_argument("--batch-per-rank", type=int, default=None,
                   help="samples per dp replica per step (weak scaling: global = n x dp)")
    s.add_argument("--plan", action="store_true", help="rank every dp x tp layout of each count")
    s.add_argument("--mem-cap", type=float, default=None,
                   help="memory per rank in GiB for --plan (default: the cluster's, if any)")
    s.add_argument("--cores-per-node", type=int, default=None,
                   help="cores of a node, when its ranks outnumber them (oversubscription): "
                        "each rank's compute rates are scaled by cores / ranks per node")
    s.add_argument("--no-overlap", action="store_true",
                   help="data-parallel buckets block instead of hiding behind backward")
    s.add_argument("--replay", default=None, metavar="TRACE_DIR",
                   help="use a recorded run's trace (per-rank JSON lines) instead of the "
                        "analytic workload: replayed at its own size, then rescaled")
    s.add_argument("--compute-scale", type=float, default=1.0,
                   help="--replay: recorded machine's speed / target's (default 1)")
    s.add_argument("--plot", default=None, metavar="PNG",
                   help="scaling curves as a PNG (needs matplotlib: pip install 'mpifc[plot]')")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set parallel.bucket_mb=4")
    s.set_defaults(func=cmd_simulate)


def _fail(msg: str):
    raise SystemExit(f"mpifc simulate: {msg}")


def load_cluster(spec: str):
    """A cluster TOML path or a network preset name."""
    from mpifc.sim.cluster import ClusterError, load, preset, preset_names

    try:
        if os.path.exists(spec):
            return load(spec)
        if spec in preset_names():
            return preset(spec)
    except ClusterError as e:
        _fail(f"--cluster {e}")
    _fail(f"--cluster {spec!r} is neither a file nor a network preset "
          f"({', '.join(preset_names())})")


def share_cores(cluster, cores_per_node: int):
    """The cluster with its ranks sharing ``cores_per_node`` cores (oversubscription).

    When a node runs more ranks than it has cores, MPI ranks that wait busy-poll, so
    every rank stays runnable and each gets cores / ranks of a core: every compute
    rate (and GEMM / conv curve) is multiplied by cores_per_node / ranks_per_node.
    Calibrated compute rates do not contain this even when measured with the same
    ranks: a medianed per-call timing runs within one scheduler time slice. The
    links and measured collective tables are kept as calibrated (measured with the
    ranks sharing the cores, they hold the slower hand-offs). Returns the cluster
    unchanged when the node has enough cores.
    """
    from dataclasses import replace

    rpn = cluster.ranks_per_node
    if cores_per_node < 1:
        _fail(f"--cores-per-node must be >= 1, got {cores_per_node}")
    if rpn <= cores_per_node:
        return cluster
    f = cores_per_node / rpn
    c = cluster.compute
    comp = replace(c, gemm_gflops=c.gemm_gflops * f, conv_gflops=c.conv_gflops * f,
                   elementwise_gbps=c.elementwise_gbps * f,
                   gemm_curve=[(x, r * f) for x, r in c.gemm_curve],
                   conv_curve=[(x, r * f) for x, r in c.conv_curve],
                   elementwise_curve=[(x, r * f) for x, r in c.elementwise_curve],
                   kernel_curve=[(x, r * f) for x, r in c.kernel_curve],
                   call_s=c.call_s / f, row_s=c.row_s / f, reduce_call_s=c.reduce_call_s / f,
                   masked_s=c.masked_s / f)
    note = (f"{rpn} ranks share {cores_per_node} cores per node: compute rates x "
            f"{cores_per_node}/{rpn} (mpifc simulate --cores-per-node)")
    return replace(cluster, compute=comp, reduction_Bps=cluster.reduction_Bps * f,
                   notes=(cluster.notes + "\n" + note).strip())


def _int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        _fail(f"{what} must be comma-separated integers, got {text!r}")
    if not out or any(v < 1 for v in out):
        _fail(f"{what} must be positive integers, got {text!r}")
    return out


def layouts_for(args, cfg) -> list[tuple[int, int, int]]:
    """(P, dp, tp) rows to simulate; dp = 0 marks a rank count the layout cannot fill."""
    if args.layout:
        out = []
        for item in args.layout.split(","):
            try:
                dp, tp = (int(v) for v in item.lower().split("x"))
            except ValueError:
                _fail(f"--layout entries are DPxTP, e.g. 4x2; got {item!r}")
            if dp < 1 or tp < 1:
                _fail(f"--layout {item}: dp and tp must be >= 1")
            out.append((dp * tp, dp, tp))
        return out
    if args.dp is not None and args.tp is not None:
        _fail("give --dp or --tp (the other follows from the rank count), or --layout")
    out = []
    for P in _int_list(args.ranks, "--ranks"):
        if args.dp is not None:
            dp = args.dp
            out.append((P, dp, P // dp) if P % dp == 0 else (P, 0, 0))
        else:
            tp = args.tp if args.tp is not None else (cfg["parallel"].get("tp") or 1)
            out.append((P, P // tp, tp) if P % tp == 0 else (P, 0, 0))
    return out


def _global_batch(args, cfg, dp: int) -> int:
    """Samples per step over all replicas: train.batch_size is the global batch, the
    same meaning as in training (split over the dp ranks); --batch-per-rank gives each
    of the dp replicas its own n."""
    if args.batch is not None:
        return args.batch
    if args.batch_per_rank is not None:
        return args.batch_per_rank * dp
    return cfg["train"]["batch_size"]


def _comm_breakdown(report) -> dict[str, float]:
    """Seconds per collective type, keyed "op(group)"."""
    out: dict[str, float] = {}
    for ph in report.phases:
        if ph.kind == "comm":
            op = ph.op.replace("allgatherv", "allgather")
            key = f"{op}({ph.group})"
            out[key] = out.get(key, 0.0) + ph.seconds
    return out


def _fmt_s(x: float) -> str:
    if abs(x) < 1e-9:           # rounding residue of exposed = step - compute
        return "0"
    if x >= 1:
        return f"{x:.3g}s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g}ms"
    return f"{x * 1e6:.3g}us"


def _fmt_rate(x: float) -> str:
    return f"{x:.4g}" if x < 1e6 else f"{x:.3e}"


def format_table(rows: list[dict], title: str) -> str:
    """One line per row: ranks, layout, compute, each collective type, exposed,
    overlapped, step, samples/s, memory per rank."""
    ops = []
    for r in rows:
        for k in r.get("comm", {}):
            if k not in ops:
                ops.append(k)
    head = (["ranks", "dp x tp", "compute"] + ops
            + ["exposed", "overlapped", "step", "samples/s", "MiB/rank"])
    table = [head]
    notes = []
    for r in rows:
        if r.get("error"):
            table.append([str(r["P"]), r.get("layout", "-"), f"infeasible: {r['error']}"])
            continue
        rep = r["report"]
        mark = "*" if rep.beyond_cluster else ""
        if mark and "*" not in notes:
            notes.append("*")
        table.append([f"{r['P']}{mark}", f"{rep.dp}x{rep.tp}", _fmt_s(rep.compute_s)]
                     + [_fmt_s(r["comm"].get(k, 0.0)) for k in ops]
                     + [_fmt_s(rep.exposed_comm_s), _fmt_s(rep.overlapped_comm_s),
                        _fmt_s(rep.step_s), _fmt_rate(rep.samples_per_s),
                        (f"{rep.memory_bytes_per_rank / 2 ** 20:.3g}"
                         if rep.memory_bytes_per_rank else "-")])
    widths = [max(len(row[i]) for row in table if i < len(row) and len(row) == len(head))
              for i in range(len(head))]
    lines = [title]
    for row in table:
        if len(row) != len(head):
            lines.append("  ".join([row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2]]))
        else:
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if notes:
        lines.append("* more ranks than the described cluster holds: extrapolated with the same "
                     "node shape")
    return "\n".join(lines)


def cmd_simulate(args) -> None:
    from mpifc.config import ConfigError, load_config
    from mpifc.sim.engine import simulate
    from mpifc.sim.planner import LayoutInfeasible, plan
    from mpifc.sim.workload import WorkloadError, describe_step

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        _fail(str(e))
    cluster = load_cluster(args.cluster)
    if args.cores_per_node is not None:
        cluster = share_cores(cluster, args.cores_per_node)
    overlap = False if args.no_overlap else None
    if args.batch is not None and args.batch_per_rank is not None:
        _fail("give --batch (global) or --batch-per-rank, not both")

    replay_src = None
    if args.replay:
        from mpifc.sim.replay import ReplayError, infer_layout, load_trace, replay

        try:
            replay_src = load_trace(args.replay)
            rec = infer_layout(replay_src)
            own = replay(replay_src, cluster)
        except ReplayError as e:
            _fail(f"--replay {args.replay}: {e}")
        print(own.format())
        print()

    def build(P, dp, tp):
        B = _global_batch(args, cfg, dp)
        if replay_src is not None:
            from mpifc.sim.replay import ReplayError, recorded_local_batch, replay_workload

            if tp != rec.tp:
                raise LayoutInfeasible(f"a replay keeps the recorded tp={rec.tp}")
            b0 = (recorded_local_batch(replay_src[0], rec.dp)
                  or math.ceil(cfg["train"]["batch_size"] / rec.dp))
            scale = (B / dp) / b0
            try:
                wl = replay_workload(replay_src, cluster, P, batch_scale=scale,
                                     compute_scale=args.compute_scale, recorded_batch=b0)
            except ReplayError as e:
                raise LayoutInfeasible(str(e)) from None
            # the analytic model still knows the memory
            mem = describe_step(cfg, dp, tp, global_batch=B).workload.memory_bytes_per_rank
            wl.memory_bytes_per_rank = mem
            return wl
        return describe_step(cfg, dp, tp, global_batch=B, overlap=overlap).workload

    def run(P, dp, tp):
        wl = build(P, dp, tp)
        rep = simulate(wl, cluster, dp, tp)
        return rep

    batch_note = (f"global batch {args.batch}" if args.batch is not None else
                  f"{args.batch_per_rank} samples per dp replica (weak scaling)"
                  if args.batch_per_rank is not None else
                  f"global batch {cfg['train']['batch_size']} (train.batch_size)")
    src = f"replay of {args.replay}" if args.replay else "analytic workload"
    head = (f"{cfg['name']} on {cluster.name} ({cluster.nodes} node(s) x "
            f"{cluster.ranks_per_node} ranks), {src}, {batch_note}")
    rows = []
    try:
        if args.plan:
            cap = (args.mem_cap * GiB if args.mem_cap is not None
                   else cluster.memory_per_rank_bytes)
            for P in (_int_list(args.ranks, "--ranks") if not args.layout
                      else sorted({p for p, _, _ in layouts_for(args, cfg)})):
                res = plan(P, lambda dp, tp: run(P, dp, tp), cap, include_rejected=True)
                prows = []
                for lr in res:
                    if lr.report is None:
                        prows.append({"P": P, "layout": f"{lr.dp}x{lr.tp}", "error": lr.reason})
                    elif not lr.fits:
                        prows.append({"P": P, "layout": f"{lr.dp}x{lr.tp}",
                                      "error": f"{lr.reason} (step {_fmt_s(lr.step_s)})"})
                    else:
                        prows.append({"P": P, "report": lr.report,
                                      "comm": _comm_breakdown(lr.report)})
                cap_s = f"{cap / GiB:.3g} GiB" if cap else "none"
                print(format_table(prows, f"{head}\n{P} ranks: layouts fastest first "
                                          f"(memory cap {cap_s})"))
                print()
                rows += [r for r in prows if "report" in r][:1]
        else:
            for P, dp, tp in layouts_for(args, cfg):
                if dp == 0:
                    rows.append({"P": P, "error": "the layout does not divide this rank count"})
                    continue
                try:
                    rep = run(P, dp, tp)
                except LayoutInfeasible as e:
                    rows.append({"P": P, "layout": f"{dp}x{tp}", "error": str(e)})
                    continue
                rows.append({"P": P, "report": rep, "comm": _comm_breakdown(rep)})
            print(format_table(rows, head))
    except WorkloadError as e:
        _fail(str(e))
    if args.plot:
        from mpifc.sim.plot import PlotUnavailable, plot_scaling

        try:
            plot_scaling([r for r in rows if "report" in r], args.plot, title=head)
        except PlotUnavailable as e:
            print(f"mpifc simulate: {e}", file=sys.stderr)
            raise SystemExit(1)
        print(f"wrote {args.plot}")
