"""How well does the simulator predict real training steps on this machine?

    python bench/sim_accuracy.py [--ranks 1,2,3,4] [--steps 15] [--out DIR]

For each rank count N it launches one ``mpiexec -n N`` job that runs real training
steps of the digits MLP and the digits classifier (the digits-mlp and digits-cnn
presets, built with mpifc.models.build_model and DataParallel, global batch 64 of
random digits-shaped data, 8 batches in turn) under every dp x tp layout of N ranks: DP (N x 1), TP
(1 x N) and DP x TP where N allows; 3 warm-up steps, then 60 timed steps in 10 blocks,
the layouts taking turns block by block, and before each block one quick calibration
round of this machine with the N ranks (``calibrate(quick=True, rounds=10,
between_rounds=...)``: the fastest of the rounds, figure by figure). So calibration and
steps sample the same stretch of time. Per step the time of the slowest rank and the time
blocked in each kind of message (trace events; the data-parallel wait from
DataParallel).

Which steps: this virtual machine runs at two speeds in turns (the same Python code
took 1.35 us or 2.2 us per call, in stretches of 0.5 s to several seconds, from other
tenants). The simulator describes the machine without that load (calibration keeps
the fastest round of every figure and the fastest sweep of every local measurement),
so the measured figures are medians
over the fastest tenth of the steps (FASTEST), the way timeit reports the best of
its repeats; the median of all steps is printed beside them, with its error.
Then it predicts every point with the analytic workload (mpifc.sim.workload) on the
cluster calibrated with the same N and prints predicted vs measured step, compute and
exposed communication with their errors, the median |error| and the worst of the
step time, and whether the ranking of layouts by measured step time is preserved
at each N (issue 6 targets: median <= 15 %, worst <= 30 %).

One BLAS thread per rank everywhere (OMP_NUM_THREADS=1), so 1 rank uses one core.
Points with more ranks than cores are OVERSUBSCRIBED and marked so. Their cluster
is calibrated with the same N processes on the same cores (so its collective tables
hold the slower hand-offs between ranks that take turns on a core), and then
described as N ranks sharing the cores (mpifc.sim.commands.share_cores, the same as
``mpifc simulate --cores-per-node``): busy-polling MPI ranks stay runnable, so each
rank computes at cores/N of a core and the calibrated compute rates are scaled by
cores/N. (Calibration's medianed per-call timings run inside one scheduler time
slice and do not contain the sharing.) What this leaves out: a collective waiting
for a member that is descheduled, up to a time slice.

Prints from the driver only; the jobs write JSON into --out (default a temp dir).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("digits-mlp", "digits-cnn")
B = 64
#: the measured figures are medians over this fastest share of the steps
FASTEST = 0.1
#: different batches each layout steps through in turn
BATCHES = 8
_LAUNCHER = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPIR_", "MPI_LOCAL", "OMPI_")


def layouts(n):
    return [(n // tp, tp) for tp in range(1, n + 1) if n % tp == 0]


# --------------------------------------------------------------------------- worker (under mpiexec)
def worker(out_dir: str, steps: int, warmup: int, blocks: int) -> None:
    import numpy as np

    from mpifc.comm import Grid, balanced_counts, trace, world
    from mpifc.config import load_config
    from mpifc.models import build_model
    from mpifc.parallel import DataParallel
    from mpifc.sim.calibrate import calibrate
    from mpifc.train import _agree_finite, build_optimizer

    comm = world()
    N = comm.size
    grids = {(dp, tp): Grid(comm, dp, tp) for dp, tp in layouts(N)}
    setups = []
    for name in MODELS:
        cfg = load_config(name)
        for (dp, tp), grid in grids.items():
            net = build_model(cfg["model"], grid, seed=0)
            ddp = DataParallel(net, grid.dp_comm, bucket_mb=cfg["parallel"]["bucket_mb"],
                               overlap=cfg["parallel"]["overlap"])
            opt = build_optimizer(cfg, net.named_parameters())
            # BATCHES different batches in turn, as training sees new data every step
            # (one batch over and over lets the branch predictor learn its max-pool masks)
            rng = np.random.default_rng(0)
            counts, displs = balanced_counts(B, dp)
            sl = slice(displs[grid.dp_rank], displs[grid.dp_rank] + counts[grid.dp_rank])
            data = []
            for _ in range(BATCHES):
                x = rng.standard_normal((B, *cfg["model"]["input"])).astype(np.float32)
                y = rng.integers(0, 10, B)
                data.append((np.ascontiguousarray(x[sl]), y[sl]))
            setups.append({"model": name, "dp": dp, "tp": tp, "net": net, "ddp": ddp, "opt": opt,
                           "data": data, "step": [], "blocked": [], "stages": []})

    def run(st, n, record):
        """n training steps as the trainer runs them (Trainer.train_step + its check)."""
        net, ddp, opt, dp = st["net"], st["ddp"], st["opt"], st["dp"]
        bounds, waits, stages = [], [], []
        trace.reset()
        comm.barrier()
        for i in range(n):
            x, y = st["data"][i % BATCHES]
            t0 = time.perf_counter()
            ddp.zero_grad()
            loss = net.loss.forward(net.forward(x), y)
            net.loss.correct()
            t1 = time.perf_counter()
            ddp.backward(net.loss.backward(dp * len(y) / B))
            ddp.synchronize()
            t2 = time.perf_counter()
            opt.step()
            _agree_finite(comm, loss)
            bounds.append((t0, time.perf_counter()))
            stages.append((t1 - t0, t2 - t1, bounds[-1][1] - t2))
            waits.append(ddp.timings["wait"])
        if not record:
            return
        # time blocked per kind of message and step (the non-blocking buckets: the wait)
        blocked = [dict() for _ in range(n)]
        for e in trace.events():
            if e["op"] == "iallreduce":
                continue
            k = next((i for i, (a, b) in enumerate(bounds) if a <= e["t0"] <= b), None)
            if k is not None:
                key = f"{e['op']}({e['comm']})"
                blocked[k][key] = blocked[k].get(key, 0.0) + e["t1"] - e["t0"]
        for k, w in enumerate(waits):
            if w > 0:
                blocked[k]["allreduce(dp) wait"] = w
        st["step"] += [b - a for a, b in bounds]
        st["stages"] += stages
        st["blocked"] += blocked

    for st in setups:
        run(st, warmup, False)
    # the layouts take turns, block by block, and a calibration round runs before each
    # block: calibration and steps sample the same stretch of time (the cluster is the
    # fastest of the rounds, as the measured figures are the fastest steps)
    per_block = max(steps // blocks, 1)

    def block(k):
        for st in setups:
            run(st, per_block, True)
    # messages up to 1 MiB: the tables then cover every message of these models (the
    # 64 KiB activations of the tensor-parallel layers, the 340 KB gradient bucket)
    cluster = calibrate(None, quick=True, max_bytes=1 << 20, rounds=blocks, between_rounds=block)
    trace.reset()
    if comm.rank == 0:
        cluster.save(os.path.join(out_dir, f"cluster-{N}.toml"))

    results = []
    for st in setups:
        every = comm.gather_obj({"step": st["step"], "blocked": st["blocked"],
                                 "stages": st["stages"]})
        if comm.rank != 0:
            continue
        n = len(st["step"])
        step = [max(r["step"][k] for r in every) for k in range(n)]
        # the fastest tenth of the steps (see the module's docstring: the machine's
        # speed comes and goes with other tenants; calibration keeps its fast state too)
        fast = sorted(range(n), key=step.__getitem__)[:max(3, round(n * FASTEST))]
        keys = sorted({key for r in every for d in r["blocked"] for key in d})
        per = {key: statistics.median(statistics.fmean(r["blocked"][k].get(key, 0.0)
                                                       for r in every) for k in fast)
               for key in keys}
        comm_tot = statistics.median(statistics.fmean(sum(r["blocked"][k].values())
                                                      for r in every) for k in fast)
        stage = [statistics.median(statistics.fmean(r["stages"][k][j] for r in every)
                                   for k in fast) for j in range(3)]
        results.append({"model": st["model"], "N": N, "dp": st["dp"], "tp": st["tp"],
                        "step": statistics.median(step[k] for k in fast),
                        "step_all": statistics.median(step), "comm": comm_tot, "per_op": per,
                        "stages": stage})
    if comm.rank == 0:
        with open(os.path.join(out_dir, f"measured-{N}.json"), "w") as f:
            json.dump(results, f)


# --------------------------------------------------------------------------- driver
def launch(N: int, out_dir: str, steps: int, warmup: int, blocks: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER)}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    t0 = time.perf_counter()
    p = subprocess.run([mpiexec, "-n", str(N), sys.executable, os.path.abspath(__file__),
                        "--worker", "--out", out_dir, "--steps", str(steps),
                        "--warmup", str(warmup), "--blocks", str(blocks)], env=env, capture_output=True, text=True,
                       timeout=600)
    if p.returncode:
        raise SystemExit(f"the {N}-rank job failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def predict(point: dict, cluster):
    from mpifc.config import load_config
    from mpifc.sim.commands import _comm_breakdown
    from mpifc.sim.engine import simulate
    from mpifc.sim.workload import describe_step

    cfg = load_config(point["model"])
    w = describe_step(cfg, point["dp"], point["tp"], global_batch=B).workload
    rep = simulate(w, cluster)
    # the stages as the worker times them: forward (to the loss and its metrics),
    # backward (to the end of the gradient sync), optimizer (with the finiteness check)
    stage_of = {ph.label: ph.stage for ph in w.phases}
    starts = {}
    for pt in rep.phases:
        starts.setdefault(stage_of.get(pt.label.removesuffix(".unhidden")), pt.start)
    b0 = starts.get("backward", rep.step_s)
    o0 = starts.get("optimizer", rep.step_s)
    rep.stages = (b0, o0 - b0, rep.step_s - o0)
    return rep, _comm_breakdown(rep)


def err(p, m):
    return (p - m) / m * 100 if m > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,3,4")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per point")
    ap.add_argument("--blocks", type=int, default=10,
                    help="the layouts of a job take turns in this many blocks of steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.out, a.steps, a.warmup, a.blocks)
        return

    from mpifc.sim.cluster import load
    from mpifc.sim.commands import share_cores
    from mpifc.threads import cores_available

    out = a.out or tempfile.mkdtemp(prefix="mpifc-sim-accuracy-")
    os.makedirs(out, exist_ok=True)
    cores = cores_available()
    t_all = time.perf_counter()
    points = []
    loads = []
    for N in (int(v) for v in a.ranks.split(",")):
        loads.append(os.getloadavg()[0])           # other jobs on these cores, before ours
        secs = launch(N, out, a.steps, a.warmup, a.blocks)
        with open(os.path.join(out, f"measured-{N}.json")) as f:
            measured = json.load(f)
        cluster = share_cores(load(os.path.join(out, f"cluster-{N}.toml")), cores)
        for m in measured:
            rep, comm = predict(m, cluster)
            points.append((m, rep, comm))
        print(f"{N} rank(s): calibrated and measured in {secs:.1f} s", flush=True)

    print(f"\nsimulator accuracy on this machine ({cores} cores; one BLAS thread per rank; "
          f"global batch {B}; {a.steps} steps after {a.warmup} warm-up: medians over the "
          f"fastest {FASTEST:.0%} of the steps, and the median of all steps)")
    print(f"{'model':<11}{'N':>3} {'dp x tp':>8} {'':>7}{'step meas':>11}{'pred':>9}{'err':>8}"
          f"{'compute m':>11}{'pred':>9}{'err':>8}{'comm m':>9}{'pred':>9}"
          f"{'all steps':>11}{'err':>8}")
    step_err, all_err = [], []
    for m, rep, comm in points:
        over = "OVERSUB" if m["N"] > cores else ""
        m_comp = m["step"] - m["comm"]
        e = err(rep.step_s, m["step"])
        step_err.append(e)
        all_err.append(err(rep.step_s, m["step_all"]))
        print(f"{m['model']:<11}{m['N']:>3} {str(m['dp']) + 'x' + str(m['tp']):>8} {over:>7}"
              f"{m['step'] * 1e3:>9.2f}ms{rep.step_s * 1e3:>7.2f}ms{e:>+7.1f}%"
              f"{m_comp * 1e3:>9.2f}ms{rep.compute_s * 1e3:>7.2f}ms{err(rep.compute_s, m_comp):>+7.1f}%"
              f"{m['comm'] * 1e3:>7.2f}ms{rep.exposed_comm_s * 1e3:>7.2f}ms"
              f"{m['step_all'] * 1e3:>9.2f}ms{all_err[-1]:>+7.1f}%")
    print("\nper stage, measured vs predicted (ms; forward: to the loss and its metrics, "
          "backward: to the end of the gradient sync, optimizer: with the finiteness check):")
    for m, rep, _ in points:
        print(f"  {m['model']:<11}{m['N']:>2} {m['dp']}x{m['tp']:<3} " + ", ".join(
            f"{name} {mv * 1e3:.3f}/{pv * 1e3:.3f} ({err(pv, mv):+.0f}%)"
            for name, mv, pv in zip(("forward", "backward", "optimizer"), m["stages"],
                                    rep.stages)))
    print("\nper kind of message, measured time blocked per step vs predicted (ms):")
    for m, rep, comm in points:
        if m["N"] == 1:
            continue
        parts = []
        for k in sorted(set(m["per_op"]) | set(comm)):
            mk = m["per_op"].get(k, m["per_op"].get(k + " wait"))
            parts.append(f"{k} {(mk or 0) * 1e3:.3f}/{comm.get(k.replace(' wait', ''), 0) * 1e3:.3f}")
        print(f"  {m['model']:<11}{m['N']:>2} {m['dp']}x{m['tp']:<3} " + ", ".join(parts))

    for what, errs in ((f"fastest {FASTEST:.0%}", step_err), ("all steps (median)", all_err)):
        abs_all = [abs(e) for e in errs]
        inside = [abs(e) for e, (m, _, _) in zip(errs, points) if m["N"] <= cores]
        within = (f"median {statistics.median(inside):.1f} %, worst {max(inside):.1f} %"
                  if inside else "no such point measured")
        print(f"\nstep time |error|, {what}: median {statistics.median(abs_all):.1f} %, worst "
              f"{max(abs_all):.1f} % over all {len(abs_all)} points; within the cores "
              f"(N <= {cores}): {within}", end="")
    print()
    print("layout ranking by step time (measured | predicted), per model and N:")
    ok_all = True
    for name in MODELS:
        for N in sorted({m["N"] for m, _, _ in points}):
            pts = [(m, rep) for m, rep, _ in points if m["model"] == name and m["N"] == N]
            if len(pts) < 2:
                continue
            meas = [f"{m['dp']}x{m['tp']}" for m, _ in sorted(pts, key=lambda p: p[0]["step"])]
            pred = [f"{m['dp']}x{m['tp']}" for m, _ in sorted(pts, key=lambda p: p[1].step_s)]
            ok = meas == pred
            ok_all &= ok
            print(f"  {name:<11} N={N}: {' < '.join(meas)} | {' < '.join(pred)}  "
                  f"{'preserved' if ok else 'NOT preserved'}")
    print(f"ranking preserved everywhere: {'yes' if ok_all else 'no'}")
    busy = max(loads)
    print(f"1-min load average before each job: {', '.join(f'{l:.1f}' for l in loads)} "
          f"({cores} cores)" + ("  -- the machine was BUSY with other work: these numbers "
                                "measure the contention, re-run on a quiet machine"
                                if busy > 0.5 * cores else ""))
    print(f"total {time.perf_counter() - t_all:.0f} s; data in {out}")


if __name__ == "__main__":
    main()
