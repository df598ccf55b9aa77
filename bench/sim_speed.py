"""How fast is the simulator at 16384 ranks?

    python bench/sim_speed.py

Wall time of one simulated step at 16384 ranks (a 48-layer transformer-like workload,
and digits-cnn from the analytic workload), of every dp x tp layout of 16384 ranks,
of the planner over them, and of the `mpifc simulate` table at 2..16384 ranks.
Targets: one layout < 1 s, all 15 layouts < 3 s, the planner < 5 s, the table < 5 s
(best of 3 runs each; the tests check instead that the work grows with log P).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "sim"))

from sim_helpers import big_workload  # noqa: E402

from mpifc.cli import main as cli  # noqa: E402
from mpifc.config import load_config  # noqa: E402
from mpifc.sim.cluster import preset  # noqa: E402
from mpifc.sim.engine import simulate  # noqa: E402
from mpifc.sim.planner import factorisations, plan, workload_cost  # noqa: E402
from mpifc.sim.workload import describe_step, workload_builder  # noqa: E402


def best(fn, repeats=3):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def table():
    with contextlib.redirect_stdout(io.StringIO()):
        cli(["simulate", "digits-cnn", "--cluster", "ib-hdr100", "--ranks", "2,8,64,1024,16384",
             "--tp", "2", "--batch-per-rank", "64"])


def main():
    ndr, hdr = preset("ib-ndr400"), preset("ib-hdr100")
    cfg = load_config("digits-cnn")
    w = big_workload(2048, 8)
    rows = [
        ("simulate, 48-layer workload, 2048x8", lambda: simulate(w, ndr), 1.0),
        ("simulate, all 15 layouts of 16384", lambda: [simulate(big_workload(dp, tp), ndr)
                                                      for dp, tp in factorisations(16384)], 3.0),
        ("describe + simulate digits-cnn 4096x4",
         lambda: simulate(describe_step(cfg, 4096, 4, local_batch=64).workload, hdr), 1.0),
        ("plan digits-cnn, 16384 ranks",
         lambda: plan(16384, workload_cost(workload_builder(cfg, local_batch=64), hdr)), 5.0),
        ("mpifc simulate table, 2..16384 ranks", table, 5.0),
    ]
    print(f"{'simulator at 16384 ranks':<42}{'best of 3':>12}{'target':>10}")
    for name, fn, target in rows:
        s = best(fn)
        print(f"{name:<42}{s * 1e3:>10.1f}ms{'<':>4}{target:>4.0f} s  "
              f"{'met' if s < target else 'MISSED'}")


if __name__ == "__main__":
    main()
