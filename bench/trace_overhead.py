"""What does marking the trainer's steps and spans cost per step?

    python bench/trace_overhead.py

Times an empty ``with trace.span(...)`` (tracing on and off), ``trace.step``, a
``trace.phase`` block for comparison, and the four blocks the trainer enters per step
(step, forward, backward, update), against one training step of digits-mlp on one
rank (batch 64). Target: the spans cost under 1 % of the step of the smallest preset. Best of 5 runs of
100,000 blocks each.
"""
from __future__ import annotations

import time

import numpy as np

from mpifc.comm import trace

N = 100_000


def best(fn, repeats=5):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def loop(make):
    def run():
        for _ in range(N):
            with make():
                pass
        trace.reset()
    return run


def per_step():
    for k in range(N):
        with trace.step(k, 64):
            with trace.span("forward"):
                pass
            with trace.span("backward"):
                pass
            with trace.span("update"):
                pass
    trace.reset()


def step_time():
    from mpifc.comm import Grid, world
    from mpifc.config import load_config
    from mpifc.models import build_model
    from mpifc.optim import Adam
    from mpifc.parallel import DataParallel

    comm = world()
    grid = Grid(comm, comm.size, 1)
    net = build_model(load_config("digits-mlp")["model"], grid, seed=0)
    ddp = DataParallel(net, grid.dp_comm)
    opt = Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 64)

    def one():
        for _ in range(50):
            ddp.zero_grad()
            net.loss.forward(net.forward(x), y)
            ddp.backward(net.loss.backward(1.0))
            ddp.synchronize()
            opt.step()
    with trace.disabled():
        return best(one) / 50


def main():
    trace.enable()
    span = best(loop(lambda: trace.span("forward"))) / N
    step = best(loop(lambda: trace.step(1, 64))) / N
    phase = best(loop(lambda: trace.phase("fc1.forward"))) / N
    four = best(per_step) / N
    with trace.disabled():
        off = best(loop(lambda: trace.span("forward"))) / N
    s = step_time()
    print(f"{'block':<34}{'per block':>12}")
    print(f"{'trace.span, tracing on':<34}{span * 1e6:>10.2f}us")
    print(f"{'trace.step, tracing on':<34}{step * 1e6:>10.2f}us")
    print(f"{'trace.span, tracing off':<34}{off * 1e6:>10.2f}us")
    print(f"{'trace.phase (for comparison)':<34}{phase * 1e6:>10.2f}us")
    print(f"{'a step: step + fwd/bwd/update':<34}{four * 1e6:>10.2f}us")
    print(f"digits-mlp step on 1 rank (batch 64): {s * 1e3:.3f} ms; the spans are "
          f"{four / s:.3%} of it (target < 1 %: {'met' if four / s < 1e-2 else 'MISSED'})")


if __name__ == "__main__":
    main()
