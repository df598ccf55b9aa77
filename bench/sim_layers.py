"""The simulator's per-layer compute against each layer's measured forward and backward.

    OMP_NUM_THREADS=1 python bench/sim_layers.py --cluster here.toml [--models digits-cnn,cifar-cnn]
        [--batch 64] [--repeat 30]

(here.toml from ``mpifc calibrate``, taken on this machine shortly before.) Per model,
one rank, training mode: each layer's fastest of --repeat forward and backward calls
(wall clock), beside the sum of that layer's compute phases in
mpifc.sim.workload.describe_step priced with the cluster's rates (no communication).
Layers with parameters and pools are listed, then the sum over all layers. The step
time in bench/sim_accuracy.py sums these and the trainer's work around them; this
table says which layer's counts to look at.
"""
import argparse
import time

import mpifc  # noqa: F401 - before NumPy: sets OPENBLAS_THREAD_TIMEOUT (mpifc.threads)
import numpy as np

from mpifc.comm import Grid, world
from mpifc.config import load_config
from mpifc.models import build_model
from mpifc.sim.cluster import load
from mpifc.sim.workload import describe_step


def measure(cfg, B, repeat):
    net = build_model(cfg["model"], Grid(world(), 1, 1), seed=0)
    net.train()
    x = np.random.default_rng(0).standard_normal((B,) + tuple(cfg["model"]["input"]))
    x = x.astype(np.float32)
    best = {}
    for _ in range(repeat):
        a = x
        for layer, nm in zip(net.layers, net.names):
            t0 = time.perf_counter()
            a = layer.forward(a)
            best[nm + ".forward"] = min(best.get(nm + ".forward", np.inf), time.perf_counter() - t0)
        g = np.ones_like(a) / a.size
        for layer, nm in list(zip(net.layers, net.names))[::-1]:
            t0 = time.perf_counter()
            g = layer.backward(g)
            best[nm + ".backward"] = min(best.get(nm + ".backward", np.inf), time.perf_counter() - t0)
            if g is None:            # the first layer with parameters: no input gradient
                break
        net.zero_grad()
    return best


def predict(cfg, B, rates):
    pred = {}
    for p in describe_step(cfg, 1, 1, global_batch=B).workload.phases:
        parts = p.label.split(".")
        if p.kind != "compute" or len(parts) < 2 or parts[1] not in ("forward", "backward"):
            continue
        k = parts[0] + "." + parts[1]
        pred[k] = pred.get(k, 0.0) + rates.seconds(
            p.op_kind, flops=p.flops, nbytes=p.bytes, calls=p.calls, rows=p.rows,
            stream=p.stream, aspect=p.aspect, reduce_calls=p.reduce_calls, masked=p.masked)
    return pred


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--models", default="digits-cnn,cifar-cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args()
    rates = load(a.cluster).compute
    for name in a.models.split(","):
        cfg = load_config(name)
        best, pred = measure(cfg, a.batch, a.repeat), predict(cfg, a.batch, rates)
        print(f"{name} (batch {a.batch}, fastest of {a.repeat}): measured / predicted ms")
        for k, v in best.items():
            if k.split(".")[0].startswith(("conv", "bn", "pool", "fc", "res")):
                p = pred.get(k, 0.0)
                print(f"  {k:<16}{v * 1e3:9.3f}{p * 1e3:9.3f}  ({(p - v) / v * 100:+.0f} %)")
        tm, tp = sum(best.values()), sum(pred.get(k, 0.0) for k in best)
        print(f"  {'all layers':<16}{tm * 1e3:9.3f}{tp * 1e3:9.3f}  ({(tp - tm) / tm * 100:+.0f} %)")
    print("(wall clock: on a machine shared with other work the measured side includes it)")


if __name__ == "__main__":
    main()
